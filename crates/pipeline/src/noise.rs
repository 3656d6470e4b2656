//! Per-image, host-side Gaussian noise.
//!
//! Every image owns a ChaCha20 stream seeded from its request seed, so the same seed gives the
//! same noise on CPU and GPU, and an image never depends on what it was batched with.

use std::collections::VecDeque;

use candle_core::{Device, Result, Shape, Tensor};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// Draws standard-normal noise for a whole batch, shape `(B, ...)`.
pub trait NoiseSource {
    fn randn(&mut self, shape: &Shape, device: &Device) -> Result<Tensor>;
}

/// One seeded normal stream (Box–Muller over ChaCha20), after any explicit draws queued
/// ahead of it.
#[derive(Clone)]
pub struct NormalStream {
    rng: ChaCha20Rng,
    spare: Option<f32>,
    explicit: VecDeque<Vec<f32>>,
}

impl NormalStream {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
            spare: None,
            explicit: VecDeque::new(),
        }
    }

    /// Queues `draws` to be the next draws of [`NormalStream::draw`], in order.
    pub fn queue_explicit(&mut self, draws: impl IntoIterator<Item = Vec<f32>>) {
        self.explicit.extend(draws);
    }

    /// One draw of `n` values: the next explicit one if it has `n` values, else seeded ones.
    pub fn draw(&mut self, n: usize) -> Vec<f32> {
        match self.explicit.front() {
            Some(d) if d.len() == n => self.explicit.pop_front().unwrap_or_default(),
            _ => self.fill(n),
        }
    }

    fn uniform_open(&mut self) -> f64 {
        // 53 random bits mapped to (0, 1]: never 0, so ln() is finite.
        ((self.rng.next_u64() >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64)
    }

    pub fn sample(&mut self) -> f32 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = self.uniform_open();
        let u2 = self.uniform_open();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }

    pub fn fill(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.sample()).collect()
    }
}

/// One stream per batch item; item `b` of every draw comes from stream `b`.
pub struct PerImageNoise {
    streams: Vec<NormalStream>,
}

impl PerImageNoise {
    pub fn new(seeds: &[u64]) -> Self {
        Self {
            streams: seeds.iter().map(|&s| NormalStream::new(s)).collect(),
        }
    }

    pub fn streams_mut(&mut self) -> &mut [NormalStream] {
        &mut self.streams
    }
}

impl NoiseSource for PerImageNoise {
    fn randn(&mut self, shape: &Shape, device: &Device) -> Result<Tensor> {
        let dims = shape.dims();
        if dims.first() != Some(&self.streams.len()) {
            candle_core::bail!(
                "noise shape {shape:?} does not start with the batch size {}",
                self.streams.len()
            );
        }
        let per_item: usize = dims[1..].iter().product();
        let mut data = Vec::with_capacity(per_item * self.streams.len());
        for stream in &mut self.streams {
            data.extend(stream.draw(per_item));
        }
        Tensor::from_vec(data, shape.clone(), &Device::Cpu)?.to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_roughly_standard() {
        let a = NormalStream::new(7).fill(20_000);
        let b = NormalStream::new(7).fill(20_000);
        assert_eq!(a, b);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
        assert_ne!(NormalStream::new(8).fill(4), a[..4].to_vec());
    }

    #[test]
    fn batch_items_are_independent_of_batch_mates() -> Result<()> {
        let alone = PerImageNoise::new(&[3]).randn(&(1, 2, 3).into(), &Device::Cpu)?;
        let batched = PerImageNoise::new(&[9, 3]).randn(&(2, 2, 3).into(), &Device::Cpu)?;
        let second: Vec<f32> = batched.get(1)?.flatten_all()?.to_vec1()?;
        assert_eq!(alone.flatten_all()?.to_vec1::<f32>()?, second);
        Ok(())
    }
}
