//! A decoded generation request, the model's defaults and limits, and the validation that
//! turns the first into a [`GenerationJob`] before anything is queued.

use serde_json::{Map, Value};

use crate::generator::{GenerationJob, ImageSpec, Latents, ModelDescription};

/// What the client asked for; `None` = use the model's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationRequest {
    pub prompts: Vec<String>,
    pub negative_prompts: Option<Vec<String>>,
    pub num_inference_steps: Option<i64>,
    pub guidance_scale: Option<f64>,
    pub height: Option<i64>,
    pub width: Option<i64>,
    pub seeds: Option<Vec<u64>>,
    pub num_images_per_prompt: Option<i64>,
    pub scheduler: Option<String>,
    pub eta: Option<f64>,
    /// `(shape [B, C, H/f, W/f], row-major data)`.
    pub latents: Option<(Vec<usize>, Vec<f32>)>,
    pub output_format: Option<String>,
}

/// Per-model generation defaults (`parameters.extra.defaults` in model-settings.json).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDefaults {
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    /// `None`: the model's own scheduler config.
    pub scheduler: Option<String>,
    /// `None`: the model's native size.
    pub height: Option<usize>,
    pub width: Option<usize>,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        Self {
            num_inference_steps: 30,
            guidance_scale: 7.5,
            scheduler: None,
            height: None,
            width: None,
        }
    }
}

/// Per-model bounds (`parameters.extra.limits`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_num_inference_steps: usize,
    /// Prompts in one request.
    pub max_prompts: usize,
    /// Images in one request (prompts × num_images_per_prompt).
    pub max_images: usize,
    pub max_height: usize,
    pub max_width: usize,
    /// Height × width.
    pub max_pixels: usize,
    /// UTF-8 bytes of one prompt or negative prompt.
    pub max_prompt_bytes: usize,
    pub max_guidance_scale: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_num_inference_steps: 150,
            max_prompts: 16,
            max_images: 16,
            max_height: 2048,
            max_width: 2048,
            max_pixels: 1024 * 1024,
            max_prompt_bytes: 4096,
            max_guidance_scale: 100.0,
        }
    }
}

/// A problem with `parameters.extra` in model-settings.json.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ExtraError(pub String);

fn get_usize(
    obj: &Map<String, Value>,
    key: &str,
    section: &str,
) -> Result<Option<usize>, ExtraError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0 && n <= u32::MAX as u64)
            .map(|n| Some(n as usize))
            .ok_or_else(|| {
                ExtraError(format!(
                    "parameters.extra.{section}.{key} must be a positive integer, got {v}"
                ))
            }),
    }
}

fn get_f64(obj: &Map<String, Value>, key: &str, section: &str) -> Result<Option<f64>, ExtraError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(Some)
            .ok_or_else(|| {
                ExtraError(format!(
                    "parameters.extra.{section}.{key} must be a non-negative number, got {v}"
                ))
            }),
    }
}

fn section<'a>(
    extra: &'a Map<String, Value>,
    name: &str,
    keys: &[&str],
) -> Result<Option<&'a Map<String, Value>>, ExtraError> {
    match extra.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => {
            if let Some(k) = m.keys().find(|k| !keys.contains(&k.as_str())) {
                return Err(ExtraError(format!(
                    "unknown key parameters.extra.{name}.{k}; allowed: {}",
                    keys.join(", ")
                )));
            }
            Ok(Some(m))
        }
        Some(v) => Err(ExtraError(format!(
            "parameters.extra.{name} must be an object, got {v}"
        ))),
    }
}

impl GenerationDefaults {
    pub const KEYS: &'static [&'static str] = &[
        "num_inference_steps",
        "guidance_scale",
        "scheduler",
        "height",
        "width",
    ];

    pub fn from_extra(extra: &Map<String, Value>) -> Result<Self, ExtraError> {
        let mut d = Self::default();
        let Some(m) = section(extra, "defaults", Self::KEYS)? else {
            return Ok(d);
        };
        if let Some(n) = get_usize(m, "num_inference_steps", "defaults")? {
            d.num_inference_steps = n;
        }
        if let Some(g) = get_f64(m, "guidance_scale", "defaults")? {
            d.guidance_scale = g;
        }
        d.height = get_usize(m, "height", "defaults")?;
        d.width = get_usize(m, "width", "defaults")?;
        d.scheduler = match m.get("scheduler") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                return Err(ExtraError(format!(
                    "parameters.extra.defaults.scheduler must be a string, got {v}"
                )));
            }
        };
        Ok(d)
    }
}

