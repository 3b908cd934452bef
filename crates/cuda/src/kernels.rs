//! The `.cu` sources in `kernels/`, embedded in the binary and compiled with NVRTC for the
//! device's compute capability at start-up. PTX is cached on disk, keyed by a hash of the source
//! and the architecture, so later starts skip the compiler.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{CompileOptions, Ptx};
use sha2::{Digest, Sha256};

use crate::error::CudaError;

const PRELUDE: &str = include_str!("../../../kernels/common.cuh");

/// Every kernel source and the entry points it defines.
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "elementwise",
        include_str!("../../../kernels/elementwise.cu"),
        &[
            "embed_f32",
            "embed_bf16",
            "embed_f16",
            "add_bias",
            "add",
            "silu_mul",
            "rms_norm",
            "rope",
            "gather_rows",
            "to_bf16",
            "to_f16",
        ],
    ),
    (
        "gemv",
        include_str!("../../../kernels/gemv.cu"),
        &["gemv_f32", "gemv_bf16", "gemv_f16"],
    ),
    (
        "gemv_quant",
        include_str!("../../../kernels/gemv_quant.cu"),
        &[
            "gemv_q8",
            "gemv_q4",
            "block_sums",
            "dequant_q8_f16",
            "dequant_q4_f16",
            "embed_q8",
            "embed_q4",
        ],
    ),
    (
        "attention",
        include_str!("../../../kernels/attention.cu"),
        &[
            "write_kv_f32",
            "write_kv_bf16",
            "write_kv_f16",
            "paged_attention_f32",
            "paged_attention_bf16",
            "paged_attention_f16",
        ],
    ),
    (
        "lora",
        include_str!("../../../kernels/lora.cu"),
        &[
            "lora_shrink_f32",
            "lora_shrink_bf16",
            "lora_expand_f32",
            "lora_expand_bf16",
            "scatter_pages",
        ],
    ),
];

/// The full text NVRTC compiles for one source: the shared prelude, then the file.
pub fn full_source(src: &str) -> String {
    format!("{PRELUDE}\n{src}")
}

/// `sm_90` → the virtual architecture NVRTC emits PTX for.
fn arch_option(arch: &str) -> Result<&'static str, CudaError> {
    const KNOWN: &[(&str, &str)] = &[
        ("sm_70", "compute_70"),
        ("sm_75", "compute_75"),
        ("sm_80", "compute_80"),
        ("sm_86", "compute_86"),
        ("sm_87", "compute_87"),
        ("sm_89", "compute_89"),
        ("sm_90", "compute_90"),
        ("sm_100", "compute_100"),
        ("sm_120", "compute_120"),
    ];
    KNOWN
        .iter()
        .find(|(sm, _)| *sm == arch)
        .map(|(_, c)| *c)
        .ok_or_else(|| CudaError::Unavailable(format!("no kernel build for architecture {arch}")))
}

/// Whether the NVRTC library can be loaded (cudarc panics on a missing library, so ask first).
pub fn nvrtc_available() -> bool {
    // SAFETY: only dlopen()s the library; no symbol is called.
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// Compiles one source to PTX text for `arch` (e.g. `sm_90`).
pub fn compile_ptx(name: &str, src: &str, arch: &str) -> Result<String, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::Unavailable("libnvrtc not found (install CUDA or the nvidia-cuda-nvrtc-cu12 wheel and put its lib dir on LD_LIBRARY_PATH)".into()));
    }
    let opts = CompileOptions {
        arch: Some(arch_option(arch)?),
        options: vec!["--std=c++17".into(), "-default-device".into()],
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(full_source(src), opts).map_err(|e| CudaError::Compile {
        kernel: name.into(),
        arch: arch.into(),
        log: e.to_string(),
    })?;
    Ok(ptx.to_src())
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("QUIVER_PTX_CACHE") {
        return Some(dir.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
    Some(base.join("quiver").join("ptx"))
}

/// PTX for one source, from the disk cache when the same source was compiled for `arch` before.
pub fn cached_ptx(name: &str, src: &str, arch: &str) -> Result<String, CudaError> {
    let mut hash = Sha256::new();
    hash.update(full_source(src).as_bytes());
    hash.update(arch.as_bytes());
    let key: String = hash.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
    let path = cache_dir().map(|d| d.join(format!("{name}-{arch}-{key}.ptx")));
    if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok(text);
    }
    let ptx = compile_ptx(name, src, arch)?;
    if let Some(p) = &path {
        // A cache that cannot be written only costs a recompile next time.
        let written = p
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::write(p, &ptx));
        if let Err(e) = written {
            tracing::warn!(path = %p.display(), error = %e, "cannot cache PTX");
        }
    }
    Ok(ptx)
}

/// Every entry point, loaded into one context.
pub struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Kernels, CudaError> {
        let mut functions = HashMap::new();
        for (name, src, entries) in SOURCES {
            let module = ctx.load_module(Ptx::from_src(cached_ptx(name, src, arch)?))?;
            for entry in *entries {
                functions.insert(*entry, module.load_function(entry)?);
            }
        }
        Ok(Kernels { functions })
    }

    pub fn get(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.functions
            .get(name)
            .ok_or_else(|| CudaError::Driver(format!("kernel {name} not loaded")))
    }
}
