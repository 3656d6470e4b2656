//! Finding and loading the safetensors weights of one component folder.
//!
//! Headers are validated against the real file size before anything is trusted: a header length
//! or tensor offset that points past the end of the file is an error naming the file (and the
//! tensor), never an allocation or a panic. Tensors are served to candle through a
//! [`SimpleBackend`], so a missing tensor or a shape that disagrees with the config is reported
//! with the file and the tensor name.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use memmap2::Mmap;
use serde_json::Value;

use crate::error::{PipelineError, candle_message};

type Result<T> = std::result::Result<T, PipelineError>;

/// Headers larger than this are refused (real ones are a few hundred KiB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Which files hold a component's weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFiles {
    pub files: Vec<PathBuf>,
    /// The `*.safetensors.index.json` the shards came from, if sharded.
    pub index: Option<PathBuf>,
}

/// Finds `<stem>[.fp16].safetensors` or a sharded `<stem>.safetensors.index[.fp16].json` in `dir`.
///
/// The fp16 variant is preferred when running in reduced precision, the full-precision file
/// otherwise; either is used when it is the only one.
pub fn find_weights(dir: &Path, stem: &str, prefer_fp16: bool) -> Result<WeightFiles> {
    let full = [
        (format!("{stem}.safetensors"), false),
        (format!("{stem}.safetensors.index.json"), true),
    ];
    let half = [
        (format!("{stem}.fp16.safetensors"), false),
        (format!("{stem}.safetensors.index.fp16.json"), true),
    ];
    let order: Vec<&(String, bool)> = if prefer_fp16 {
        half.iter().chain(&full).collect()
    } else {
        full.iter().chain(&half).collect()
    };
    for (name, is_index) in order {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        if *is_index {
            let files = read_index(&path)?;
            return Ok(WeightFiles {
                files,
                index: Some(path),
            });
        }
        return Ok(WeightFiles {
            files: vec![path],
            index: None,
        });
    }
    let pickles = pickle_files(dir);
    if !pickles.is_empty() {
        let names: Vec<String> = pickles.iter().map(|p| p.display().to_string()).collect();
        return Err(PipelineError::weights(
            dir,
            format!(
                "only pickle weights found ({}); pickle files are refused because loading them can run arbitrary code. \
                 Convert the folder to safetensors, e.g. in Python: \
                 `StableDiffusionPipeline.from_pretrained(src).save_pretrained(dst, safe_serialization=True)`",
                names.join(", ")
            ),
        ));
    }
    Err(PipelineError::weights(
        &dir.join(format!("{stem}.safetensors")),
        format!(
            "weight file not found (looked for {stem}.safetensors, {stem}.fp16.safetensors and sharded \
             {stem}.safetensors.index.json in {})",
            dir.display()
        ),
    ))
}

/// Extensions of pickled weights, which are refused: loading them can run arbitrary code.
pub const PICKLE_EXTENSIONS: [&str; 5] = ["bin", "ckpt", "pt", "pth", "pkl"];

fn pickle_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            PICKLE_EXTENSIONS
                .iter()
                .any(|ext| name.ends_with(&format!(".{ext}")))
        })
        .collect();
    found.sort();
    found
}

/// The distinct shard files listed by a `*.safetensors.index.json`, in first-use order.
fn read_index(path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| PipelineError::config(path, format!("invalid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| PipelineError::key(path, "weight_map", "missing or not an object"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, shard) in map {
        let name = shard.as_str().ok_or_else(|| {
            PipelineError::key(
                path,
                "weight_map",
                format!("tensor `{tensor}`: shard name is not a string"),
            )
        })?;
        // Shards must sit next to the index: no directories, no `..`.
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err(PipelineError::key(
                path,
                "weight_map",
                format!("tensor `{tensor}`: shard {name:?} is not a plain file name"),
            ));
        }
        let shard_path = dir.join(name);
        if !files.contains(&shard_path) {
            files.push(shard_path);
        }
    }
    if files.is_empty() {
        return Err(PipelineError::key(path, "weight_map", "lists no tensors"));
    }
    Ok(files)
}

