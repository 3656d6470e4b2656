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
    /// Image-to-image and inpainting: the standard-normal draws of the VAE encoder's latent
    /// samples, `[images, encodings, C, H/f, W/f]` (the counterpart of `latents` for the
    /// encoder), so that a result can be compared with diffusers draw for draw.
    pub encoder_noise: Option<LatentsInput>,
    pub output_format: Option<String>,
    /// SDXL: the second text encoder's prompts (one for all prompts, or one per prompt).
    pub prompts_2: Option<Vec<String>>,
    pub negative_prompts_2: Option<Vec<String>>,
    /// SDXL's micro-conditioning.
    pub sizes: SizeConditioningInput,
    /// SDXL refiners: the aesthetic scores of the prompt and the negative rows.
    pub aesthetic_score: Option<f64>,
    pub negative_aesthetic_score: Option<f64>,
    /// Image-to-image: the input images as encoded files (PNG, JPEG or WebP), one for all
    /// prompts or one per prompt. Giving them selects the mode.
    pub images: Option<Vec<Vec<u8>>>,
    /// Inpainting: the masks as encoded files, one for all prompts or one per prompt. Giving
    /// them (with images) selects the mode.
    pub mask_images: Option<Vec<Vec<u8>>>,
    /// Which pixels of a mask file are repainted.
    pub mask_meaning: MaskMeaning,
    /// How far image-to-image departs from the image, in (0, 1].
    pub strength: Option<f64>,
    /// LoRA adapters by name, each with its scale (`None`: the declared one); `None`: the
    /// model's default adapters.
    pub lora: Option<Vec<(String, Option<f64>)>>,
}

/// How a mask file marks the pixels to repaint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MaskMeaning {
    /// diffusers' masks: white pixels (luminance at least ½) are repainted.
    #[default]
    White,
    /// OpenAI's image edits: transparent pixels (alpha below 128) are repainted.
    Transparent,
}

/// SDXL's size and crop conditioning as asked: `[height, width]` and `[top, left]` pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SizeConditioningInput {
    pub original_size: Option<[i64; 2]>,
    pub crops_coords_top_left: Option<[i64; 2]>,
    pub target_size: Option<[i64; 2]>,
    pub negative_original_size: Option<[i64; 2]>,
    pub negative_crops_coords_top_left: Option<[i64; 2]>,
    pub negative_target_size: Option<[i64; 2]>,
}

impl SizeConditioningInput {
    /// Every field with its contract name.
    pub fn named(&self) -> [(&'static str, Option<[i64; 2]>); 6] {
        [
            ("original_size", self.original_size),
            ("crops_coords_top_left", self.crops_coords_top_left),
            ("target_size", self.target_size),
            ("negative_original_size", self.negative_original_size),
            (
                "negative_crops_coords_top_left",
                self.negative_crops_coords_top_left,
            ),
            ("negative_target_size", self.negative_target_size),
        ]
    }
}

/// Explicit initial latents of every image, `[B, C, H/f, W/f]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentsInput {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}
