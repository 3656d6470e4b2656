//! Validation: a [`GenerationRequest`] plus the model's description, defaults and limits
//! become a [`Job`], or a [`ValidationError`] naming the field, before anything is queued.
//! Defaults are held to the limits too: a model whose defaults exceed them must not serve
//! such requests quietly.

use crate::adapters::AdapterChoice;
use crate::generator::{MaskInput, ModelDescription};
use crate::image_input::{ImageError, RgbImage, decode_rgb, decode_transparency};
use crate::job::{
    ETA_SCHEDULER, ImageSpec, ImageTask, ImageToImage, Job, JobSettings, Latents, Mask,
};
use crate::limits::{GenerationDefaults, Limits};
use crate::request::{GenerationRequest, LatentsInput, MaskMeaning};

/// A request that is out of bounds for this model: a 400 naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

fn invalid(msg: impl Into<String>) -> ValidationError {
    ValidationError(msg.into())
}

const REQUIRES_MASK: &str =
    "this is an inpainting model: it needs an 'image' and a 'mask_image' input";

/// Said of a value the request did not give.
const DEFAULT: &str = " (the model's default)";

/// Seeds for requests that give none: different per request, not reproducible.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// What the model and its settings allow, in one place for the checks below.
struct Bounds<'a> {
    model: &'a ModelDescription,
    defaults: &'a GenerationDefaults,
    limits: &'a Limits,
}

impl GenerationRequest {
    /// Applies defaults and checks every field against the model and its limits.
    pub fn resolve(
        &self,
        model: &ModelDescription,
        defaults: &GenerationDefaults,
        limits: &Limits,
        random_seed: impl FnMut() -> u64,
    ) -> Result<Job, ValidationError> {
        let b = Bounds {
            model,
            defaults,
            limits,
        };
        crate::sdxl::check_applies(self, model)?;
        let prompts = self.prompts_per_image(limits)?;
        let num_inference_steps = self.steps(&b)?;
        let guidance_scale = self.guidance(&b)?;
        let per_prompt = self.images_per_prompt(limits)?;
        let (scheduler, eta) = self.scheduler_and_eta(&b)?;
        self.check_output_format()?;
        let adapters = AdapterChoice::resolve(self.lora.as_deref(), &model.adapters)?;
        let image_to_image = self.image_to_image(&b, num_inference_steps)?;
        let inpainting = image_to_image.is_some_and(|m| m.task == ImageTask::Inpaint);
        // Decoded last: every cheaper check has passed.
        let inputs = self.files(&b, "image", &self.images, decode_rgb)?;
        let mask_decoder = match self.mask_meaning {
            MaskMeaning::White => decode_rgb,
            MaskMeaning::Transparent => decode_transparency,
        };
        let masks = self.files(&b, "mask_image", &self.mask_images, mask_decoder)?;
        // Inpainting keeps the model's size by default, as diffusers' inpaint pipeline does.
        let size_from = inputs.as_ref().filter(|_| !inpainting).map(|i| &i[0]);
        let (height, width) = self.size(&b, size_from)?;
        let time_ids =
            crate::sdxl::time_ids(self, model, (height, width), image_to_image.is_some())?;
        let settings = JobSettings {
            num_inference_steps,
            guidance_scale,
            height,
            width,
            scheduler,
            eta,
            time_ids,
            image_to_image,
            adapters,
        };
        // Every image at the output size, as diffusers resizes them.
        let resized = |images: Vec<RgbImage>| -> Vec<RgbImage> {
            images.iter().map(|im| im.resized(width, height)).collect()
        };
        let inputs = inputs.map(resized);
        let masks: Option<Vec<Mask>> =
            masks.map(|m| resized(m).iter().map(Mask::from_rgb).collect());
        let n_images = self.prompts.len() * per_prompt;
        let seeds = self.seeds(n_images, random_seed)?;
        let latents = self.latents(model, &settings, n_images)?;
        let encoder_noise = self.encoder_noise(model, &settings, n_images)?;

        let mut images = Vec::with_capacity(n_images);
        let per_image = seeds.into_iter().zip(latents).zip(encoder_noise);
        let mut per_image = per_image.into_iter();
        for (k, p) in prompts.iter().enumerate() {
            let image = inputs.as_ref().map(|i| i[k % i.len()].clone());
            let mask = masks.as_ref().map(|m| m[k % m.len()].clone());
            for ((seed, latents), encoder_noise) in per_image.by_ref().take(per_prompt) {
                images.push(ImageSpec {
                    prompt: p.prompt.clone(),
                    negative_prompt: p.negative.clone(),
                    prompt_2: p.prompt_2.clone(),
                    negative_prompt_2: p.negative_2.clone(),
                    seed,
                    latents,
                    image: image.clone(),
                    mask: mask.clone(),
                    encoder_noise,
                });
            }
        }
        Ok(Job { settings, images })
    }