#[derive(Debug, Clone)]
struct TensorInfo {
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range inside the file.
    start: usize,
    end: usize,
}

/// One memory-mapped, validated safetensors file.
struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: HashMap<String, TensorInfo>,
    /// The header's `__metadata__` strings.
    metadata: HashMap<String, String>,
}

fn dtype_of(name: &str) -> Option<(Option<DType>, usize)> {
    // (candle dtype if loadable, bytes per element)
    Some(match name {
        "F32" => (Some(DType::F32), 4),
        "F16" => (Some(DType::F16), 2),
        "BF16" => (Some(DType::BF16), 2),
        "F64" => (Some(DType::F64), 8),
        "U8" => (Some(DType::U8), 1),
        "U32" => (Some(DType::U32), 4),
        "I64" => (Some(DType::I64), 8),
        "I32" => (Some(DType::I32), 4),
        "I16" => (Some(DType::I16), 2),
        "BOOL" | "I8" | "F8_E4M3" | "F8_E5M2" => (None, 1),
        "U16" => (None, 2),
        "U64" => (None, 8),
        _ => return None,
    })
}

impl SafetensorsFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| PipelineError::io(path, e))?;
        let len = file
            .metadata()
            .map_err(|e| PipelineError::io(path, e))?
            .len();
        if len < 8 {
            return Err(PipelineError::weights(
                path,
                format!(
                    "not a safetensors file: {len} bytes is too short for the 8-byte header length"
                ),
            ));
        }
        // Safety: the map is read-only; a file truncated by someone else while mapped is outside
        // what any loader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| PipelineError::io(path, e))?;
        let (tensors, metadata) = parse_header(path, &mmap)?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            tensors,
            metadata,
        })
    }
}

/// A header's tensors and its `__metadata__` strings.
type Header = (HashMap<String, TensorInfo>, HashMap<String, String>);

impl SafetensorsFile {
    /// Takes the file's pages of a tensor already copied out of the process's resident memory,
    /// so that loading holds each byte once (the copy), not twice (the copy and the mapped page).
    /// The mapping is private and read-only: a page touched again is read from the file again.
    fn release(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        // SAFETY: nothing writes through this read-only mapping, so dropping its pages loses
        // nothing; any later read faults the unchanged file contents back in.
        let _ = unsafe {
            self.mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
        };
    }
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let file_len = bytes.len() as u64;
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
        return Err(PipelineError::weights(
            path,
            format!(
                "corrupt or truncated safetensors file: header length {header_len} does not fit in the {file_len}-byte file"
            ),
        ));
    }
    let data_start = 8 + header_len as usize;
    let data_len = (bytes.len() - data_start) as u64;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| PipelineError::weights(path, format!("corrupt safetensors header: {e}")))?;
    let mut tensors = HashMap::with_capacity(header.len());
    // Byte ranges of every non-empty tensor, to refuse tensors that share bytes.
    let mut ranges: Vec<(u64, u64, String)> = Vec::with_capacity(header.len());
    let mut metadata = HashMap::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            if let Value::Object(m) = entry {
                metadata.extend(
                    m.into_iter()
                        .filter_map(|(k, v)| Some((k, v.as_str()?.to_string()))),
                );
            }
            continue;
        }
        let bad = |what: String| PipelineError::weights(path, format!("tensor `{name}`: {what}"));
        let entry = HeaderEntry::read(&entry, data_len).map_err(bad)?;
        if entry.end > entry.start {
            ranges.push((entry.start, entry.end, name.clone()));
        }
        let info = match entry.dtype {
            Some(dtype) => TensorInfo {
                dtype,
                shape: entry.shape,
                start: data_start + entry.start as usize,
                end: data_start + entry.end as usize,
            },
            // Present but not loadable by candle; only an error if a model asks for it.
            None => TensorInfo {
                dtype: DType::U8,
                shape: Vec::new(),
                start: 0,
                end: 0,
            },
        };
        tensors.insert(name, info);
    }
    check_no_overlap(path, ranges)?;
    Ok((tensors, metadata))
}

