//! Stable Diffusion (diffusers folders) on candle. The only crate that imports candle.
//!
//! # Layout
//! - [`pipeline`]: [`StableDiffusion`], the `Generator` for a diffusers SD 1.x / 2.x folder,
//!   run in stages: [`prompt`] (prompts → [`conditioning::Conditioning`]), [`denoise`] (the
//!   loop over a scheduler, classifier-free guidance, previews), then VAE decode.
//! - [`load`]: reading a folder into a [`StableDiffusion`].
//! - [`config`]: `model_index.json`, UNet, VAE and text encoder configs; refuses what we cannot
//!   run exactly as diffusers does.
//! - [`weights`]: safetensors discovery (fp16 variants, shards), validation and loading.
//! - [`text_encoder`]: batched CLIP text transformer.
//! - [`unet`]: the UNet, assembled block by block as diffusers runs it (exact GELU); on the CPU
//!   the items of a batch run in parallel.
//! - [`vae`]: the VAE decoder and encoder built from the parsed config.
//! - [`image_to_image`]: input images to the clean latents image-to-image starts from.
//! - [`inpaint`]: masks, and what inpainting adds to the denoising loop (9-channel UNet
//!   conditioning, or blending the known region back for a plain UNet).
//! - [`attention`]: the one scaled dot-product attention of the UNet, VAE and text encoder,
//!   with a kernel per device and dtype (on CUDA optionally the Triton flash-attention kernel
//!   of `kernels/`), and [`attention::check`], the device test of those kernels.
//! - [`conv`]: 2D convolution, chunked on the CPU.
//! - [`layers`]: linear, group norm (+SiLU), GEGLU, softmax and resnet blocks, with
//!   fused CPU kernels in F32 and candle's ops elsewhere.
//! - [`image`]: diffusers' post-processing, 8-bit RGB and PNG.
//! - [`device`]: device/dtype selection ([`LoadOptions`]); all CUDA-specific code.
//! - [`memory`]: the allocator tuning the CPU pipeline wants.
//! - [`error`]: [`PipelineError`], load-time errors naming the file and key or tensor.
//! - [`noise`]: seeded per-image Gaussian noise (host side).
//! - [`tokenizer`]: CLIP BPE tokenizer from `vocab.json` + `merges.txt`.
//! - `simd`: the CPU kernels' inner loops compiled for AVX-512 / AVX2 and picked at run time.
//! - [`schedulers`]: DDIM, PNDM, Euler, Euler Ancestral, DPM++ 2M (Karras), LMS, UniPC.
//! - [`random_model`]: diffusers folders with seeded random weights at real sizes (benchmarks).
//! - [`warm_up`]: a first generation at load on a GPU, before the model reports ready.
//! - [`profile`]: per-stage device times of a generation, when asked for (benchmarks).

pub mod attention;
pub mod conditioning;
pub mod config;
pub mod conv;
pub mod denoise;
pub mod device;
pub mod error;
pub mod image;
pub mod image_to_image;
pub mod inpaint;
pub mod layers;
pub mod load;
pub mod lora;
pub mod memory;
pub mod noise;
pub mod pipeline;
pub mod profile;
pub mod prompt;
pub mod random_model;
pub mod schedulers;
mod simd;
pub mod text_encoder;
pub mod threads;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod warm_up;
pub mod weights;
pub mod working_set;

/// candle's tensor type, for tools that drive the stages directly (benchmarks).
pub use candle_core::{Device, Tensor};
pub use device::LoadOptions;
pub use error::PipelineError;
pub use pipeline::StableDiffusion;

/// What the process sets up once for the CPU pipeline: the allocator keeps freed blocks
/// ([`memory::keep_freed_blocks`]) and candle's idle threads spin briefly
/// ([`threads::limit_idle_spinning`]).
///
/// # Safety
/// Call it at start, before any other thread runs: it changes the environment.
pub unsafe fn prepare_process() {
    memory::keep_freed_blocks();
    // SAFETY: no other thread runs yet, as the caller promises.
    unsafe { threads::limit_idle_spinning() };
}