    /// Checks the prompts; returns each prompt with its negative and second prompts.
    fn prompts_per_image(&self, limits: &Limits) -> Result<Vec<Prompts>, ValidationError> {
        let n = self.prompts.len();
        if n == 0 {
            return Err(invalid("'prompt' must hold at least one prompt"));
        }
        if n > limits.max_prompts {
            return Err(invalid(format!(
                "'prompt' holds {n} prompts; at most {} are allowed per request",
                limits.max_prompts
            )));
        }
        check_lengths("prompt", &self.prompts, limits)?;
        let negatives = per_prompt("negative_prompt", &self.negative_prompts, n, limits)?;
        let prompts_2 = per_prompt("prompt_2", &self.prompts_2, n, limits)?;
        let negatives_2 = per_prompt("negative_prompt_2", &self.negative_prompts_2, n, limits)?;
        Ok((0..n)
            .map(|i| Prompts {
                prompt: self.prompts[i].clone(),
                negative: negatives[i].clone(),
                prompt_2: prompts_2[i].clone(),
                negative_2: negatives_2[i].clone(),
            })
            .collect())
    }

    fn steps(&self, b: &Bounds) -> Result<usize, ValidationError> {
        let (steps, source) = match self.num_inference_steps {
            None => (i128::from(b.defaults.num_inference_steps as u64), DEFAULT),
            Some(n) => (i128::from(n), ""),
        };
        let max = b.limits.max_num_inference_steps;
        if steps < 1 || steps > max as i128 {
            return Err(invalid(format!(
                "'num_inference_steps' is {steps}{source}; it must be between 1 and {max}"
            )));
        }
        Ok(steps as usize)
    }

    fn guidance(&self, b: &Bounds) -> Result<f64, ValidationError> {
        let g = self.guidance_scale.unwrap_or(b.defaults.guidance_scale);
        let max = b.limits.max_guidance_scale;
        if !g.is_finite() || g < 0.0 || g > max {
            return Err(invalid(format!(
                "'guidance_scale' is {g}; it must be a finite number between 0 and {max}"
            )));
        }
        Ok(g)
    }

    /// `(height, width)`: multiples of 8 and of the VAE factor, within the size limits. A side
    /// the request leaves out is the model's default, or with an input image that image's
    /// side rounded down to a multiple of the VAE factor (diffusers' `get_default_height_width`).
    fn size(
        &self,
        b: &Bounds,
        image: Option<&RgbImage>,
    ) -> Result<(usize, usize), ValidationError> {
        let (model, limits) = (b.model, b.limits);
        let f = model.vae_scale_factor;
        let (default_h, default_w, source) = match image {
            Some(im) => (
                im.height - im.height % f,
                im.width - im.width % f,
                FROM_IMAGE,
            ),
            None => (
                b.defaults.height.unwrap_or(model.native_height),
                b.defaults.width.unwrap_or(model.native_width),
                DEFAULT,
            ),
        };
        let height = side("height", self.height, default_h, source, limits.max_height)?;
        let width = side("width", self.width, default_w, source, limits.max_width)?;
        if height
            .checked_mul(width)
            .is_none_or(|pixels| pixels > limits.max_pixels)
        {
            return Err(invalid(format!(
                "'height' × 'width' is {height}×{width} = {} pixels; at most {} are allowed",
                height as u128 * width as u128,
                limits.max_pixels
            )));
        }
        if height % f != 0 || width % f != 0 {
            return Err(invalid(format!(
                "'height' and 'width' must be multiples of {f} for this model"
            )));
        }
        Ok((height, width))
    }

    /// Images per prompt; the total is at most `max_prompts` × `max_images`, both bounded by
    /// u32, so it cannot overflow.
    fn images_per_prompt(&self, limits: &Limits) -> Result<usize, ValidationError> {
        let per_prompt = match self.num_images_per_prompt {
            None => 1,
            Some(n) if n >= 1 && (n as u64) <= limits.max_images as u64 => n as usize,
            Some(n) => {
                return Err(invalid(format!(
                    "'num_images_per_prompt' is {n}; it must be between 1 and {}",
                    limits.max_images
                )));
            }
        };
        let n_prompts = self.prompts.len();
        let n_images = n_prompts * per_prompt;
        if n_images > limits.max_images {
            return Err(invalid(format!(
                "the request asks for {n_images} images ({n_prompts} prompts × {per_prompt}); at most {} are allowed",
                limits.max_images
            )));
        }
        Ok(per_prompt)
    }