/// One tensor's header entry, checked against itself and the data section's length.
struct HeaderEntry {
    /// `None`: a dtype candle cannot load.
    dtype: Option<DType>,
    shape: Vec<usize>,
    /// Byte offsets in the data section.
    start: u64,
    end: u64,
}

impl HeaderEntry {
    /// The problem is returned as text, for the caller to put the tensor's name in front.
    fn read(entry: &Value, data_len: u64) -> std::result::Result<Self, String> {
        let dtype_name = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or("no dtype")?;
        let (dtype, elem_size) =
            dtype_of(dtype_name).ok_or_else(|| format!("unknown dtype {dtype_name:?}"))?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(Value::as_array)
            .ok_or("no shape")?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or("shape is not a list of non-negative integers")?;
        let (start, end) = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or("data_offsets is not a pair of integers")?;
        if start > end || end > data_len {
            return Err(format!(
                "data_offsets [{start}, {end}] lie outside the {data_len}-byte data section; the file is truncated or corrupt"
            ));
        }
        let bytes_needed = shape
            .iter()
            .try_fold(elem_size as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| format!("shape {shape:?} overflows"))?;
        if bytes_needed != end - start {
            return Err(format!(
                "shape {shape:?} of {dtype_name} needs {bytes_needed} bytes but data_offsets span {}",
                end - start
            ));
        }
        Ok(Self {
            dtype,
            shape,
            start,
            end,
        })
    }
}

/// No two tensors may share bytes.
fn check_no_overlap(path: &Path, mut ranges: Vec<(u64, u64, String)>) -> Result<()> {
    ranges.sort();
    for pair in ranges.windows(2) {
        let ((a_start, a_end, a), (b_start, b_end, b)) = (&pair[0], &pair[1]);
        if b_start < a_end {
            return Err(PipelineError::weights(
                path,
                format!(
                    "tensors `{a}` (bytes {a_start}..{a_end}) and `{b}` (bytes {b_start}..{b_end}) overlap; the file is corrupt"
                ),
            ));
        }
    }
    Ok(())
}

/// All tensors of one component (one file or every shard), served to candle's `VarBuilder`.
pub struct WeightStore {
    files: Vec<SafetensorsFile>,
    routing: HashMap<String, usize>,
    description: String,
    /// Bytes of every tensor handed out, in the dtype asked for (the loaded weights' size).
    loaded: Arc<AtomicU64>,
}

impl WeightStore {
    pub fn open(weights: &WeightFiles) -> Result<Self> {
        let mut files = Vec::with_capacity(weights.files.len());
        let mut routing = HashMap::new();
        for path in &weights.files {
            if !path.is_file() {
                let from = weights
                    .index
                    .as_ref()
                    .map(|i| format!(" (listed in {})", i.display()))
                    .unwrap_or_default();
                return Err(PipelineError::weights(
                    path,
                    format!("weight file not found{from}"),
                ));
            }
            let file = SafetensorsFile::open(path)?;
            for name in file.tensors.keys() {
                routing.insert(name.clone(), files.len());
            }
            files.push(file);
        }
        let description = match &weights.index {
            Some(index) => format!("{} ({} shards)", index.display(), files.len()),
            None => weights
                .files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        };
        Ok(Self {
            files,
            routing,
            description,
            loaded: Arc::default(),
        })
    }

