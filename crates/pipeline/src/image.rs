//! Decoded images to 8-bit RGB and PNG, with diffusers' exact arithmetic.

use candle_core::{DType, Device, Tensor};

/// Images in `[0, 1]`, `(batch, 3, height, width)` row-major f32, as diffusers' `postprocess`
/// has them just before the conversion to 8 bits.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatImages {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl FloatImages {
    /// `(x / 2 + 0.5).clamp(0, 1)` of a VAE output `(B, 3, H, W)`, computed in f32 on the host.
    pub fn from_vae_output(decoded: &Tensor) -> candle_core::Result<Self> {
        let (batch, channels, height, width) = decoded.dims4()?;
        if channels != 3 {
            return Err(candle_core::Error::Msg(format!(
                "the VAE produced {channels} channels, RGB output needs 3"
            )));
        }
        let data: Vec<f32> = decoded
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let data = data
            .into_iter()
            .map(|x| (x / 2.0 + 0.5).clamp(0.0, 1.0))
            .collect();
        Ok(Self {
            batch,
            height,
            width,
            data,
        })
    }

    /// Image `index` as interleaved RGB bytes, `(x * 255).round()` with ties to even like numpy.
    pub fn rgb8(&self, index: usize) -> Vec<u8> {
        let plane = self.height * self.width;
        let image = &self.data[index * 3 * plane..(index + 1) * 3 * plane];
        let mut out = Vec::with_capacity(3 * plane);
        for p in 0..plane {
            for c in 0..3 {
                // Values are in [0, 1], so the cast cannot saturate.
                out.push((image[c * plane + p] * 255.0).round_ties_even() as u8);
            }
        }
        out
    }
}

/// An 8-bit RGB PNG of `rgb` (`height * width * 3` bytes).
pub fn encode_png(width: usize, height: usize, rgb: &[u8]) -> Result<Vec<u8>, String> {
    let (w, h) = (
        u32::try_from(width).map_err(|_| "image too wide".to_string())?,
        u32::try_from(height).map_err(|_| "image too tall".to_string())?,
    );
    if rgb.len() != width * height * 3 {
        return Err(format!(
            "{} bytes is not a {width}x{height} RGB image",
            rgb.len()
        ));
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Fast);
        let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
        writer.write_image_data(rgb).map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Decodes an 8-bit RGB or RGBA PNG to `(width, height, rgb bytes)` (for tests and tools).
pub fn decode_png(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), String> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().map_err(|e| e.to_string())?;
    let size = reader.output_buffer_size().ok_or("PNG too large")?;
    let mut buf = vec![0; size];
    let info = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    if info.bit_depth != png::BitDepth::Eight {
        return Err(format!("unsupported PNG bit depth {:?}", info.bit_depth));
    }
    let (w, h) = (info.width as usize, info.height as usize);
    let rgb = match info.color_type {
        png::ColorType::Rgb => buf[..w * h * 3].to_vec(),
        png::ColorType::Rgba => buf[..w * h * 4]
            .chunks(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        other => return Err(format!("unsupported PNG color type {other:?}")),
    };
    Ok((w, h, rgb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planar_to_interleaved_and_png_round_trip() {
        // R plane, G plane, B plane of a 2x1 image.
        let img = FloatImages {
            batch: 1,
            height: 1,
            width: 2,
            data: vec![0.0, 1.0, 0.5, 0.25, 1.0, 0.0],
        };
        let rgb = img.rgb8(0);
        assert_eq!(rgb, vec![0, 128, 255, 255, 64, 0]);
        let png = encode_png(2, 1, &rgb).unwrap();
        assert_eq!(decode_png(&png).unwrap(), (2, 1, rgb));
    }
}
