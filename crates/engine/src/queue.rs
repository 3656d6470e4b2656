//! The queue and the batcher as plain state: no locks, no threads, no clock of its own. The
//! engine keeps one [`Queue`] behind a mutex and its workers call it with the current time;
//! tests call it with whatever times they like.
//!
//! Entries leave in arrival order. A worker that takes an entry of a model with adaptive
//! batching keeps a [`Gathering`]: later entries with an equal key join it until it holds
//! `max_images` images or its window (opened when the first entry was taken) closes.
//!
//! Every batch reserves its memory ([`Memory`]) as it forms: the oldest entry waits until its
//! batch fits, and a gathering batch takes only members that fit beside it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::memory::Fit;

/// What the queue needs to know about an entry.
pub trait Entry {
    type Key: PartialEq;
    /// Entries with equal keys may share a batch.
    fn key(&self) -> &Self::Key;
    /// Images the entry adds to a batch.
    fn images(&self) -> usize;
    /// Whether the entry is done waiting at `now` (deadline passed, client gone).
    fn stopped(&self, now: Instant) -> bool;
    /// The entry's model's adaptive batching, if it has any.
    fn batching(&self) -> Option<Batching>;
}

/// The memory budget as the queue sees it.
pub trait Memory<T> {
    /// Bytes a batch of `entry`'s key with `images` images needs.
    fn need(&self, entry: &T, images: usize) -> u64;
    /// Whether `bytes` more fit on `entry`'s device now.
    fn fits(&mut self, entry: &T, bytes: u64) -> Fit;
    /// Takes `bytes` on `entry`'s device (after `fits` said [`Fit::Now`]).
    fn reserve(&mut self, entry: &T, bytes: u64);
}

/// No budget: everything fits (models that cannot estimate their memory, tests).
pub struct Unbounded;

impl<T> Memory<T> for Unbounded {
    fn need(&self, _: &T, _: usize) -> u64 {
        0
    }
    fn fits(&mut self, _: &T, _: u64) -> Fit {
        Fit::Now
    }
    fn reserve(&mut self, _: &T, _: u64) {}
}

/// Adaptive batching: up to `max_images` images, gathered for at most `window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batching {
    pub max_images: usize,
    pub window: Duration,
}

/// A batch a worker is gathering.
#[derive(Debug)]
pub struct Gathering<T> {
    members: Vec<T>,
    images: usize,
    max_images: usize,
    closes: Instant,
    /// Bytes the batch has reserved so far.
    reserved: u64,
}

impl<T: Entry> Gathering<T> {
    fn open(first: T, batching: Batching, now: Instant, reserved: u64) -> Self {
        Self {
            images: first.images(),
            members: vec![first],
            max_images: batching.max_images,
            closes: now + batching.window,
            reserved,
        }
    }

    /// Reserves what `entry` adds to the batch's memory, if it fits now.
    fn make_room(&mut self, entry: &T, memory: &mut dyn Memory<T>) -> bool {
        let need = memory.need(entry, self.images + entry.images());
        let more = need.saturating_sub(self.reserved);
        if memory.fits(entry, more) != Fit::Now {
            return false;
        }
        memory.reserve(entry, more);
        self.reserved = self.reserved.max(need);
        true
    }

    fn done(self) -> Batch<T> {
        Batch {
            members: self.members,
            reserved: self.reserved,
        }
    }

    fn admits(&self, entry: &T, now: Instant) -> bool {
        entry.key() == self.members[0].key()
            && self.images + entry.images() <= self.max_images
            && !entry.stopped(now)
    }

    fn is_full(&self) -> bool {
        self.images >= self.max_images
    }
}

/// Entries to run as one batch, with the memory they reserved.
#[derive(Debug, PartialEq)]
pub struct Batch<T> {
    pub members: Vec<T>,
    pub reserved: u64,
}

