//! Flash attention on a GPU: the Triton kernel of `kernels/attention.py`, compiled ahead of
//! time (`kernels/build.py`) to one cubin per head dim (40, 64, 80, 160) and architecture
//! (sm_80, sm_90), so it needs neither Triton nor a JIT at run time. F16 operands laid out
//! `(B, S, H·D)` as the projections make them (no head split or merge copy); products on
//! tensor cores, the online softmax and the accumulator in F32; no score matrix in memory.
//!
//! `kernels/manifest.json`, written with the cubins, gives each variant's entry point, launch
//! shape and parameter list; the tests check it against the files and against [`PARAMS`].

// Without CUDA only the tests read the manifest.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::sync::OnceLock;

use serde::Deserialize;

/// The kernel's parameters, in the order the launcher passes them; Triton appends two
/// scratch pointers (null: the build checks the kernels need no scratch memory).
pub(crate) const PARAMS: [&str; 16] = [
    "q_ptr",
    "k_ptr",
    "v_ptr",
    "out_ptr",
    "queries",
    "keys",
    "q_item",
    "q_row",
    "k_item",
    "k_row",
    "v_item",
    "v_row",
    "o_item",
    "o_row",
    "scale_log2e",
    "heads",
];

/// One compiled variant, as `kernels/manifest.json` describes it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Variant {
    pub(crate) file: String,
    pub(crate) head_dim: usize,
    pub(crate) arch: u32,
    pub(crate) entry: String,
    pub(crate) block_m: usize,
    pub(crate) warps: u32,
    pub(crate) shared_bytes: u32,
    pub(crate) params: Vec<String>,
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) ptx_params: Vec<String>,
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) sha256: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Manifest {
    pub(crate) kernels: Vec<Variant>,
}

pub(crate) const MANIFEST: &str = include_str!("../../kernels/manifest.json");

pub(crate) fn manifest() -> &'static Manifest {
    static PARSED: OnceLock<Manifest> = OnceLock::new();
    PARSED.get_or_init(|| serde_json::from_str(MANIFEST).expect("kernels/manifest.json parses"))
}

/// The variant for head dim `d` on a GPU of compute capability `major`.x: sm_90 cubins run
/// on 9.x, sm_80 cubins on every 8.x. A variant whose parameters are not the launcher's is
/// never used.
pub(crate) fn variant(head_dim: usize, major: u32) -> Option<&'static Variant> {
    let arch = match major {
        9 => 90,
        8 => 80,
        _ => return None,
    };
    manifest()
        .kernels
        .iter()
        .find(|v| v.head_dim == head_dim && v.arch == arch && v.params == PARAMS)
}

#[cfg(feature = "cuda")]
pub(crate) use launch::flash_attention;

#[cfg(feature = "cuda")]
mod launch {
    use std::sync::Mutex;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{
        CudaFunction, CudaView, LaunchConfig, PushKernelArg, sys::CUdevice_attribute,
        sys::CUfunction_attribute,
    };
    use candle_core::cuda::cudarc::nvrtc::Ptx;
    use candle_core::cuda::{CudaStorage, WrapErr};
    use candle_core::{CudaDevice, CustomOp3, Layout, Result, Shape, Tensor, bail};
    use half::f16;

    use super::{Variant, variant};