    fn scheduler_and_eta(&self, b: &Bounds) -> Result<(String, f64), ValidationError> {
        let scheduler = self
            .scheduler
            .clone()
            .or_else(|| b.defaults.scheduler.clone())
            .unwrap_or_else(|| b.model.default_scheduler.clone());
        if !b.model.schedulers.contains(&scheduler) {
            return Err(invalid(format!(
                "unknown scheduler '{scheduler}'; available: {}",
                b.model.schedulers.join(", ")
            )));
        }
        let eta = self.eta.unwrap_or(0.0);
        if !eta.is_finite() || !(0.0..=1.0).contains(&eta) {
            return Err(invalid(format!(
                "'eta' is {eta}; it must be between 0 and 1"
            )));
        }
        if eta != 0.0 && scheduler != ETA_SCHEDULER {
            return Err(invalid(format!(
                "'eta' only applies to the {ETA_SCHEDULER} scheduler, not '{scheduler}'"
            )));
        }
        Ok((scheduler, eta))
    }

    /// Image-to-image settings when the request gives images: the model takes them (and masks,
    /// for inpainting), and the strength leaves at least one step to run.
    fn image_to_image(
        &self,
        b: &Bounds,
        steps: usize,
    ) -> Result<Option<ImageToImage>, ValidationError> {
        let masks = b.model.masks;
        if self.images.is_none() {
            if self.mask_images.is_some() {
                return Err(invalid(
                    "input 'mask_image' needs an 'image' input to inpaint",
                ));
            }
            if masks == MaskInput::Required {
                return Err(invalid(REQUIRES_MASK));
            }
            if let Some(s) = self.strength {
                return Err(invalid(format!(
                    "'strength' ({s}) applies only to image-to-image; give an 'image' input"
                )));
            }
            return Ok(None);
        }
        let Some(default) = b.model.default_strength else {
            return Err(invalid(
                "input 'image': this model takes no input images (its VAE has no encoder)",
            ));
        };
        let task = match (self.mask_images.is_some(), masks) {
            (true, MaskInput::NotServed) => {
                return Err(invalid(
                    "input 'mask_image': this model does not serve inpainting",
                ));
            }
            (false, MaskInput::Required) => return Err(invalid(REQUIRES_MASK)),
            (true, _) => ImageTask::Inpaint,
            (false, _) => ImageTask::Img2Img,
        };
        let default = match task {
            ImageTask::Img2Img => default.image_to_image,
            ImageTask::Inpaint => default.inpainting,
        };
        let (strength, source) = match self.strength {
            Some(s) => (s, ""),
            None => (default, DEFAULT),
        };
        if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
            return Err(invalid(format!(
                "'strength' is {strength}{source}; it must be a number in (0, 1]"
            )));
        }
        let mode = ImageToImage { strength, task };
        if mode.first_step(steps) >= steps {
            return Err(invalid(format!(
                "'strength' {strength}{source} with {steps} 'num_inference_steps' runs no step: \
                 int(steps × strength) must be at least 1"
            )));
        }
        Ok(Some(mode))
    }

    /// The files of input `name`, decoded: one for all prompts or one per prompt, each within
    /// `max_pixels` before it is decoded.
    fn files(
        &self,
        b: &Bounds,
        name: &str,
        files: &Option<Vec<Vec<u8>>>,
        decode: fn(&[u8], usize) -> Result<RgbImage, ImageError>,
    ) -> Result<Option<Vec<RgbImage>>, ValidationError> {
        let Some(files) = files else {
            return Ok(None);
        };
        let n = self.prompts.len();
        if files.len() != 1 && files.len() != n {
            return Err(invalid(format!(
                "input '{name}' has {} element(s); give one for all prompts or one per prompt ({n})",
                files.len()
            )));
        }
        let images = files
            .iter()
            .enumerate()
            .map(|(k, file)| {
                decode(file, b.limits.max_pixels)
                    .map_err(|e| invalid(format!("input '{name}' element {k} {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(images))
    }

    fn check_output_format(&self) -> Result<(), ValidationError> {
        match &self.output_format {
            Some(fmt) if !fmt.eq_ignore_ascii_case("png") => Err(invalid(format!(
                "'output_format' is '{fmt}'; only 'png' is supported"
            ))),
            _ => Ok(()),
        }
    }

    /// One seed per image: as given, or consecutive from one seed (given or random).
    fn seeds(
        &self,
        n_images: usize,
        mut random_seed: impl FnMut() -> u64,
    ) -> Result<Vec<u64>, ValidationError> {
        let consecutive = |first: u64| {
            (0..n_images as u64)
                .map(|i| first.wrapping_add(i))
                .collect()
        };
        match &self.seeds {
            None => Ok(consecutive(random_seed())),
            Some(s) if s.len() == 1 => Ok(consecutive(s[0])),
            Some(s) if s.len() == n_images => Ok(s.clone()),
            Some(s) => Err(invalid(format!(
                "'seed' has {} elements; give one seed or one per image ({n_images})",
                s.len()
            ))),
        }
    }

    /// Each image's explicit encoder draws, if the request gave them: as many per image as the
    /// job encodes images (two for a 9-channel inpainting UNet below strength 1: the image
    /// and the masked image).
    fn encoder_noise(
        &self,
        model: &ModelDescription,
        settings: &JobSettings,
        n_images: usize,
    ) -> Result<Vec<Vec<Latents>>, ValidationError> {
        let Some(LatentsInput { shape, data }) = &self.encoder_noise else {
            return Ok(vec![Vec::new(); n_images]);
        };
        let Some(mode) = settings.image_to_image else {
            return Err(invalid(
                "input 'encoder_noise' applies only with an 'image' input",
            ));
        };
        let encodings = match mode.task {
            ImageTask::Inpaint if model.masks == MaskInput::Required && mode.strength < 1.0 => 2,
            _ => 1,
        };
        let f = model.vae_scale_factor;
        let latent = [
            model.latent_channels,
            settings.height / f,
            settings.width / f,
        ];
        let expected = [n_images, encodings, latent[0], latent[1], latent[2]];
        if shape.as_slice() != expected {
            return Err(invalid(format!(
                "input 'encoder_noise' has shape {shape:?}; this request needs {expected:?} (images, encodings, channels, height/{f}, width/{f})"
            )));
        }
        let per = latent.iter().product::<usize>();
        Ok(data
            .chunks(per * encodings)
            .map(|image| {
                image
                    .chunks(per)
                    .map(|d| Latents {
                        shape: latent,
                        data: d.to_vec(),
                    })
                    .collect()
            })
            .collect())
    }

    /// Each image's explicit latents, if the request gave them.
    fn latents(
        &self,
        model: &ModelDescription,
        settings: &JobSettings,
        n_images: usize,
    ) -> Result<Vec<Option<Latents>>, ValidationError> {
        let Some(LatentsInput { shape, data }) = &self.latents else {
            return Ok(vec![None; n_images]);
        };
        let f = model.vae_scale_factor;
        let latent_shape = [
            model.latent_channels,
            settings.height / f,
            settings.width / f,
        ];
        let expected = [n_images, latent_shape[0], latent_shape[1], latent_shape[2]];
        if shape.as_slice() != expected {
            return Err(invalid(format!(
                "input 'latents' has shape {shape:?}; this request needs {expected:?} (images, channels, height/{f}, width/{f})"
            )));
        }
        let per = latent_shape.iter().product::<usize>();
        Ok(data
            .chunks(per)
            .map(|c| {
                Some(Latents {
                    shape: latent_shape,
                    data: c.to_vec(),
                })
            })
            .collect())
    }
}

/// One prompt's texts; `None` where the request gave none.
struct Prompts {
    prompt: String,
    negative: Option<String>,
    prompt_2: Option<String>,
    negative_2: Option<String>,
}

/// A list given once for all `n` prompts or once per prompt, each element within the limits;
/// `None` for every prompt when not given.
fn per_prompt(
    name: &str,
    given: &Option<Vec<String>>,
    n: usize,
    limits: &Limits,
) -> Result<Vec<Option<String>>, ValidationError> {
    let texts = match given {
        None => return Ok(vec![None; n]),
        Some(v) if v.len() == 1 => vec![v[0].clone(); n],
        Some(v) if v.len() == n => v.clone(),
        Some(v) => {
            return Err(invalid(format!(
                "'{name}' has {} elements; give one for all prompts or one per prompt ({n})",
                v.len()
            )));
        }
    };
    check_lengths(name, &texts, limits)?;
    Ok(texts.into_iter().map(Some).collect())
}

/// `'name' element i` of `texts` must fit `max_prompt_bytes`.
fn check_lengths(name: &str, texts: &[String], limits: &Limits) -> Result<(), ValidationError> {
    match texts
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() > limits.max_prompt_bytes)
    {
        Some((i, p)) => Err(invalid(format!(
            "'{name}' element {i} is {} bytes; at most {} bytes are allowed",
            p.len(),
            limits.max_prompt_bytes
        ))),
        None => Ok(()),
    }
}

/// Said of a side taken from the input image.
const FROM_IMAGE: &str = " (from input 'image')";

/// One side of the image: the request's value or the default (said by `default_source`), a
/// multiple of 8 up to `max`.
fn side(
    name: &str,
    given: Option<i64>,
    default: usize,
    default_source: &str,
    max: usize,
) -> Result<usize, ValidationError> {
    let (v, source) = match given {
        None => (default as i128, default_source),
        Some(v) => (i128::from(v), ""),
    };
    if v < 8 || v % 8 != 0 || v > max as i128 {
        return Err(invalid(format!(
            "'{name}' is {v}{source}; it must be a multiple of 8 between 8 and {max}"
        )));
    }
    Ok(v as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelDescription {
        ModelDescription {
            native_height: 64,
            native_width: 64,
            vae_scale_factor: 8,
            latent_channels: 4,
            default_scheduler: "pndm".into(),
            schedulers: vec!["pndm".into(), "ddim".into(), "euler".into()],
            family: "sd1".into(),
            conditioning: Default::default(),
            default_strength: Some(crate::generator::DefaultStrength::SD),
            masks: crate::generator::MaskInput::Optional,
            dtype: "f32".into(),
            device: "cpu".into(),
            adapters: Vec::new(),
        }
    }

    fn req(prompts: &[&str]) -> GenerationRequest {
        GenerationRequest {
            prompts: prompts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn resolve(r: &GenerationRequest) -> Result<Job, ValidationError> {
        r.resolve(
            &model(),
            &GenerationDefaults::default(),
            &Limits::default(),
            || 100,
        )
    }

    #[test]
    fn defaults_fill_everything() {
        let job = resolve(&req(&["a", "b"])).unwrap();
        let s = &job.settings;
        assert_eq!((s.height, s.width, s.num_inference_steps), (64, 64, 30));
        assert_eq!(s.scheduler, "pndm");
        assert_eq!(s.guidance_scale, 7.5);
        let seeds: Vec<u64> = job.images.iter().map(|i| i.seed).collect();
        assert_eq!(seeds, [100, 101]);
        assert_eq!(job.images[1].negative_prompt, None);
    }

    #[test]
    fn images_come_in_prompt_order_with_consecutive_seeds() {
        let mut r = req(&["a", "b"]);
        r.num_images_per_prompt = Some(2);
        r.seeds = Some(vec![7]);
        r.negative_prompts = Some(vec!["x".into(), "y".into()]);
        let job = resolve(&r).unwrap();
        let got: Vec<(&str, &str, u64)> = job
            .images
            .iter()
            .map(|i| {
                (
                    i.prompt.as_str(),
                    i.negative_prompt.as_deref().unwrap(),
                    i.seed,
                )
            })
            .collect();
        assert_eq!(
            got,
            [("a", "x", 7), ("a", "x", 8), ("b", "y", 9), ("b", "y", 10)]
        );
    }

    #[test]
    fn every_bound_is_enforced_with_a_named_field() {
        let cases: Vec<(GenerationRequest, &str)> = vec![
            (
                GenerationRequest {
                    num_inference_steps: Some(0),
                    ..req(&["a"])
                },
                "'num_inference_steps' is 0",
            ),
            (
                GenerationRequest {
                    num_inference_steps: Some(151),
                    ..req(&["a"])
                },
                "between 1 and 150",
            ),
            (
                GenerationRequest {
                    height: Some(60),
                    ..req(&["a"])
                },
                "'height' is 60",
            ),
            (
                GenerationRequest {
                    width: Some(0),
                    ..req(&["a"])
                },
                "'width' is 0",
            ),
            (
                GenerationRequest {
                    width: Some(-8),
                    ..req(&["a"])
                },
                "'width' is -8",
            ),
            (
                GenerationRequest {
                    height: Some(2048),
                    width: Some(2048),
                    ..req(&["a"])
                },
                "pixels",
            ),
            (
                GenerationRequest {
                    guidance_scale: Some(-1.0),
                    ..req(&["a"])
                },
                "'guidance_scale'",
            ),
            (
                GenerationRequest {
                    scheduler: Some("heun".into()),
                    ..req(&["a"])
                },
                "unknown scheduler 'heun'",
            ),
            (
                GenerationRequest {
                    eta: Some(0.5),
                    ..req(&["a"])
                },
                "only applies to the ddim",
            ),
            (
                GenerationRequest {
                    num_images_per_prompt: Some(17),
                    ..req(&["a"])
                },
                "'num_images_per_prompt'",
            ),
            (
                GenerationRequest {
                    num_images_per_prompt: Some(9),
                    ..req(&["a", "b"])
                },
                "18 images",
            ),
            (
                GenerationRequest {
                    seeds: Some(vec![1, 2, 3]),
                    ..req(&["a", "b"])
                },
                "'seed' has 3",
            ),
            (
                GenerationRequest {
                    output_format: Some("jpeg".into()),
                    ..req(&["a"])
                },
                "'output_format'",
            ),
            (req(&vec!["a"; 17]), "17 prompts"),
            (req(&["x".repeat(5000).as_str()]), "5000 bytes"),
            (
                GenerationRequest {
                    latents: Some(LatentsInput {
                        shape: vec![1, 4, 4, 4],
                        data: vec![0.0; 64],
                    }),
                    ..req(&["a"])
                },
                "needs [1, 4, 8, 8]",
            ),
        ];
        for (r, expected) in cases {
            let err = resolve(&r).unwrap_err();
            assert!(err.0.contains(expected), "{err} (expected '{expected}')");
        }
    }

    #[test]
    fn defaults_outside_the_limits_are_refused_and_sizes_never_overflow() {
        let limits = Limits {
            max_num_inference_steps: 20,
            max_height: 512,
            ..Limits::default()
        };
        let defaults = GenerationDefaults {
            num_inference_steps: 30,
            ..Default::default()
        };
        let err = req(&["a"])
            .resolve(&model(), &defaults, &limits, || 1)
            .unwrap_err();
        assert!(
            err.0
                .contains("'num_inference_steps' is 30 (the model's default)"),
            "{err}"
        );

        // A model whose native size is absurd: its default size is refused, not multiplied.
        let huge = ModelDescription {
            native_height: 1 << 40,
            native_width: 1 << 40,
            ..model()
        };
        let err = req(&["a"])
            .resolve(
                &huge,
                &GenerationDefaults::default(),
                &Limits::default(),
                || 1,
            )
            .unwrap_err();
        assert!(err.0.contains("(the model's default)"), "{err}");
        let wide = Limits {
            max_height: usize::MAX,
            max_width: usize::MAX,
            ..Limits::default()
        };
        let r = GenerationRequest {
            height: Some(1 << 40),
            width: Some(1 << 40),
            ..req(&["a"])
        };
        let err = r
            .resolve(&model(), &GenerationDefaults::default(), &wide, || 1)
            .unwrap_err();
        assert!(err.0.contains("pixels"), "{err}");
    }

    #[test]
    fn latents_are_split_per_image() {
        let data: Vec<f32> = (0..512).map(|i| i as f32).collect();
        let r = GenerationRequest {
            latents: Some(LatentsInput {
                shape: vec![2, 4, 8, 8],
                data,
            }),
            ..req(&["a", "b"])
        };
        let job = resolve(&r).unwrap();
        assert_eq!(job.images[1].latents.as_ref().unwrap().data[0], 256.0);
    }

    fn fixture(name: &str) -> Vec<u8> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::read(dir.join("../../models/reference/img2img").join(name)).unwrap()
    }

    fn with_image(file: Vec<u8>) -> GenerationRequest {
        GenerationRequest {
            images: Some(vec![file]),
            ..req(&["a", "b"])
        }
    }

    #[test]
    fn an_image_selects_image_to_image_at_its_own_size() {
        for file in ["input_0.png", "input_0.jpg", "input_0.webp"] {
            let job = resolve(&with_image(fixture(file))).unwrap();
            let s = &job.settings;
            assert_eq!(
                s.image_to_image,
                Some(ImageToImage {
                    strength: 0.8,
                    task: ImageTask::Img2Img
                }),
                "{file}"
            );
            assert_eq!((s.height, s.width), (64, 64));
            // One image for both prompts.
            assert_eq!(job.images[0].image, job.images[1].image);
            assert_eq!(job.images[0].image.as_ref().unwrap().rgb.len(), 64 * 64 * 3);
        }
        // 67×61 rounds down to 64×56; an explicit size resizes to it.
        let odd = resolve(&with_image(fixture("input_odd.png"))).unwrap();
        assert_eq!((odd.settings.width, odd.settings.height), (64, 56));
        let sized = GenerationRequest {
            height: Some(32),
            width: Some(48),
            ..with_image(fixture("input_odd.png"))
        };
        let job = resolve(&sized).unwrap();
        let image = job.images[0].image.as_ref().unwrap();
        assert_eq!((image.width, image.height), (48, 32));
    }

    #[test]
    fn bad_image_inputs_are_400s_naming_the_field() {
        let png = || fixture("input_0.png");
        let cases: Vec<(GenerationRequest, &str)> = vec![
            (
                with_image(fixture("bomb.png")),
                "input 'image' element 0 declares 100000×100000 pixels",
            ),
            (
                with_image(fixture("truncated.jpg")),
                "input 'image' element 0 cannot be decoded",
            ),
            (
                with_image(b"GIF89a".to_vec()),
                "input 'image' element 0 is not a PNG, JPEG or WebP",
            ),
            (
                GenerationRequest {
                    images: Some(vec![png(), png(), png()]),
                    ..req(&["a", "b"])
                },
                "input 'image' has 3 element(s)",
            ),
            (
                GenerationRequest {
                    strength: Some(0.0),
                    ..with_image(png())
                },
                "'strength' is 0;",
            ),
            (
                GenerationRequest {
                    strength: Some(1.5),
                    ..with_image(png())
                },
                "'strength' is 1.5;",
            ),
            (
                GenerationRequest {
                    strength: Some(f64::NAN),
                    ..with_image(png())
                },
                "'strength' is NaN;",
            ),
            (
                GenerationRequest {
                    strength: Some(0.5),
                    ..req(&["a"])
                },
                "'strength' (0.5) applies only to image-to-image",
            ),
            (
                GenerationRequest {
                    strength: Some(0.05),
                    num_inference_steps: Some(10),
                    ..with_image(png())
                },
                "'strength' 0.05 with 10 'num_inference_steps' runs no step",
            ),
        ];
        for (r, expected) in cases {
            let err = resolve(&r).unwrap_err();
            assert!(err.0.starts_with(expected), "{expected:?}: got {err}");
        }
        let no_encoder = ModelDescription {
            default_strength: None,
            masks: Default::default(),
            ..model()
        };
        let err = with_image(png())
            .resolve(
                &no_encoder,
                &GenerationDefaults::default(),
                &Limits::default(),
                || 1,
            )
            .unwrap_err();
        assert!(err.0.contains("this model takes no input images"), "{err}");
    }

    #[test]
    fn strength_picks_the_first_step_as_diffusers_get_timesteps() {
        // (steps, strength) -> first index, as `steps - min(int(steps * strength), steps)`.
        for (steps, strength, first) in [
            (10, 0.35, 7),
            (10, 0.8, 2),
            (10, 1.0, 0),
            (50, 0.3, 35),
            (3, 0.99, 1),
        ] {
            assert_eq!(
                ImageToImage {
                    strength,
                    task: ImageTask::Img2Img
                }
                .first_step(steps),
                first,
                "{steps} {strength}"
            );
        }
    }

    #[test]
    fn a_mask_selects_inpainting_at_the_models_size() {
        let r = GenerationRequest {
            mask_images: Some(vec![fixture("mask_odd.png")]),
            ..with_image(fixture("input_odd.png"))
        };
        let job = resolve(&r).unwrap();
        let s = &job.settings;
        // diffusers' inpaint pipeline: the model's size, strength 1.
        assert_eq!((s.width, s.height), (64, 64));
        assert_eq!(
            s.image_to_image,
            Some(ImageToImage {
                strength: 1.0,
                task: ImageTask::Inpaint
            })
        );
        let mask = job.images[1].mask.as_ref().unwrap();
        assert_eq!(
            (mask.width, mask.height, mask.repaint.len()),
            (64, 64, 64 * 64)
        );
        assert!(mask.repaint.iter().any(|&r| r) && mask.repaint.iter().any(|&r| !r));
    }

    #[test]
    fn a_transparency_mask_repaints_its_transparent_pixels() {
        // Left half transparent, right half opaque, in an RGBA PNG as OpenAI's edits take it.
        let mut rgba = image::RgbaImage::new(64, 64);
        for (x, _, p) in rgba.enumerate_pixels_mut() {
            *p = image::Rgba([255, 255, 255, if x < 32 { 0 } else { 255 }]);
        }
        let mut png = Vec::new();
        rgba.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let r = GenerationRequest {
            mask_images: Some(vec![png]),
            mask_meaning: MaskMeaning::Transparent,
            ..with_image(fixture("input_odd.png"))
        };
        let mask = resolve(&r).unwrap().images[0].mask.clone().unwrap();
        let left = |i: usize| i % 64 < 32;
        assert!(mask.repaint.iter().enumerate().all(|(i, &r)| r == left(i)));
        // The same file read as a diffusers mask (white repaints) repaints everything.
        let white = GenerationRequest {
            mask_meaning: MaskMeaning::White,
            ..r
        };
        let mask = resolve(&white).unwrap().images[0].mask.clone().unwrap();
        assert!(mask.repaint.iter().all(|&r| r));
    }

    #[test]
    fn masks_are_refused_where_they_cannot_apply() {
        let with_mask = |model: &ModelDescription, r: GenerationRequest| {
            r.resolve(
                model,
                &GenerationDefaults::default(),
                &Limits::default(),
                || 1,
            )
        };
        let mask = || Some(vec![fixture("mask_0.png")]);
        let cases: Vec<(ModelDescription, GenerationRequest, &str)> = vec![
            (
                model(),
                GenerationRequest {
                    mask_images: mask(),
                    ..req(&["a"])
                },
                "input 'mask_image' needs an 'image' input",
            ),
            (
                ModelDescription {
                    masks: MaskInput::NotServed,
                    ..model()
                },
                GenerationRequest {
                    mask_images: mask(),
                    ..with_image(fixture("input_0.png"))
                },
                "input 'mask_image': this model does not serve inpainting",
            ),
            (
                ModelDescription {
                    masks: MaskInput::Required,
                    ..model()
                },
                with_image(fixture("input_0.png")),
                "this is an inpainting model",
            ),
            (
                ModelDescription {
                    masks: MaskInput::Required,
                    ..model()
                },
                req(&["a"]),
                "this is an inpainting model",
            ),
            (
                model(),
                GenerationRequest {
                    mask_images: Some(vec![fixture("bomb.png")]),
                    ..with_image(fixture("input_0.png"))
                },
                "input 'mask_image' element 0 declares 100000×100000 pixels",
            ),
        ];
        for (m, r, expected) in cases {
            let err = with_mask(&m, r).unwrap_err();
            assert!(err.0.starts_with(expected), "{expected:?}: got {err}");
        }
    }

    #[test]
    fn encoder_noise_needs_an_image_and_one_draw_per_encoding() {
        let noise = |shape: Vec<usize>| {
            let n = shape.iter().product();
            Some(LatentsInput {
                shape,
                data: vec![0.25; n],
            })
        };
        let job = resolve(&GenerationRequest {
            encoder_noise: noise(vec![2, 1, 4, 8, 8]),
            ..with_image(fixture("input_0.png"))
        })
        .unwrap();
        assert_eq!(job.images[1].encoder_noise.len(), 1);
        assert_eq!(job.images[1].encoder_noise[0].data.len(), 256);
        // A 9-channel inpainting UNet below strength 1 encodes the image and the masked image.
        let nine = ModelDescription {
            masks: MaskInput::Required,
            ..model()
        };
        let inpaint = GenerationRequest {
            mask_images: Some(vec![fixture("mask_0.png")]),
            strength: Some(0.5),
            encoder_noise: noise(vec![2, 2, 4, 8, 8]),
            ..with_image(fixture("input_0.png"))
        };
        let job = inpaint
            .resolve(
                &nine,
                &GenerationDefaults::default(),
                &Limits::default(),
                || 1,
            )
            .unwrap();
        assert_eq!(job.images[0].encoder_noise.len(), 2);
        for (r, expected) in [
            (
                GenerationRequest {
                    encoder_noise: noise(vec![2, 1, 4, 8, 8]),
                    ..req(&["a", "b"])
                },
                "input 'encoder_noise' applies only with an 'image' input",
            ),
            (
                GenerationRequest {
                    encoder_noise: noise(vec![2, 2, 4, 8, 8]),
                    ..with_image(fixture("input_0.png"))
                },
                "input 'encoder_noise' has shape [2, 2, 4, 8, 8]; this request needs [2, 1, 4, 8, 8]",
            ),
        ] {
            let err = resolve(&r).unwrap_err();
            assert!(err.0.starts_with(expected), "{expected:?}: got {err}");
        }
    }
}