/// What a worker should do next.
#[derive(Debug, PartialEq)]
pub enum Take<T> {
    /// Run these entries as one batch now.
    Batch(Batch<T>),
    /// This entry can never fit the memory budget (it shrank since the entry was admitted):
    /// answer it with the error; batches get at most `for_batches` bytes.
    Refused { entry: T, for_batches: u64 },
    /// Nothing to run yet: look again at this time, or (`None`) when something is admitted.
    Wait(Option<Instant>),
    /// The queue is closed and this worker holds nothing.
    Closed,
}

/// Entries waiting for a worker, in arrival order, each with the id [`Queue::admit`] gave it.
#[derive(Debug)]
pub struct Queue<T> {
    waiting: VecDeque<(u64, T)>,
    next_id: u64,
    closed: bool,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self {
            waiting: VecDeque::new(),
            next_id: 1,
            closed: false,
        }
    }
}

impl<T: Entry> Queue<T> {
    /// Appends an entry; refused (and handed back) once the queue is closed.
    pub fn admit(&mut self, entry: T) -> Result<u64, T> {
        if self.closed {
            return Err(entry);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back((id, entry));
        Ok(id)
    }

    /// Takes an entry out before a worker does (its client gave up).
    pub fn remove(&mut self, id: u64) -> Option<T> {
        let at = self.waiting.iter().position(|(i, _)| *i == id)?;
        self.waiting.remove(at).map(|(_, e)| e)
    }

    /// Takes out every entry that stopped waiting by `now`, oldest first.
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let (stopped, waiting) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(_, e)| e.stopped(now));
        self.waiting = waiting;
        stopped.into_iter().map(|(_, e)| e).collect()
    }

    /// The next batch for a worker whose batch in progress is `gathering` (kept between calls,
    /// `None` when it holds nothing).
    pub fn take(
        &mut self,
        gathering: &mut Option<Gathering<T>>,
        now: Instant,
        memory: &mut dyn Memory<T>,
    ) -> Take<T> {
        let g = match gathering {
            Some(g) => g,
            None => {
                let Some((_, first)) = self.waiting.front() else {
                    return if self.closed {
                        Take::Closed
                    } else {
                        Take::Wait(None)
                    };
                };
                let need = memory.need(first, first.images());
                match memory.fits(first, need) {
                    // Woken when a running batch gives its memory back.
                    Fit::Later => return Take::Wait(None),
                    Fit::Never { for_batches } => {
                        let (_, entry) = self.waiting.pop_front().expect("front checked");
                        return Take::Refused { entry, for_batches };
                    }
                    Fit::Now => {}
                }
                let (_, first) = self.waiting.pop_front().expect("front checked");
                memory.reserve(&first, need);
                match first.batching() {
                    None => {
                        return Take::Batch(Batch {
                            members: vec![first],
                            reserved: need,
                        });
                    }
                    Some(b) => gathering.insert(Gathering::open(first, b, now, need)),
                }
            }
        };
        let mut i = 0;
        while i < self.waiting.len() && !g.is_full() {
            if g.admits(&self.waiting[i].1, now) && g.make_room(&self.waiting[i].1, memory) {
                let (_, entry) = self.waiting.remove(i).expect("index checked");
                g.images += entry.images();
                g.members.push(entry);
            } else {
                i += 1;
            }
        }
        if g.is_full() || now >= g.closes || self.closed {
            let done = gathering.take().expect("a gathering is open here");
            return Take::Batch(done.done());
        }
        Take::Wait(Some(g.closes))
    }

    /// Closes the queue (nothing more is admitted) and hands back every waiting entry.
    pub fn close(&mut self) -> Vec<T> {
        self.closed = true;
        self.drain()
    }

    /// Hands back every waiting entry; the queue stays open.
    pub fn drain(&mut self) -> Vec<T> {
        self.waiting.drain(..).map(|(_, e)| e).collect()
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch_key::BatchKey;
    use sdserve_generation::{
        AdapterChoice, AdapterInfo, ImageSpec, ImageTask, ImageToImage, Job, JobSettings, Latents,
        Mask, RgbImage, TimeIds,
    };

    #[derive(Debug, Clone, PartialEq)]
    struct E {
        name: &'static str,
        key: BatchKey,
        images: usize,
        deadline: Option<Instant>,
        cancelled: bool,
        batching: Option<Batching>,
    }

    impl Entry for E {
        type Key = BatchKey;
        fn key(&self) -> &BatchKey {
            &self.key
        }
        fn images(&self) -> usize {
            self.images
        }
        fn stopped(&self, now: Instant) -> bool {
            self.cancelled || self.deadline.is_some_and(|d| now >= d)
        }
        fn batching(&self) -> Option<Batching> {
            self.batching
        }
    }

    fn settings() -> JobSettings {
        JobSettings {
            num_inference_steps: 20,
            guidance_scale: 7.5,
            height: 64,
            width: 64,
            scheduler: "pndm".into(),
            eta: 0.0,
            time_ids: None,
            image_to_image: None,
            adapters: sdserve_generation::AdapterChoice::none(),
        }
    }

    fn image(prompt: &str) -> ImageSpec {
        ImageSpec {
            prompt: prompt.into(),
            negative_prompt: None,
            prompt_2: None,
            negative_prompt_2: None,
            seed: 1,
            latents: None,
            image: None,
            mask: None,
            encoder_noise: Vec::new(),
        }
    }

    const BATCH4: Option<Batching> = Some(Batching {
        max_images: 4,
        window: Duration::from_millis(100),
    });

    /// An entry for `job` on model 1, one per image, batched by [`BATCH4`].
    fn entry(name: &'static str, job: &Job) -> E {
        E {
            name,
            key: BatchKey::new(1, job),
            images: job.images.len(),
            deadline: None,
            cancelled: false,
            batching: BATCH4,
        }
    }

    fn plain(name: &'static str) -> E {
        E {
            batching: None,
            ..entry(
                name,
                &Job {
                    settings: settings(),
                    images: vec![image(name)],
                },
            )
        }
    }

    fn names(t: Take<E>) -> Vec<&'static str> {
        match t {
            Take::Batch(b) => b.members.iter().map(|e| e.name).collect(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    /// A device of `capacity` bytes where every image needs `per_image`.
    struct Pool {
        capacity: u64,
        reserved: u64,
        per_image: u64,
    }

    impl Memory<E> for Pool {
        fn need(&self, _: &E, images: usize) -> u64 {
            self.per_image * images as u64
        }
        fn fits(&mut self, _: &E, bytes: u64) -> Fit {
            if bytes > self.capacity {
                Fit::Never {
                    for_batches: self.capacity,
                }
            } else if self.reserved + bytes > self.capacity {
                Fit::Later
            } else {
                Fit::Now
            }
        }
        fn reserve(&mut self, _: &E, bytes: u64) {
            self.reserved += bytes;
        }
    }

    #[test]
    fn batches_reserve_memory_the_oldest_waits_for_it_and_gathering_stops_at_the_budget() {
        let t0 = Instant::now();
        let job = |n: usize| Job {
            settings: settings(),
            images: vec![image("x"); n],
        };
        let mut pool = Pool {
            capacity: 10,
            reserved: 0,
            per_image: 3,
        };
        let mut q = Queue::default();
        let (mut g, mut other) = (None, None);
        q.admit(plain("a")).unwrap();
        q.admit(entry("two", &job(2))).unwrap();
        q.admit(plain("b")).unwrap();
        // "a" takes 3 of 10; "two" (6) fits beside it and gathers; "b" (3 more) does not fit
        // beside both, so the batch closes without it.
        assert_eq!(names(q.take(&mut g, t0, &mut pool)), ["a"]);
        assert_eq!(pool.reserved, 3);
        let window = t0 + Duration::from_millis(100);
        assert_eq!(q.take(&mut other, t0, &mut pool), Take::Wait(Some(window)));
        assert_eq!(pool.reserved, 9);
        let Take::Batch(batch) = q.take(&mut other, window, &mut pool) else {
            panic!("the gathered batch")
        };
        assert_eq!((batch.members.len(), batch.reserved), (1, 6));
        // "b" is the oldest now and waits for memory; nothing overtakes it.
        q.admit(plain("c")).unwrap();
        assert_eq!(q.take(&mut g, t0, &mut pool), Take::Wait(None));
        pool.reserved -= 3;
        assert_eq!(names(q.take(&mut g, t0, &mut pool)), ["b"]);
        // One that can never fit is handed back with the budget.
        let mut huge = plain("huge");
        huge.images = 4;
        q.admit(huge).unwrap();
        pool.reserved = 0;
        assert_eq!(names(q.take(&mut g, t0, &mut pool)), ["c"]);
        match q.take(&mut g, t0, &mut pool) {
            Take::Refused { entry, for_batches } => {
                assert_eq!((entry.name, for_batches), ("huge", 10))
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn without_batching_entries_leave_one_by_one_in_order() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        let mut g = None;
        assert_eq!(q.take(&mut g, t0, &mut Unbounded), Take::Wait(None));
        for n in ["a", "b", "c"] {
            q.admit(plain(n)).unwrap();
        }
        assert_eq!(q.len(), 3);
        for n in ["a", "b", "c"] {
            assert_eq!(names(q.take(&mut g, t0, &mut Unbounded)), [n]);
        }
        assert!(q.is_empty());
    }

    #[test]
    fn a_batch_gathers_equal_keys_until_full_or_its_window_closes() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let job = |n: usize| Job {
            settings: settings(),
            images: vec![image("x"); n],
        };
        let other = Job {
            settings: JobSettings {
                num_inference_steps: 21,
                ..settings()
            },
            images: vec![image("x")],
        };
        let mut q = Queue::default();
        let mut g = None;
        q.admit(entry("a", &job(1))).unwrap();
        q.admit(entry("odd", &other)).unwrap();
        // The window opens when the first entry is taken, and closes 100 ms later.
        assert_eq!(
            q.take(&mut g, t0, &mut Unbounded),
            Take::Wait(Some(t0 + ms(100)))
        );
        q.admit(entry("b", &job(2))).unwrap();
        q.admit(entry("too-big", &job(2))).unwrap();
        assert_eq!(
            q.take(&mut g, t0 + ms(50), &mut Unbounded),
            Take::Wait(Some(t0 + ms(100)))
        );
        assert_eq!(
            names(q.take(&mut g, t0 + ms(100), &mut Unbounded)),
            ["a", "b"]
        );
        // The next batch starts with the oldest waiting entry, whatever its key.
        assert_eq!(
            q.take(&mut g, t0 + ms(100), &mut Unbounded),
            Take::Wait(Some(t0 + ms(200)))
        );
        assert_eq!(names(q.take(&mut g, t0 + ms(200), &mut Unbounded)), ["odd"]);
        assert_eq!(
            q.take(&mut g, t0 + ms(200), &mut Unbounded),
            Take::Wait(Some(t0 + ms(300)))
        );
        // An entry that does not fit waits for the next batch; a full batch leaves at once.
        q.admit(entry("c", &job(3))).unwrap();
        q.admit(entry("d", &job(2))).unwrap();
        assert_eq!(
            names(q.take(&mut g, t0 + ms(201), &mut Unbounded)),
            ["too-big", "d"]
        );
        assert_eq!(
            q.take(&mut g, t0 + ms(201), &mut Unbounded),
            Take::Wait(Some(t0 + ms(301)))
        );
        assert_eq!(names(q.take(&mut g, t0 + ms(301), &mut Unbounded)), ["c"]);
    }

    #[test]
    fn stopped_entries_expire_and_never_join_a_batch() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let job = Job {
            settings: settings(),
            images: vec![image("x")],
        };
        let mut q = Queue::default();
        let mut g = None;
        q.admit(entry("a", &job)).unwrap();
        assert_eq!(
            q.take(&mut g, t0, &mut Unbounded),
            Take::Wait(Some(t0 + ms(100)))
        );
        let late = E {
            deadline: Some(t0 + ms(20)),
            ..entry("late", &job)
        };
        let gone = E {
            cancelled: true,
            ..entry("gone", &job)
        };
        q.admit(late).unwrap();
        q.admit(gone).unwrap();
        let gone_too = q.admit(entry("gone too", &job)).unwrap();
        assert_eq!(q.remove(gone_too).map(|e| e.name), Some("gone too"));
        let expired: Vec<_> = q.expire(t0 + ms(30)).iter().map(|e| e.name).collect();
        assert_eq!(expired, ["late", "gone"]);
        assert_eq!(names(q.take(&mut g, t0 + ms(100), &mut Unbounded)), ["a"]);
        assert_eq!(q.remove(gone_too), None);
    }

    #[test]
    fn closing_hands_back_the_waiting_and_refuses_the_rest() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        let mut g = None;
        q.admit(plain("a")).unwrap();
        q.admit(plain("b")).unwrap();
        let left: Vec<_> = q.close().iter().map(|e| e.name).collect();
        assert_eq!(left, ["a", "b"]);
        assert!(q.is_closed());
        assert_eq!(q.admit(plain("c")).map_err(|e| e.name), Err("c"));
        assert_eq!(q.take(&mut g, t0, &mut Unbounded), Take::Closed);
    }

    #[test]
    fn a_closing_queue_releases_a_gathering_batch_at_once() {
        let t0 = Instant::now();
        let job = Job {
            settings: settings(),
            images: vec![image("x")],
        };
        let mut q = Queue::default();
        let mut g = None;
        q.admit(entry("a", &job)).unwrap();
        assert!(matches!(
            q.take(&mut g, t0, &mut Unbounded),
            Take::Wait(Some(_))
        ));
        q.close();
        assert_eq!(names(q.take(&mut g, t0, &mut Unbounded)), ["a"]);
        assert_eq!(q.take(&mut g, t0, &mut Unbounded), Take::Closed);
    }

    /// Every shared setting, each changed on its own. The destructuring lists every field of
    /// `JobSettings`: a new one does not compile here until it has its case.
    fn each_shared_setting_changed(base: &JobSettings) -> Vec<(&'static str, JobSettings)> {
        let JobSettings {
            num_inference_steps,
            guidance_scale,
            height,
            width,
            scheduler,
            eta,
            time_ids,
            image_to_image,
            adapters,
        } = base.clone();
        vec![
            (
                "num_inference_steps",
                JobSettings {
                    num_inference_steps: num_inference_steps + 1,
                    ..base.clone()
                },
            ),
            (
                "guidance_scale",
                JobSettings {
                    guidance_scale: guidance_scale + 0.5,
                    ..base.clone()
                },
            ),
            (
                "height",
                JobSettings {
                    height: height + 8,
                    ..base.clone()
                },
            ),
            (
                "width",
                JobSettings {
                    width: width + 8,
                    ..base.clone()
                },
            ),
            (
                "scheduler",
                JobSettings {
                    scheduler: format!("{scheduler}-other"),
                    ..base.clone()
                },
            ),
            (
                "eta",
                JobSettings {
                    eta: eta + 0.5,
                    ..base.clone()
                },
            ),
            (
                "time_ids",
                JobSettings {
                    // SDXL: another target size (the last two ids).
                    time_ids: Some(match time_ids {
                        Some(ids) => TimeIds {
                            positive: [64, 64, 0, 0, 64, 72],
                            ..ids
                        },
                        None => TimeIds::defaults(64, 64),
                    }),
                    ..base.clone()
                },
            ),
            (
                "image_to_image",
                JobSettings {
                    image_to_image: Some(ImageToImage {
                        strength: image_to_image.map_or(0.5, |m| m.strength / 2.0),
                        task: ImageTask::Img2Img,
                    }),
                    ..base.clone()
                },
            ),
            (
                "adapters",
                JobSettings {
                    // Another adapter, or the same at another scale.
                    adapters: {
                        let scale = adapters.entries().first().map_or(0.5, |(_, s)| s / 2.0);
                        let declared = [AdapterInfo {
                            name: "style".into(),
                            scale: 1.0,
                            default: false,
                        }];
                        AdapterChoice::resolve(Some(&[("style".into(), Some(scale))]), &declared)
                            .unwrap()
                    },
                    ..base.clone()
                },
            ),
        ]
    }

    /// Every per-image field, each changed on its own (same rule for `ImageSpec`).
    fn each_image_field_changed(base: &ImageSpec) -> Vec<(&'static str, ImageSpec)> {
        let ImageSpec {
            prompt,
            negative_prompt,
            prompt_2,
            negative_prompt_2,
            seed,
            latents,
            image,
            mask,
            encoder_noise,
        } = base.clone();
        let other = |text: Option<String>| Some(format!("{}blurry", text.unwrap_or_default()));
        vec![
            (
                "prompt",
                ImageSpec {
                    prompt: format!("{prompt} and more"),
                    ..base.clone()
                },
            ),
            (
                "negative_prompt",
                ImageSpec {
                    negative_prompt: other(negative_prompt),
                    ..base.clone()
                },
            ),
            (
                "prompt_2",
                ImageSpec {
                    prompt_2: other(prompt_2),
                    ..base.clone()
                },
            ),
            (
                "negative_prompt_2",
                ImageSpec {
                    negative_prompt_2: other(negative_prompt_2),
                    ..base.clone()
                },
            ),
            (
                "seed",
                ImageSpec {
                    seed: seed + 1,
                    ..base.clone()
                },
            ),
            (
                "latents",
                ImageSpec {
                    latents: match latents {
                        None => Some(Latents {
                            shape: [4, 8, 8],
                            data: vec![0.5; 256],
                        }),
                        Some(_) => None,
                    },
                    ..base.clone()
                },
            ),
            (
                "image",
                ImageSpec {
                    image: match image {
                        None => Some(RgbImage {
                            width: 1,
                            height: 1,
                            rgb: vec![1, 2, 3].into(),
                        }),
                        Some(_) => None,
                    },
                    ..base.clone()
                },
            ),
            (
                "mask",
                ImageSpec {
                    mask: match mask {
                        None => Some(Mask {
                            width: 1,
                            height: 1,
                            repaint: vec![true].into(),
                        }),
                        Some(_) => None,
                    },
                    ..base.clone()
                },
            ),
            (
                "encoder_noise",
                ImageSpec {
                    encoder_noise: match encoder_noise.len() {
                        0 => vec![Latents {
                            shape: [4, 8, 8],
                            data: vec![0.5; 256],
                        }],
                        _ => Vec::new(),
                    },
                    ..base.clone()
                },
            ),
        ]
    }

    /// Whether two jobs, queued one after the other, leave in one batch.
    fn merged(a: &Job, b: &Job) -> bool {
        let t0 = Instant::now();
        let mut q = Queue::default();
        let mut g = None;
        q.admit(entry("a", a)).unwrap();
        q.admit(entry("b", b)).unwrap();
        assert!(matches!(
            q.take(&mut g, t0, &mut Unbounded),
            Take::Wait(Some(_))
        ));
        names(q.take(&mut g, t0 + Duration::from_secs(1), &mut Unbounded)).len() == 2
    }

    #[test]
    fn jobs_that_differ_in_a_shared_setting_never_share_a_batch() {
        // `Job` is settings and images, nothing else: a third field does not compile here.
        let Job { settings, images } = Job {
            settings: settings(),
            images: vec![image("a red circle")],
        };
        let base = Job {
            settings: settings.clone(),
            images: images.clone(),
        };
        assert!(merged(&base, &base.clone()), "equal jobs batch together");
        for (field, changed) in each_shared_setting_changed(&settings) {
            let other = Job {
                settings: changed,
                images: images.clone(),
            };
            assert!(
                !merged(&base, &other),
                "'{field}' differs, yet the jobs merged"
            );
        }
        for (field, changed) in each_image_field_changed(&images[0]) {
            let other = Job {
                settings: settings.clone(),
                images: vec![changed],
            };
            assert!(
                merged(&base, &other),
                "'{field}' is per image, yet the jobs did not merge"
            );
        }
        // Another model (or another load of it) never shares a batch either.
        let mut elsewhere = entry("elsewhere", &base);
        elsewhere.key.model = 2;
        assert_ne!(entry("a", &base).key, elsewhere.key);
    }
}
