//! Tensor data as bytes, the form both binary transports use (gRPC `raw_input_contents` and
//! `raw_output_contents`, Triton's binary tensor data on REST): elements little-endian and
//! row-major; a BYTES element is a 4-byte little-endian length, then its bytes.
//!
//! Elements decode into the same [`TensorData`] a JSON request's `data` does, so one contract
//! decoder serves every form; BYTES elements stay bytes.

use crate::tensor::TensorData;
use crate::v2::Datatype;

/// Bytes that cannot be read as (or written to) tensor data. The texts name the element, not
/// the input: callers put the input's name in front.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RawError {
    #[error("element {element} has a truncated 4-byte length prefix")]
    TruncatedLength { element: usize },
    #[error("element {element} declares {declared} bytes but only {remaining} remain")]
    ShortElement {
        element: usize,
        declared: usize,
        remaining: usize,
    },
    #[error(
        "{len} bytes are not a whole number of {} elements ({size} bytes each)",
        datatype.as_str()
    )]
    PartialElement {
        len: usize,
        datatype: Datatype,
        size: usize,
    },
    #[error("a BYTES element of {0} bytes does not fit a 4-byte length")]
    TooLong(usize),
}

/// Bytes per element; `None` for BYTES, whose elements carry their own length.
pub fn element_size(d: Datatype) -> Option<usize> {
    Some(match d {
        Datatype::Bool | Datatype::Int8 | Datatype::Uint8 => 1,
        Datatype::Int16 | Datatype::Uint16 | Datatype::Fp16 => 2,
        Datatype::Int32 | Datatype::Uint32 | Datatype::Fp32 => 4,
        Datatype::Int64 | Datatype::Uint64 | Datatype::Fp64 => 8,
        Datatype::Bytes => return None,
    })
}

/// Splits serialised BYTES elements.
pub fn split_bytes(raw: &[u8]) -> Result<Vec<&[u8]>, RawError> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(RawError::TruncatedLength { element: out.len() });
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(RawError::ShortElement {
                element: out.len(),
                declared: len,
                remaining: tail.len(),
            });
        }
        let (element, tail) = tail.split_at(len);
        out.push(element);
        rest = tail;
    }
    Ok(out)
}

/// Serialises BYTES elements.
pub fn join_bytes<'a>(elements: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<u8>, RawError> {
    let mut out = Vec::new();
    for e in elements {
        let len = u32::try_from(e.len()).map_err(|_| RawError::TooLong(e.len()))?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(e);
    }
    Ok(out)
}

/// IEEE half precision to single (exact: every half value is a float).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((h >> 10) & 0x1f);
    let fraction = f32::from(h & 0x3ff);
    sign * match exponent {
        0 => fraction * 2f32.powi(-24),
        31 if fraction == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + fraction / 1024.0) * 2f32.powi(e - 15),
    }
}

/// The elements of tensor bytes of datatype `d`, flat and row-major. How many there should be
/// is for the caller to check (against the input's shape).
pub fn decode(d: Datatype, raw: &[u8]) -> Result<TensorData, RawError> {
    let Some(size) = element_size(d) else {
        let elements = split_bytes(raw)?.into_iter().map(<[u8]>::to_vec).collect();
        return Ok(TensorData::Bytes(elements));
    };
    if !raw.len().is_multiple_of(size) {
        return Err(RawError::PartialElement {
            len: raw.len(),
            datatype: d,
            size,
        });
    }
    let words = raw.chunks_exact(size).map(|c| {
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(c);
        b
    });
    let u16_of = |b: &[u8; 8]| u16::from_le_bytes([b[0], b[1]]);
    let u32_of = |b: &[u8; 8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    Ok(match d {
        Datatype::Bool => TensorData::Bool(words.map(|b| b[0] != 0).collect()),
        Datatype::Fp16 => {
            TensorData::Float(words.map(|b| f64::from(f16_to_f32(u16_of(&b)))).collect())
        }
        Datatype::Fp32 => TensorData::Float(
            words
                .map(|b| f64::from(f32::from_bits(u32_of(&b))))
                .collect(),
        ),
        Datatype::Fp64 => TensorData::Float(words.map(f64::from_le_bytes).collect()),
        _ => TensorData::Int(
            words
                .map(|b| match d {
                    Datatype::Uint8 => i128::from(b[0]),
                    Datatype::Int8 => i128::from(b[0] as i8),
                    Datatype::Uint16 => i128::from(u16_of(&b)),
                    Datatype::Int16 => i128::from(u16_of(&b) as i16),
                    Datatype::Uint32 => i128::from(u32_of(&b)),
                    Datatype::Int32 => i128::from(u32_of(&b) as i32),
                    Datatype::Uint64 => i128::from(u64::from_le_bytes(b)),
                    _ => i128::from(i64::from_le_bytes(b)),
                })
                .collect(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_elements_round_trip_and_name_the_bad_element() {
        let joined = join_bytes([&b""[..], &b"png"[..]]).unwrap();
        assert_eq!(joined, [0, 0, 0, 0, 3, 0, 0, 0, b'p', b'n', b'g']);
        assert_eq!(split_bytes(&joined).unwrap(), [&b""[..], &b"png"[..]]);
        assert_eq!(
            split_bytes(&[1, 0, 0, 0, b'a', 1, 0]).unwrap_err(),
            RawError::TruncatedLength { element: 1 }
        );
        assert_eq!(
            split_bytes(&[5, 0, 0, 0, b'a']).unwrap_err().to_string(),
            "element 0 declares 5 bytes but only 1 remain"
        );
    }

    #[test]
    fn numbers_are_little_endian() {
        let mut fp32 = Vec::new();
        for f in [1.5f32, -2.0] {
            fp32.extend_from_slice(&f.to_le_bytes());
        }
        assert_eq!(
            decode(Datatype::Fp32, &fp32).unwrap(),
            TensorData::Float(vec![1.5, -2.0])
        );
        assert_eq!(
            decode(Datatype::Int16, &[0xfe, 0xff, 1, 0]).unwrap(),
            TensorData::Int(vec![-2, 1])
        );
        assert_eq!(
            decode(Datatype::Uint64, &u64::MAX.to_le_bytes()).unwrap(),
            TensorData::Int(vec![i128::from(u64::MAX)])
        );
        assert_eq!(
            decode(Datatype::Bool, &[0, 2]).unwrap(),
            TensorData::Bool(vec![false, true])
        );
        // FP16 0x7c00 is +infinity: kept, for the contract to refuse with the input's name.
        assert_eq!(
            decode(Datatype::Fp16, &[0, 0x3c, 0, 0x7c]).unwrap(),
            TensorData::Float(vec![1.0, f64::INFINITY])
        );
        assert!(matches!(
            decode(Datatype::Int32, &[0; 6]).unwrap_err(),
            RawError::PartialElement {
                len: 6,
                size: 4,
                ..
            }
        ));
        // BYTES are bytes: no text decoding here.
        assert_eq!(
            decode(Datatype::Bytes, &[1, 0, 0, 0, 0xff]).unwrap(),
            TensorData::Bytes(vec![vec![0xff]])
        );
    }

    #[test]
    fn half_precision_is_exact() {
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }
}
