//! Resizing an 8-bit RGB image exactly as Pillow's `Image.resize(size, Image.LANCZOS)` does,
//! which diffusers' `VaeImageProcessor.resize` calls: a separable Lanczos-3 filter widened by the
//! scale when shrinking, coefficients normalised per output pixel and quantised to 22-bit fixed
//! point, a horizontal pass into an 8-bit intermediate and then a vertical pass, each sum
//! rounded and clipped to 0..=255.

/// Fixed-point fraction bits of the coefficients (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) {
        sinc(x) * sinc(x / LANCZOS_SUPPORT)
    } else {
        0.0
    }
}

/// For each output pixel along one axis: the first input pixel used and the fixed-point
/// weights of the pixels from there on.
struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

impl Taps {
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = LANCZOS_SUPPORT * filter_scale;
        let mut first = Vec::with_capacity(out_size);
        let mut weights = Vec::with_capacity(out_size);
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero before the clamp, as Pillow's does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| lanczos((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = raw.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let fixed = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            first.push(xmin);
            weights.push(fixed);
        }
        Self { first, weights }
    }

    /// Output value `xx` from the input values `at(i)`, one channel.
    fn apply(&self, xx: usize, at: impl Fn(usize) -> u8) -> u8 {
        let start = self.first[xx];
        let mut acc: i64 = 1 << (PRECISION_BITS - 1);
        for (k, &w) in self.weights[xx].iter().enumerate() {
            acc += i64::from(at(start + k)) * i64::from(w);
        }
        (acc >> PRECISION_BITS).clamp(0, 255) as u8
    }
}

/// `rgb` (`width × height` interleaved RGB) resized to `out_width × out_height`; an image of
/// that size already is returned unchanged, as Pillow returns a copy.
pub fn resize_rgb(
    rgb: &[u8],
    width: usize,
    height: usize,
    out_width: usize,
    out_height: usize,
) -> Vec<u8> {
    let mut image = rgb.to_vec();
    let mut w = width;
    if out_width != width {
        let taps = Taps::new(width, out_width);
        let mut out = vec![0u8; out_width * height * 3];
        for y in 0..height {
            let row = &image[y * w * 3..(y + 1) * w * 3];
            for xx in 0..out_width {
                for c in 0..3 {
                    out[(y * out_width + xx) * 3 + c] = taps.apply(xx, |x| row[x * 3 + c]);
                }
            }
        }
        image = out;
        w = out_width;
    }
    if out_height != height {
        let taps = Taps::new(height, out_height);
        let mut out = vec![0u8; w * out_height * 3];
        for yy in 0..out_height {
            for x in 0..w {
                for c in 0..3 {
                    out[(yy * w + x) * 3 + c] = taps.apply(yy, |y| image[(y * w + x) * 3 + c]);
                }
            }
        }
        image = out;
    }
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_of_every_output_pixel_sum_to_one_in_fixed_point() {
        for (i, o) in [(67, 64), (61, 56), (64, 128), (1000, 64), (5, 3)] {
            let taps = Taps::new(i, o);
            for w in &taps.weights {
                let sum: i64 = w.iter().map(|&x| i64::from(x)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= w.len() as i64,
                    "{i}->{o}: {sum}"
                );
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_and_the_same_size_is_unchanged() {
        let flat = vec![200u8; 13 * 7 * 3];
        assert!(resize_rgb(&flat, 13, 7, 8, 16).iter().all(|&v| v == 200));
        let ramp: Vec<u8> = (0..12 * 3).map(|v| v as u8).collect();
        assert_eq!(resize_rgb(&ramp, 4, 3, 4, 3), ramp);
    }
}
