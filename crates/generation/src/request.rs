//! A decoded generation request: what the client asked for, before the model's defaults and
//! limits are applied. Every transport's decoder produces this one type.

/// What the client asked for; `None` = use the model's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationRequest {
    pub prompts: Vec<String>,
    /// One for all prompts, or one per prompt.
    pub negative_prompts: Option<Vec<String>>,
    pub num_inference_steps: Option<i64>,
    pub guidance_scale: Option<f64>,
    pub height: Option<i64>,
    pub width: Option<i64>,
    /// One seed, or one per generated image.
    pub seeds: Option<Vec<u64>>,
    pub num_images_per_prompt: Option<i64>,
    pub scheduler: Option<String>,
    pub eta: Option<f64>,
    pub latents: Option<LatentsInput>,
    pub output_format: Option<String>,
}

/// Explicit initial latents of every image, `[B, C, H/f, W/f]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentsInput {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}