impl Limits {
    pub const KEYS: &'static [&'static str] = &[
        "max_num_inference_steps",
        "max_prompts",
        "max_images",
        "max_height",
        "max_width",
        "max_pixels",
        "max_prompt_bytes",
        "max_guidance_scale",
    ];

    pub fn from_extra(extra: &Map<String, Value>) -> Result<Self, ExtraError> {
        let mut l = Self::default();
        let Some(m) = section(extra, "limits", Self::KEYS)? else {
            return Ok(l);
        };
        let fields: [(&str, &mut usize); 7] = [
            ("max_num_inference_steps", &mut l.max_num_inference_steps),
            ("max_prompts", &mut l.max_prompts),
            ("max_images", &mut l.max_images),
            ("max_height", &mut l.max_height),
            ("max_width", &mut l.max_width),
            ("max_pixels", &mut l.max_pixels),
            ("max_prompt_bytes", &mut l.max_prompt_bytes),
        ];
        for (key, slot) in fields {
            if let Some(v) = get_usize(m, key, "limits")? {
                *slot = v;
            }
        }
        if let Some(g) = get_f64(m, "max_guidance_scale", "limits")? {
            l.max_guidance_scale = g;
        }
        Ok(l)
    }
}

/// A request that is out of bounds for this model: a 400 naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

fn invalid(msg: impl Into<String>) -> ValidationError {
    ValidationError(msg.into())
}

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