    /// The cubins, by the file names the manifest uses.
    const CUBINS: [(&str, &[u8]); 8] = [
        (
            "attention_d40_sm80.cubin",
            include_bytes!("../../kernels/cubin/attention_d40_sm80.cubin"),
        ),
        (
            "attention_d40_sm90.cubin",
            include_bytes!("../../kernels/cubin/attention_d40_sm90.cubin"),
        ),
        (
            "attention_d64_sm80.cubin",
            include_bytes!("../../kernels/cubin/attention_d64_sm80.cubin"),
        ),
        (
            "attention_d64_sm90.cubin",
            include_bytes!("../../kernels/cubin/attention_d64_sm90.cubin"),
        ),
        (
            "attention_d80_sm80.cubin",
            include_bytes!("../../kernels/cubin/attention_d80_sm80.cubin"),
        ),
        (
            "attention_d80_sm90.cubin",
            include_bytes!("../../kernels/cubin/attention_d80_sm90.cubin"),
        ),
        (
            "attention_d160_sm80.cubin",
            include_bytes!("../../kernels/cubin/attention_d160_sm80.cubin"),
        ),
        (
            "attention_d160_sm90.cubin",
            include_bytes!("../../kernels/cubin/attention_d160_sm90.cubin"),
        ),
    ];