    /// Every tensor's name and stored shape.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.files.iter().flat_map(|f| {
            f.tensors
                .iter()
                .map(|(n, i)| (n.as_str(), i.shape.as_slice()))
        })
    }

    /// The stored shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let &index = self.routing.get(name)?;
        Some(self.files[index].tensors[name].shape.as_slice())
    }

    /// A `__metadata__` string of the (first) file.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.files.first()?.metadata.get(key).map(String::as_str)
    }

    /// What the store reads, for messages.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Tensor `name` in `dtype` on `device`.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.load(name, dtype, device)
            .map_err(|e| PipelineError::weights(Path::new(&self.description), candle_message(&e)))
    }

    /// Counts the bytes of the tensors this store hands out into `loaded`.
    pub fn counting(mut self, loaded: Arc<AtomicU64>) -> Self {
        self.loaded = loaded;
        self
    }

    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// A tensor in its stored dtype, on `device`, with file and tensor named in any error.
    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let Some(&index) = self.routing.get(name) else {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` is missing",
                self.description
            )));
        };
        let file = &self.files[index];
        let info = &file.tensors[name];
        if info.end == 0 && info.shape.is_empty() {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` has a dtype candle cannot load",
                file.path.display()
            )));
        }
        let bytes = &file.mmap[info.start..info.end];
        let elements = info.shape.iter().product::<usize>() as u64;
        self.loaded
            .fetch_add(elements * dtype.size_in_bytes() as u64, Ordering::Relaxed);
        let tensor = Tensor::from_raw_buffer(bytes, info.dtype, &info.shape, device);
        file.release(info.start, info.end - info.start);
        tensor.and_then(|t| t.to_dtype(dtype)).map_err(|e| {
            candle_core::Error::Msg(format!(
                "{}: tensor `{name}`: {}",
                file.path.display(),
                candle_message(&e)
            ))
        })
    }
}

impl SimpleBackend for WeightStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(&index) = self.routing.get(name) {
            let file = &self.files[index];
            let stored = &file.tensors[name].shape;
            if stored.as_slice() != s.dims() {
                return Err(candle_core::Error::Msg(format!(
                    "{}: tensor `{name}` has shape {stored:?}, but the config implies {:?}",
                    file.path.display(),
                    s.dims()
                )));
            }
        }
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn header_length_beyond_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let mut bytes = safetensors("{}", &[]);
        bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        let p = write(d, "huge.safetensors", &bytes);
        let err = SafetensorsFile::open(&p).err().unwrap().to_string();
        assert!(
            err.contains("huge.safetensors") && err.contains("header length"),
            "{err}"
        );
    }

    #[test]
    fn offsets_beyond_file_name_the_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let h = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let p = write(d, "short.safetensors", &safetensors(h, &[0u8; 8]));
        let err = SafetensorsFile::open(&p).err().unwrap().to_string();
        assert!(
            err.contains("short.safetensors") && err.contains("`w`"),
            "{err}"
        );
    }

    #[test]
    fn overlapping_tensors_name_both() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}"#;
        let p = write(d, "overlap.safetensors", &safetensors(h, &[0u8; 12]));
        let err = SafetensorsFile::open(&p).err().unwrap().to_string();
        assert!(
            err.contains("overlap.safetensors")
                && err.contains("`a`")
                && err.contains("`b`")
                && err.contains("overlap"),
            "{err}"
        );
        // Adjacent tensors and empty ones are fine.
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}"#;
        let p = write(d, "adjacent.safetensors", &safetensors(h, &[0u8; 12]));
        assert!(SafetensorsFile::open(&p).is_ok());
    }

    #[test]
    fn loads_f16_as_f32_and_checks_shape() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let h = r#"{"__metadata__":{"format":"pt"},"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#;
        let data: Vec<u8> = [half::f16::from_f32(1.5), half::f16::from_f32(-2.0)]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let p = write(d, "ok.safetensors", &safetensors(h, &data));
        let store = WeightStore::open(&WeightFiles {
            files: vec![p],
            index: None,
        })
        .unwrap();
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        assert_eq!(
            vb.get(2, "w").unwrap().to_vec1::<f32>().unwrap(),
            [1.5, -2.0]
        );
        let err = vb.get(3, "w").unwrap_err().to_string();
        assert!(
            err.contains("ok.safetensors") && err.contains("`w`") && err.contains("[2]"),
            "{err}"
        );
        let err = vb.get(3, "missing").unwrap_err().to_string();
        assert!(
            err.contains("ok.safetensors") && err.contains("`missing`"),
            "{err}"
        );
    }
}