impl GenerationRequest {
    /// Applies defaults and checks every field against the model and its limits.
    pub fn resolve(
        &self,
        model: &ModelDescription,
        defaults: &GenerationDefaults,
        limits: &Limits,
        mut random_seed: impl FnMut() -> u64,
    ) -> Result<GenerationJob, ValidationError> {
        let n_prompts = self.prompts.len();
        if n_prompts == 0 {
            return Err(invalid("'prompt' must hold at least one prompt"));
        }
        if n_prompts > limits.max_prompts {
            return Err(invalid(format!(
                "'prompt' holds {n_prompts} prompts; at most {} are allowed per request",
                limits.max_prompts
            )));
        }
        for (i, p) in self.prompts.iter().enumerate() {
            if p.len() > limits.max_prompt_bytes {
                return Err(invalid(format!(
                    "'prompt' element {i} is {} bytes; at most {} bytes are allowed",
                    p.len(),
                    limits.max_prompt_bytes
                )));
            }
        }
        let negatives: Vec<String> = match &self.negative_prompts {
            None => vec![String::new(); n_prompts],
            Some(v) if v.len() == 1 => vec![v[0].clone(); n_prompts],
            Some(v) if v.len() == n_prompts => v.clone(),
            Some(v) => {
                return Err(invalid(format!(
                    "'negative_prompt' has {} elements; give one for all prompts or one per prompt ({n_prompts})",
                    v.len()
                )));
            }
        };
        for (i, p) in negatives.iter().enumerate() {
            if p.len() > limits.max_prompt_bytes {
                return Err(invalid(format!(
                    "'negative_prompt' element {i} is {} bytes; at most {} bytes are allowed",
                    p.len(),
                    limits.max_prompt_bytes
                )));
            }
        }

        // Defaults are held to the limits too: a model whose defaults exceed them must not serve
        // such requests quietly.
        let (steps, source) = match self.num_inference_steps {
            None => (i128::from(defaults.num_inference_steps as u64), DEFAULT),
            Some(n) => (i128::from(n), ""),
        };
        if steps < 1 || steps > limits.max_num_inference_steps as i128 {
            return Err(invalid(format!(
                "'num_inference_steps' is {steps}{source}; it must be between 1 and {}",
                limits.max_num_inference_steps
            )));
        }
        let steps = steps as usize;

        let guidance_scale = self.guidance_scale.unwrap_or(defaults.guidance_scale);
        if !guidance_scale.is_finite()
            || guidance_scale < 0.0
            || guidance_scale > limits.max_guidance_scale
        {
            return Err(invalid(format!(
                "'guidance_scale' is {guidance_scale}; it must be a finite number between 0 and {}",
                limits.max_guidance_scale
            )));
        }

        let size = |name: &str,
                    given: Option<i64>,
                    default: usize,
                    max: usize|
         -> Result<usize, ValidationError> {
            let (v, source) = match given {
                None => (default as i128, DEFAULT),
                Some(v) => (i128::from(v), ""),
            };
            if v < 8 || v % 8 != 0 || v > max as i128 {
                return Err(invalid(format!(
                    "'{name}' is {v}{source}; it must be a multiple of 8 between 8 and {max}"
                )));
            }
            Ok(v as usize)
        };
        let height = size(
            "height",
            self.height,
            defaults.height.unwrap_or(model.native_height),
            limits.max_height,
        )?;
        let width = size(
            "width",
            self.width,
            defaults.width.unwrap_or(model.native_width),
            limits.max_width,
        )?;
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
        if height % model.vae_scale_factor != 0 || width % model.vae_scale_factor != 0 {
            return Err(invalid(format!(
                "'height' and 'width' must be multiples of {} for this model",
                model.vae_scale_factor
            )));
        }

        // At most `max_prompts` × `max_images`, both bounded by u32.
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
        let n_images = n_prompts * per_prompt;
        if n_images > limits.max_images {
            return Err(invalid(format!(
                "the request asks for {n_images} images ({n_prompts} prompts × {per_prompt}); at most {} are allowed",
                limits.max_images
            )));
        }

        let scheduler = self
            .scheduler
            .clone()
            .or_else(|| defaults.scheduler.clone())
            .unwrap_or_else(|| model.default_scheduler.clone());
        if !model.schedulers.contains(&scheduler) {
            return Err(invalid(format!(
                "unknown scheduler '{scheduler}'; available: {}",
                model.schedulers.join(", ")
            )));
        }

        let eta = self.eta.unwrap_or(0.0);
        if !eta.is_finite() || !(0.0..=1.0).contains(&eta) {
            return Err(invalid(format!(
                "'eta' is {eta}; it must be between 0 and 1"
            )));
        }
        if eta != 0.0 && scheduler != "ddim" {
            return Err(invalid(format!(
                "'eta' only applies to the ddim scheduler, not '{scheduler}'"
            )));
        }

        if let Some(fmt) = &self.output_format
            && !fmt.eq_ignore_ascii_case("png")
        {
            return Err(invalid(format!(
                "'output_format' is '{fmt}'; only 'png' is supported"
            )));
        }

        let seeds: Vec<u64> = match &self.seeds {
            None => {
                let first = random_seed();
                (0..n_images as u64)
                    .map(|i| first.wrapping_add(i))
                    .collect()
            }
            Some(s) if s.len() == 1 => (0..n_images as u64).map(|i| s[0].wrapping_add(i)).collect(),
            Some(s) if s.len() == n_images => s.clone(),
            Some(s) => {
                return Err(invalid(format!(
                    "'seed' has {} elements; give one seed or one per image ({n_images})",
                    s.len()
                )));
            }
        };

        let latent_shape = [
            model.latent_channels,
            height / model.vae_scale_factor,
            width / model.vae_scale_factor,
        ];
        let latents: Vec<Option<Latents>> = match &self.latents {
            None => vec![None; n_images],
            Some((shape, data)) => {
                let expected = [n_images, latent_shape[0], latent_shape[1], latent_shape[2]];
                if shape.as_slice() != expected {
                    return Err(invalid(format!(
                        "input 'latents' has shape {shape:?}; this request needs {expected:?} (images, channels, height/{f}, width/{f})",
                        f = model.vae_scale_factor
                    )));
                }
                let per = latent_shape.iter().product::<usize>();
                data.chunks(per)
                    .map(|c| {
                        Some(Latents {
                            shape: latent_shape,
                            data: c.to_vec(),
                        })
                    })
                    .collect()
            }
        };

        let mut images = Vec::with_capacity(n_images);
        let mut k = 0;
        for (prompt, negative) in self.prompts.iter().zip(&negatives) {
            for _ in 0..per_prompt {
                images.push(ImageSpec {
                    prompt: prompt.clone(),
                    negative_prompt: negative.clone(),
                    seed: seeds[k],
                    latents: latents[k].clone(),
                });
                k += 1;
            }
        }
        Ok(GenerationJob {
            images,
            num_inference_steps: steps,
            guidance_scale,
            height,
            width,
            scheduler,
            eta,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model() -> ModelDescription {
        ModelDescription {
            native_height: 64,
            native_width: 64,
            vae_scale_factor: 8,
            latent_channels: 4,
            default_scheduler: "pndm".into(),
            schedulers: vec!["pndm".into(), "ddim".into(), "euler".into()],
            family: "sd1".into(),
            dtype: "f32".into(),
            device: "cpu".into(),
        }
    }

    fn req(prompts: &[&str]) -> GenerationRequest {
        GenerationRequest {
            prompts: prompts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn resolve(r: &GenerationRequest) -> Result<GenerationJob, ValidationError> {
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
        assert_eq!(
            (job.height, job.width, job.num_inference_steps),
            (64, 64, 30)
        );
        assert_eq!(job.scheduler, "pndm");
        assert_eq!(job.guidance_scale, 7.5);
        let seeds: Vec<u64> = job.images.iter().map(|i| i.seed).collect();
        assert_eq!(seeds, [100, 101]);
        assert_eq!(job.images[1].negative_prompt, "");
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
            .map(|i| (i.prompt.as_str(), i.negative_prompt.as_str(), i.seed))
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
                    latents: Some((vec![1, 4, 4, 4], vec![0.0; 64])),
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
            latents: Some((vec![2, 4, 8, 8], data)),
            ..req(&["a", "b"])
        };
        let job = resolve(&r).unwrap();
        assert_eq!(job.images[1].latents.as_ref().unwrap().data[0], 256.0);
    }

    #[test]
    fn extra_sections_parse_and_reject_typos() {
        let extra = json!({"defaults": {"num_inference_steps": 12, "scheduler": "ddim"},
                           "limits": {"max_num_inference_steps": 50, "max_images": 4}});
        let extra = extra.as_object().unwrap();
        assert_eq!(
            GenerationDefaults::from_extra(extra)
                .unwrap()
                .num_inference_steps,
            12
        );
        assert_eq!(Limits::from_extra(extra).unwrap().max_images, 4);
        let bad = json!({"limits": {"max_step": 5}});
        assert!(
            Limits::from_extra(bad.as_object().unwrap())
                .unwrap_err()
                .0
                .contains("max_step")
        );
        let bad = json!({"defaults": {"num_inference_steps": -3}});
        assert!(GenerationDefaults::from_extra(bad.as_object().unwrap()).is_err());
    }
}
