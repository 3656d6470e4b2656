//! Input images (image-to-image): an encoded PNG, JPEG or WebP file becomes 8-bit RGB. The
//! declared size is read from the header and checked before any pixel is decoded, so a
//! decompression bomb costs nothing; the decoder is also held to that size and its allocation.
//! Grey and alpha images become RGB as Pillow's `convert("RGB")` makes them (alpha dropped).

use std::io::Cursor;
use std::sync::Arc;

use image::{ImageFormat, ImageReader};

use crate::resize::resize_rgb;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved. Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Arc<[u8]>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}×{})", self.width, self.height)
    }
}

impl RgbImage {
    /// This image resized to `width × height` as diffusers' `VaeImageProcessor` resizes.
    pub fn resized(&self, width: usize, height: usize) -> RgbImage {
        if (width, height) == (self.width, self.height) {
            return self.clone();
        }
        RgbImage {
            width,
            height,
            rgb: resize_rgb(&self.rgb, self.width, self.height, width, height).into(),
        }
    }
}

const FORMATS: [ImageFormat; 3] = [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP];

/// Why an input file was refused; the caller names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("is not a PNG, JPEG or WebP file")]
    Format,
    #[error("declares {width}×{height} pixels; at most {max} are allowed")]
    TooLarge { width: u64, height: u64, max: usize },
    #[error("declares an empty image ({width}×{height})")]
    Empty { width: u64, height: u64 },
    #[error("cannot be decoded: {0}")]
    Corrupt(String),
}

/// The file's format, guessed from its first bytes; only the decoders built in are accepted.
fn format(bytes: &[u8]) -> Result<ImageFormat, ImageError> {
    match image::guess_format(bytes) {
        Ok(f) if FORMATS.contains(&f) => Ok(f),
        _ => Err(ImageError::Format),
    }
}

/// Decodes `bytes` into RGB if its declared size is at most `max_pixels`.
pub fn decode_rgb(bytes: &[u8], max_pixels: usize) -> Result<RgbImage, ImageError> {
    let decoded = decode(bytes, max_pixels)?;
    Ok(RgbImage {
        width: decoded.width() as usize,
        height: decoded.height() as usize,
        rgb: decoded.into_rgb8().into_raw().into(),
    })
}

/// Decodes a mask whose transparent pixels mark what to repaint (OpenAI's edits) into the
/// white-repaints form: each pixel's grey level is its transparency, `255 - alpha`. An image
/// without an alpha channel is opaque: nothing to repaint.
pub fn decode_transparency(bytes: &[u8], max_pixels: usize) -> Result<RgbImage, ImageError> {
    let decoded = decode(bytes, max_pixels)?;
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    let rgb: Vec<u8> = decoded
        .into_rgba8()
        .pixels()
        .flat_map(|p| [255 - p.0[3]; 3])
        .collect();
    Ok(RgbImage {
        width,
        height,
        rgb: rgb.into(),
    })
}

/// Decodes `bytes` if its declared size is at most `max_pixels`.
fn decode(bytes: &[u8], max_pixels: usize) -> Result<image::DynamicImage, ImageError> {
    let format = format(bytes)?;
    let reader = || ImageReader::with_format(Cursor::new(bytes), format);
    let (w, h) = reader()
        .into_dimensions()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let (width, height) = (u64::from(w), u64::from(h));
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { width, height });
    }
    if width * height > max_pixels as u64 {
        return Err(ImageError::TooLarge {
            width,
            height,
            max: max_pixels,
        });
    }
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(ImageError::Corrupt(
            "the JPEG data is truncated (no end marker)".into(),
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // RGBA at 16 bits per channel is the largest buffer a decoder makes, plus slack.
    limits.max_alloc = Some(width * height * 8 + (1 << 20));
    let mut reader = reader();
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    if (u64::from(decoded.width()), u64::from(decoded.height())) != (width, height) {
        return Err(ImageError::Corrupt(
            "the decoded size differs from the header".into(),
        ));
    }
    Ok(decoded)
}

/// Whether a JPEG's last scan is followed by its end-of-image marker. The decoder fills a
/// truncated scan with grey instead of failing; entropy-coded data never holds a bare `FF DA`
/// or `FF D9` (an `FF` there is followed by `00`), so a truncated file lacks the end marker
/// after its last scan header.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let marker = |m: u8| move |w: &[u8]| w == [0xFF, m];
    let Some(last_scan) = bytes.windows(2).rposition(marker(0xDA)) else {
        return false;
    };
    bytes[last_scan..].windows(2).any(marker(0xD9))
}
