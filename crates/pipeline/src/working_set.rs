//! How much memory a generation needs besides the loaded weights: the estimate the engine's
//! memory budget admits batches by.
//!
//! The estimate follows each network's forward pass as this crate runs it and counts the
//! tensors alive at once, in elements: the UNet's skip connections, held from the down path to
//! the up path, plus the largest layer's own temporaries (a resnet's norm, convolutions and
//! shortcut; a transformer's q/k/v, packed keys and its GEGLU feed-forward, 12 widths wide).
//! A job's peak is the largest of its stages, each with what the stage carries (conditioning,
//! latents, decoded images): prompt encoding, the VAE encoder (image-to-image), the denoising
//! loop, and the VAE decoder at full size. On the CPU attention is tiled, so no stage holds a
//! `tokens × tokens` score matrix; a GPU's attention holds its scores and probabilities.
//!
//! Batch items: the VAE encodes one image at a time, and on the CPU decodes one at a time; on
//! the CPU the UNet runs at most one batch item per thread at once
//! ([`crate::unet::UNet::forward`]), so its working set grows with the thread count, not with
//! the batch; a GPU runs the whole batch at once through the UNet and the VAE decoder.
//!
//! The layer multipliers are upper bounds read off the code, checked against the heap peaks a
//! counting allocator measures (`tests/working_set.rs`): the estimate is never below the
//! measured peak and within a small factor of it.

use sdserve_generation::JobSettings;

use crate::config::{UNetConfig, VaeConfig};
use crate::prompt::TextTower;

/// The largest buffer a CPU kernel keeps per thread ([`crate::memory::with_scratch`]): a
/// convolution's patch matrix chunk or one of its two Winograd plane sets.
const CHUNK: u64 = crate::conv::CHUNK_ELEMS as u64;

/// The walk counts tensors, not what the allocator adds to them (alignment, rounding, small
/// temporaries it does not follow): an eighth more. The measured peaks come within 7% of the
/// walk at their closest.
const MARGIN_DIVISOR: u64 = 8;

/// Tokens a CLIP text encoder runs on.
const TEXT_TOKENS: u64 = 77;

/// A batch's estimated peak, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The CPU kernels' per-thread buffers, which stay allocated once a request of this size
    /// has run.
    pub scratch: u64,
    /// The largest stage with what it carries.
    pub stages: u64,
    /// The job's merged copies of the layers its LoRA adapters adapt, held for the whole run.
    pub adapters: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.scratch + self.stages + self.adapters
    }
}

/// What the estimate needs to know about a loaded model, borrowed from it.
#[derive(Clone, Copy)]
pub(crate) struct WorkingSet<'a> {
    pub(crate) unet: &'a UNetConfig,
    pub(crate) vae: &'a VaeConfig,
    pub(crate) texts: &'a [TextTower],
    /// Bytes per element of the UNet and of the VAE.
    pub(crate) unet_bytes: u64,
    pub(crate) vae_bytes: u64,
    /// Where the model runs: the CPU's kernels (Winograd weights, per-thread scratch, one
    /// UNet batch item per thread) or a GPU's (im2col patch matrices, whole batches).
    pub(crate) cpu: bool,
    /// The spatial factor between image and latents.
    pub(crate) scale: usize,
}

/// A running count of elements alive and the most alive at once.
#[derive(Debug, Default, Clone, Copy)]
struct Live {
    held: u64,
    peak: u64,
}

impl Live {
    /// A tensor of `n` elements is kept.
    fn hold(&mut self, n: u64) {
        self.held += n;
        self.peak = self.peak.max(self.held);
    }

    fn release(&mut self, n: u64) {
        self.held = self.held.saturating_sub(n);
    }

    /// A layer runs over what is held, with `extra` elements of its own at its peak.
    fn layer(&mut self, extra: u64) {
        self.peak = self.peak.max(self.held + extra);
    }
}

