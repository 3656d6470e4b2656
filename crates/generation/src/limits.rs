//! A model's generation defaults and the bounds every request is held to (both from
//! `parameters.extra` of its model-settings.json).

/// Per-model generation defaults (`parameters.extra.defaults`).
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