    /// Loaded kernels, per GPU (its primary context, which every load of a model on it shares)
    /// and variant file.
    static LOADED: Mutex<Vec<(usize, &'static str, CudaFunction)>> = Mutex::new(Vec::new());

    fn major(device: &CudaDevice) -> Result<u32> {
        let context = device.cuda_stream().context().clone();
        let major = context
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .w()?;
        Ok(major as u32)
    }

    fn function(device: &CudaDevice, variant: &'static Variant) -> Result<CudaFunction> {
        let context = device.cuda_stream().context().clone();
        let ordinal = context.ordinal();
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, f)) = loaded
            .iter()
            .find(|(gpu, file, _)| *gpu == ordinal && *file == variant.file)
        {
            return Ok(f.clone());
        }
        let Some((file, cubin)) = CUBINS.iter().find(|(file, _)| *file == variant.file) else {
            bail!("no cubin {} in this build", variant.file)
        };
        let module = context.load_module(Ptx::from_binary(cubin.to_vec())).w()?;
        let f = module.load_function(&variant.entry).w()?;
        // Static and dynamic shared memory above 48 KiB together need an opt-in, and the
        // sm_90 cubins have some static shared memory besides: always opt in.
        if variant.shared_bytes > 0 {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                variant.shared_bytes as i32,
            )
            .w()?;
        }
        loaded.push((ordinal, file, f.clone()));
        Ok(f)
    }

    /// The F16 elements of a contiguous operand.
    fn view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f16>> {
        match l.contiguous_offsets() {
            Some((start, end)) => Ok(s.as_cuda_slice::<f16>()?.slice(start..end)),
            None => bail!("flash attention needs contiguous operands"),
        }
    }

    struct FlashAttention {
        heads: usize,
        scale: f32,
        variant: &'static Variant,
    }

    impl CustomOp3 for FlashAttention {
        fn name(&self) -> &'static str {
            "triton-flash-attention"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            bail!("the Triton attention kernel runs on CUDA devices only")
        }

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            lq: &Layout,
            k: &CudaStorage,
            lk: &Layout,
            v: &CudaStorage,
            lv: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let device = q.device().clone();
            let (b, queries, width) = lq.shape().dims3()?;
            let keys = lk.shape().dims3()?.1;
            let (qv, kv, vv) = (view(q, lq)?, view(k, lk)?, view(v, lv)?);
            let func = function(&device, self.variant)?;
            // SAFETY: every element is written by the kernel (each query row of each head).
            let out = unsafe { device.alloc::<f16>(b * queries * width)? };
            let config = LaunchConfig {
                grid_dim: (
                    queries.div_ceil(self.variant.block_m) as u32,
                    (b * self.heads) as u32,
                    1,
                ),
                block_dim: (32 * self.variant.warps, 1, 1),
                shared_mem_bytes: self.variant.shared_bytes,
            };
            let w = width as i32;
            let (sq, sk) = (queries as i32, keys as i32);
            let ints = [sq, sk, sq * w, w, sk * w, w, sk * w, w, sq * w, w];
            let scale_log2e = self.scale * std::f32::consts::LOG2_E;
            let heads = self.heads as i32;
            let scratch: u64 = 0;
            let stream = device.cuda_stream();
            let mut out = out;
            let mut builder = stream.launch_builder(&func);
            builder.arg(&qv).arg(&kv).arg(&vv).arg(&mut out);
            for i in &ints {
                builder.arg(i);
            }
            builder
                .arg(&scale_log2e)
                .arg(&heads)
                .arg(&scratch)
                .arg(&scratch);
            // SAFETY: the arguments are the kernel's parameters in its order (`PARAMS`, then
            // Triton's two scratch pointers), the grid covers every query block of every head.
            unsafe { builder.launch(config) }.w()?;
            Ok((
                CudaStorage::wrap_cuda_slice(out, device),
                Shape::from((b, queries, width)),
            ))
        }
    }

    /// `softmax(q kᵀ · scale) v` per head for F16 `q` `(B, Sq, H·D)`, `k`, `v` `(B, Sk, H·D)`
    /// on a CUDA device; `None` when no variant fits (head dim, GPU, shapes, alignment), so the
    /// caller takes another kernel.
    pub(crate) fn flash_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: f64,
    ) -> Result<Option<Tensor>> {
        let device = q.device().as_cuda_device()?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let (b, queries, width) = q.dims3()?;
        let (kb, keys, kw) = k.dims3()?;
        let shapes_agree = (kb, kw) == (b, width) && v.dims3()? == (b, keys, width);
        // The kernels index with i32 (the last query block included) and were compiled for
        // strides and 16-byte aligned pointers that are multiples of 16 (F16: 8 elements).
        let fits_i32 = [(b, queries.next_multiple_of(128)), (b, keys)]
            .iter()
            .all(|&(items, rows)| items * rows * width <= i32::MAX as usize);
        let aligned = width % 16 == 0
            && [&q, &k, &v]
                .iter()
                .all(|t| t.layout().start_offset() % 8 == 0);
        let grid_fits = b * heads <= 65_535;
        if heads == 0
            || width % heads != 0
            || queries == 0
            || keys == 0
            || !shapes_agree
            || !fits_i32
            || !aligned
            || !grid_fits
        {
            return Ok(None);
        }
        let Some(variant) = variant(width / heads, major(device)?) else {
            return Ok(None);
        };
        let op = FlashAttention {
            heads,
            scale: scale as f32,
            variant,
        };
        Ok(Some(q.apply_op3_no_bwd(&k, &v, &op)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest lists every cubin in `kernels/cubin` once, with its checksum, and every
    /// variant takes exactly the launcher's parameters (then Triton's two scratch pointers).
    #[test]
    fn the_manifest_matches_the_cubins_and_the_launcher() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/cubin");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        let mut listed: Vec<String> = manifest().kernels.iter().map(|v| v.file.clone()).collect();
        listed.sort();
        assert_eq!(files, listed);
        for v in &manifest().kernels {
            let bytes = std::fs::read(dir.join(&v.file)).unwrap();
            assert_eq!(sha256_hex(&bytes), v.sha256, "{}", v.file);
            assert_eq!(v.params, PARAMS, "{}", v.file);
            let pointer = |p: &str| p.ends_with("_ptr");
            let expected: Vec<&str> = PARAMS
                .iter()
                .map(|p| match *p {
                    p if pointer(p) => ".u64",
                    "scale_log2e" => ".f32",
                    _ => ".u32",
                })
                .chain([".u64", ".u64"])
                .collect();
            assert_eq!(v.ptx_params, expected, "{}", v.file);
            assert!(v.warps > 0 && v.block_m > 0, "{}", v.file);
        }
        for d in [40, 64, 80, 160] {
            assert!(
                variant(d, 9).is_some() && variant(d, 8).is_some(),
                "head dim {d}"
            );
        }
        assert!(variant(512, 9).is_none() && variant(64, 7).is_none());
    }

    fn sha256_hex(data: &[u8]) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}