/// A feature map's positions after `levels` stride-2 convolutions (each rounds up).
fn positions(h: usize, w: usize, levels: usize) -> u64 {
    let (mut h, mut w) = (h as u64, w as u64);
    for _ in 0..levels {
        h = h.div_ceil(2);
        w = w.div_ceil(2);
    }
    h * w
}

impl WorkingSet<'_> {
    /// What a batch of `images` images with `settings` needs at its peak, beyond the weights,
    /// with `threads` CPU threads.
    pub(crate) fn estimate(
        &self,
        settings: &JobSettings,
        images: usize,
        threads: usize,
    ) -> MemoryEstimate {
        let images = images.max(1) as u64;
        let rows = if settings.guidance_scale > 1.0 {
            2 * images
        } else {
            images
        };
        let (h, w) = (settings.height / self.scale, settings.width / self.scale);
        let pixels = (settings.height * settings.width) as u64;
        let latent = self.vae.latent_channels as u64 * positions(h, w, 0);
        let context = self
            .texts
            .iter()
            .map(|t| t.encoder.config().hidden_size as u64)
            .sum::<u64>();
        let conditioning = rows * TEXT_TOKENS * context * self.unet_bytes;

        let prompts = self.text_encoder(rows) * 4;
        // Latents, the guided model input, predictions and the scheduler's history.
        let loop_state = 16 * rows * latent * 4;
        let concurrent = if self.cpu && rows >= 2 && threads >= 2 {
            rows.min(threads as u64)
        } else {
            rows
        };
        let unet = concurrent * self.unet_item(h, w) * self.unet_bytes;
        let denoise = conditioning + loop_state + unet + self.unet_scores(h, w, rows);

        // Input images, masks and masked images as F32, and the encoder for one image.
        let image_inputs = settings
            .image_to_image
            .map(|_| images * 7 * pixels * 4 + self.vae_encoder(settings) * self.vae_bytes)
            .unwrap_or(0);
        // Each decoded image is kept, then concatenated and converted to floats and bytes.
        let decoded = 4 * images * 3 * pixels * 4;
        let decoding = if self.cpu { 1 } else { images };
        let decode = loop_state
            + decoded
            + decoding * (self.vae_decoder(h, w) * self.vae_bytes + self.vae_scores(h, w));

        let scratch = if self.cpu {
            // The pool's threads and the worker thread that calls into it.
            (threads as u64 + 1) * self.scratch_per_thread(settings) * 4
        } else {
            0
        };
        let stages = prompts
            .max(conditioning + image_inputs)
            .max(denoise)
            .max(decode);
        MemoryEstimate {
            scratch,
            stages: stages + stages / MARGIN_DIVISOR,
            // The model's to add: this knows its configs, not its adapters.
            adapters: 0,
        }
    }

    /// A GPU's largest UNet attention: the scores and probabilities of every head of every row
    /// at the widest level with attention, in F32 at most (bytes). None on the CPU (tiled).
    fn unet_scores(&self, h: usize, w: usize, rows: u64) -> u64 {
        if self.cpu {
            return 0;
        }
        let levels = self.unet.blocks.iter().enumerate();
        let widest = levels
            .filter(|(_, b)| b.down_cross_attn || b.up_cross_attn)
            .map(|(l, b)| b.heads as u64 * positions(h, w, l).pow(2))
            .max()
            .unwrap_or(0);
        2 * rows * widest * 4
    }

    /// A GPU's VAE mid-block attention for one image: one head over the latent positions.
    fn vae_scores(&self, h: usize, w: usize) -> u64 {
        if self.cpu {
            0
        } else {
            2 * positions(h, w, 0).pow(2) * 4
        }
    }

    /// The per-thread buffers of the CPU convolutions, which stay allocated between requests:
    /// two Winograd plane sets (16 values per 2×2 output tile and channel, chunked) for the
    /// widest map, at the latent sizes of the UNet and the image sizes of the VAE.
    fn scratch_per_thread(&self, settings: &JobSettings) -> u64 {
        let (h, w) = (settings.height / self.scale, settings.width / self.scale);
        let unet = self.unet.blocks.iter().enumerate().map(|(l, level)| {
            let wider = self.unet.blocks.get(l + 1).map_or(0, |b| b.out_channels);
            positions(h, w, l) * (level.out_channels + wider) as u64
        });
        // Decoder block i runs at 4^i times the latent positions, its upsampler at 4^(i+1).
        let channels: Vec<usize> = self.vae.block_out_channels.iter().rev().copied().collect();
        let latent = positions(h, w, 0);
        let vae = channels.iter().enumerate().map(|(i, &c)| {
            let c_in = if i == 0 { c } else { channels[i - 1] };
            let t = latent << (2 * i);
            let upsampled = if i + 1 < channels.len() {
                4 * t * c as u64
            } else {
                0
            };
            (t * c_in.max(c) as u64).max(upsampled)
        });
        let widest = unet.chain(vae).max().unwrap_or(0);
        2 * (4 * widest).min(CHUNK)
    }

    /// A convolution's own buffers beyond its input and output: on the CPU its weights in
    /// the Winograd domain (16 per kernel tap pair), on a GPU the im2col patch matrix.
    fn conv(&self, positions: u64, cin: usize, cout: usize) -> u64 {
        if self.cpu {
            16 * (cin * cout) as u64
        } else {
            9 * positions * cin as u64
        }
    }

    /// A resnet at `t` positions from `ci` to `co` channels: its shortcut, the normed input
    /// beside the first convolution's output, then four `co`-wide maps around the second
    /// (its input, norm and output, and the sum with the shortcut).
    fn resnet(&self, t: u64, ci: usize, co: usize) -> u64 {
        let (ci64, co64) = (ci as u64, co as u64);
        let shortcut = if ci != co { co64 } else { 0 };
        t * (shortcut + (ci64 + co64).max(4 * co64)) + self.conv(t, ci, co)
    }

    /// A spatial transformer at `t` positions and `c` channels: its normed input and tokens,
    /// each block's residual stream after attention and cross-attention, and in the
    /// feed-forward their norm with GEGLU's 8c-wide projection beside its 4c-wide gate.
    fn transformer(t: u64, c: usize) -> u64 {
        17 * t * c as u64
    }

    /// One UNet batch item at latent size `h × w`, in elements.
    fn unet_item(&self, h: usize, w: usize) -> u64 {
        let c = &self.unet;
        let n = c.blocks.len();
        let mut live = Live::default();
        let mut skips = Vec::with_capacity(3 * n + 1);
        let c0 = c.blocks[0].out_channels;
        let t0 = positions(h, w, 0);
        live.layer(self.conv(t0, c.in_channels, c0) + t0 * c.in_channels as u64);
        live.hold(t0 * c0 as u64);
        skips.push(t0 * c0 as u64);
        let mut ch = c0;
        for (l, level) in c.blocks.iter().enumerate() {
            let t = positions(h, w, l);
            for _ in 0..level.layers {
                live.layer(self.resnet(t, ch, level.out_channels));
                ch = level.out_channels;
                if level.down_cross_attn {
                    live.hold(t * ch as u64);
                    live.layer(Self::transformer(t, ch));
                    live.release(t * ch as u64);
                }
                live.hold(t * ch as u64);
                skips.push(t * ch as u64);
            }
            if l + 1 < n {
                let down = positions(h, w, l + 1) * ch as u64;
                live.layer(t * ch as u64 + down + self.conv(t, ch, ch));
                live.hold(down);
                skips.push(down);
            }
        }
        // The mid block, on a map that is not a skip; then each up resnet joins the map with
        // the last skip, which is released with the map it replaces.
        let t = positions(h, w, n - 1);
        let mut x = t * ch as u64;
        live.hold(x);
        live.layer(self.resnet(t, ch, ch).max(x + Self::transformer(t, ch)));
        for (i, level) in c.blocks.iter().rev().enumerate() {
            let l = n - 1 - i;
            let t = positions(h, w, l);
            for _ in 0..=level.layers {
                let skip = skips.pop().unwrap_or(0);
                let skip_ch = (skip / t.max(1)) as usize;
                let joined = t * (ch + skip_ch) as u64;
                live.hold(joined);
                live.layer(self.resnet(t, ch + skip_ch, level.out_channels));
                ch = level.out_channels;
                live.release(joined + skip + x);
                x = t * ch as u64;
                live.hold(x);
                if level.up_cross_attn {
                    live.layer(Self::transformer(t, ch));
                }
            }
            if l > 0 {
                let up = positions(h, w, l - 1) * ch as u64;
                live.layer(2 * up + self.conv(up, ch, ch));
                live.release(x);
                x = up;
                live.hold(x);
            }
        }
        live.layer(t0 * c0 as u64 + t0 * c.out_channels as u64 + self.conv(t0, c0, 4));
        live.peak
    }

    /// The VAE decoder on one image's latents `h × w`, in elements.
    fn vae_decoder(&self, h: usize, w: usize) -> u64 {
        let c = &self.vae.block_out_channels;
        let top = *c.last().unwrap_or(&self.vae.latent_channels);
        let levels = c.len();
        let mut t = positions(h, w, 0);
        let mut live = Live::default();
        live.hold(t * top as u64);
        live.layer(self.resnet(t, top, top));
        live.layer(Self::attention(t, top));
        let mut ch = top;
        for (i, &out) in c.iter().rev().enumerate() {
            for _ in 0..=self.vae.layers_per_block {
                live.layer(self.resnet(t, ch, out));
                live.release(t * ch as u64);
                ch = out;
                live.hold(t * ch as u64);
            }
            if i + 1 < levels {
                let up = 4 * t;
                live.layer(2 * up * ch as u64 + self.conv(up, ch, ch));
                live.release(t * ch as u64);
                t = up;
                live.hold(t * ch as u64);
            }
        }
        live.layer(t * ch as u64 + t * 3 + self.conv(t, ch, 3));
        live.peak
    }

    /// The VAE encoder on one input image, in elements.
    fn vae_encoder(&self, settings: &JobSettings) -> u64 {
        let c = &self.vae.block_out_channels;
        let (mut h, mut w) = (settings.height as u64, settings.width as u64);
        let mut live = Live::default();
        let mut ch = c.first().copied().unwrap_or(1);
        live.hold(3 * h * w);
        live.layer(h * w * ch as u64 + self.conv(h * w, 3, ch));
        live.hold(h * w * ch as u64);
        for (i, &out) in c.iter().enumerate() {
            for _ in 0..self.vae.layers_per_block {
                let t = h * w;
                live.layer(self.resnet(t, ch, out));
                live.release(t * ch as u64);
                ch = out;
                live.hold(t * ch as u64);
            }
            if i + 1 < c.len() {
                // Padded by one row and column, then convolved with stride 2.
                let padded = (h + 1) * (w + 1);
                let t = h * w;
                (h, w) = (h / 2, w / 2);
                live.layer((padded + h * w) * ch as u64 + self.conv(padded, ch, ch));
                live.release(t * ch as u64);
                live.hold(h * w * ch as u64);
            }
        }
        let t = h * w;
        live.layer(self.resnet(t, ch, ch).max(Self::attention(t, ch)));
        live.peak
    }

    /// The VAE's single-head mid-block attention at `t` positions, `c` channels: norm, tokens,
    /// q, k, v, packed keys and values, output, projection, back to a map, the residual sum.
    fn attention(t: u64, c: usize) -> u64 {
        11 * t * c as u64
    }

    /// The text encoders on every distinct prompt of `rows` UNet rows (at most one each), in
    /// elements: per layer the residual stream, its norm, q/k/v, the output and the MLP.
    fn text_encoder(&self, rows: u64) -> u64 {
        self.texts
            .iter()
            .map(|t| {
                let c = t.encoder.config();
                let d = c.hidden_size as u64;
                let mlp = c.intermediate_size as u64;
                let per_token = 7 * d + 2 * mlp;
                rows * TEXT_TOKENS * (per_token + 2 * d)
            })
            .sum()
    }
}
