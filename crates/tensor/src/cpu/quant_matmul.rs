//! `out[m, n] = x[m, k] · Wᵀ` for block-quantized W ([`crate::quant`]), on the weight-streaming
//! design of `matmul.rs`: rayon tasks take runs of 16-row panels, and each streams its panels
//! from memory once for all x rows.
//!
//! Two paths, by the number of x rows m:
//! * **f32** (a single row, [`INT_MIN_M`]): each 64-byte load of codes is widened to f32 in
//!   registers, multiplied with x and scaled per block, all in f32: x times the dequantized
//!   weights, up to summation order (logits within ~1e-5 of transformers on those weights).
//! * **integer** (from `INT_MIN_M` rows on, or always under `Precision::Int8Activations`): x is
//!   quantized per block of 32 to int8 (scale `max|x| / 127` in f32, as llama.cpp's Q8_0
//!   activations) and each block is an exact integer dot product (`vpdpbusd` with AVX-512 VNNI,
//!   `vpmaddubsw` + `vpmaddwd` with AVX2), scaled by both blocks' scales into an f32 sum. Each x
//!   value moves by up to 1/254 of its block's largest |x|: logits ~1–2% of their largest
//!   magnitude off on the test models.
//!
//! Measured on Zen 5 (2 threads, Qwen2.5-0.5B shapes, `benches/benches/quant.rs`): the integer
//! path is faster at every batch size, 1.3–1.8× at one row, where the f32 path is bound by its
//! conversions (~55 GB/s of int8 codes) and the integer one by memory (~95 GB/s). A single row —
//! one user's decode — keeps f32 activations by default all the same; from two rows on, where
//! the f32 path falls further behind with every row, the integer path runs.
//!
//! Which kernels run is decided once per process from [`super::features`] ([`paths`]).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::{quant_scalar, SendPtr};
use crate::quant::{QuantData, QuantFormat, BLOCK, PANEL};

/// An instruction set the kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F/BW for the f32 path; AVX-512 VNNI for the integer path.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The kernels quantized matmuls use on this CPU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuantPaths {
    pub f32: Isa,
    pub int: Isa,
    /// x rows from which the integer path runs (`usize::MAX`: never).
    pub int_min_m: usize,
}

/// x rows from which the integer path runs by default (see the module docs). The AVX2 integer
/// kernels (forced on Zen 5) beat the AVX2 f32 ones by 1.5–2.5× from one row on as well.
pub const INT_MIN_M: usize = 2;

/// The paths for this CPU, chosen on first use.
pub(crate) fn paths() -> &'static QuantPaths {
    static PATHS: OnceLock<QuantPaths> = OnceLock::new();
    PATHS.get_or_init(|| {
        let f = super::features();
        #[cfg(target_arch = "x86_64")]
        {
            let f32 = if f.avx512f_bw() {
                Isa::Avx512
            } else if f.avx2_fma_f16c() {
                Isa::Avx2
            } else {
                Isa::Scalar
            };
            let int = if f.avx512_vnni() {
                Isa::Avx512
            } else if f.avx2_fma_f16c() {
                Isa::Avx2
            } else {
                Isa::Scalar
            };
            QuantPaths {
                f32,
                int,
                int_min_m: INT_MIN_M,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = f;
            QuantPaths {
                f32: Isa::Scalar,
                int: Isa::Scalar,
                int_min_m: INT_MIN_M,
            }
        }
    })
}

/// x for the f32 path: rows of `kp` (whole blocks, zero-padded) and each block's sum (the int4
/// kernels accumulate unsigned codes and subtract `8 · d · sum` per block).
pub(crate) struct XF32<'a> {
    pub x: &'a [f32],
    pub kp: usize,
    pub sums: Vec<f32>,
}

/// x for the integer path, quantized per block: codes (rows of `kp`), f32 scales and code sums
/// (`m × blocks` each).
#[derive(Default)]
pub(crate) struct XInt {
    pub q: Vec<i8>,
    pub kp: usize,
    pub scale: Vec<f32>,
    pub sums: Vec<i32>,
}

/// A run of consecutive panels of a quantized matrix: `rows` valid rows (the last panel may be
/// partial), `blocks` blocks per row.
pub(crate) struct Panels<'a> {
    pub format: QuantFormat,
    pub blocks: usize,
    pub rows: usize,
    pub codes: &'a [u8],
    /// f16 bits.
    pub scales: &'a [u16],
    /// The rows' zero shifts (`rows × blocks`), if any; the kernels leave them to
    /// [`add_zero_shifts`].
    pub zero_shifts: Option<&'a [i16]>,
}

impl Panels<'_> {
    pub(crate) fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    /// Scale of row `lane` of panel `p`, block `b`, widened.
    pub(crate) fn scale(&self, p: usize, b: usize, lane: usize) -> f32 {
        half::f16::from_bits(self.scales[(p * self.blocks + b) * PANEL + lane]).to_f32()
    }

    /// Panics unless the buffers hold these panels and `out` has room for `m` rows of `ldo`.
    pub(crate) fn check_out(&self, m: usize, out_len: usize, ldo: usize) {
        let np = self.panels();
        assert!(
            self.codes.len() >= np * self.blocks * self.format.panel_block_bytes()
                && self.scales.len() >= np * self.blocks * PANEL,
            "quantized panels: buffers too short"
        );
        assert!(
            m == 0 || (ldo >= self.rows && out_len >= (m - 1) * ldo + self.rows),
            "quantized panels: out too short"
        );
    }
}

thread_local! {
    /// Quantized x of the integer path; taken out while in use (a nested call makes its own).
    static X_INT: std::cell::Cell<XInt> = const {
        std::cell::Cell::new(XInt {
            q: Vec::new(),
            kp: 0,
            scale: Vec::new(),
            sums: Vec::new(),
        })
    };
    /// A task's block of the output before it is copied into place.
    static LOCAL: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };    /// x's f32 block sums for [`add_zero_shifts`], reused likewise.
    static X_SUMS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Smallest slice of weights (bytes) given to one rayon task.
const TASK_MIN_BYTES: usize = 64 << 10;

/// `out = x · Wᵀ` with the paths of this CPU; `int8_always`: the integer path at every m.
pub(crate) fn matmul_quant(x: &[f32], m: usize, k: usize, n: usize, w: &QuantData, out: &mut [f32], int8_always: bool) {
    let p = paths();
    if int8_always {
        matmul_quant_with(x, m, k, n, w, out, &QuantPaths { int_min_m: 1, ..*p })
    } else {
        matmul_quant_with(x, m, k, n, w, out, p)
    }
}

/// `out = x · Wᵀ` with the given paths (tests force each one). `x` is `m × k`, `out` `m × n`.
pub(crate) fn matmul_quant_with(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    w: &QuantData,
    out: &mut [f32],
    paths: &QuantPaths,
) {
    assert_eq!(x.len(), m * k, "quantized matmul: x is not m × k");
    assert_eq!(out.len(), m * n, "quantized matmul: out is not m × n");
    assert_eq!(
        (w.blocks, w.panels),
        (k.div_ceil(BLOCK), n.div_ceil(PANEL)),
        "quantized matmul: shape"
    );
    if m == 0 || n == 0 {
        return;
    }
    let (nb, kp) = (w.blocks, w.blocks * BLOCK);
    let mut x_sums = X_SUMS.take();
    if w.zero_shifts.is_some() {
        x_sums.clear();
        x_sums.extend(
            x.chunks_exact(k)
                .flat_map(|row| row.chunks(BLOCK).map(|c| c.iter().sum::<f32>())),
        );
    }
    let shifts = |p: &Panels<'_>, o: &mut [f32], ldo: usize| add_zero_shifts(p, &x_sums, m, o, ldo);
    if m >= paths.int_min_m {
        // Buffers reused across calls: fresh ones would cost a page fault every 4 KB per call.
        let mut xi = X_INT.take();
        xi.q.resize(m * kp, 0);
        xi.kp = kp;
        xi.scale.resize(m * nb, 0.0);
        xi.sums.resize(m * nb, 0);
        quantize_x(paths.f32, x, m, k, &mut xi);
        let isa = paths.int;
        stream(w, m, n, out, |p, o, ldo| {
            int_panels(isa, &xi, m, p, o, ldo);
            shifts(p, o, ldo);
        });
        X_INT.set(xi);
    } else {
        let padded;
        let xs = if kp == k {
            x
        } else {
            padded = pad_rows(x, m, k, kp);
            &padded
        };
        let mut xf = XF32 {
            x: xs,
            kp,
            sums: Vec::new(),
        };
        if w.format == QuantFormat::Int4 {
            xf.sums = xs.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
        }
        let isa = paths.f32;
        stream(w, m, n, out, |p, o, ldo| {
            f32_panels(isa, &xf, m, p, o, ldo);
            shifts(p, o, ldo);
        });
    }
    X_SUMS.set(x_sums);
}

/// The zero shifts' share of the panels' outputs (see [`crate::quant`]): `out[i·ldo + r] +=
/// Σ_b s[r, b]·d[r, b]·sums[i, b]`, `sums` being x's f32 block sums (`m × blocks`). One
/// summation order whatever m, as the batch-invariant mode needs.
fn add_zero_shifts(p: &Panels<'_>, sums: &[f32], m: usize, out: &mut [f32], ldo: usize) {
    use half::slice::HalfFloatSliceExt;
    let Some(shifts) = p.zero_shifts else { return };
    let nb = p.blocks;
    // A panel's scales widened at once (F16C where present) and transposed to one run per row,
    // so the coefficients below are one vectorizable pass per row.
    let (mut d, mut by_row, mut coef) = (vec![0.0f32; nb * PANEL], vec![0.0f32; nb * PANEL], vec![0.0f32; nb]);
    for pi in 0..p.panels() {
        let scales: &[half::f16] = bytemuck::cast_slice(&p.scales[pi * nb * PANEL..(pi + 1) * nb * PANEL]);
        scales.convert_to_f32_slice(&mut d);
        for (b, block) in d.chunks_exact(PANEL).enumerate() {
            for (lane, &v) in block.iter().enumerate() {
                by_row[lane * nb + b] = v;
            }
        }
        for lane in 0..PANEL.min(p.rows - pi * PANEL) {
            let r = pi * PANEL + lane;
            let (row_shifts, row_scales) = (&shifts[r * nb..(r + 1) * nb], &by_row[lane * nb..(lane + 1) * nb]);
            for ((c, &z), &s) in coef.iter_mut().zip(row_shifts).zip(row_scales) {
                *c = z as f32 * s;
            }
            for i in 0..m {
                out[i * ldo + r] += dot8(&coef, &sums[i * nb..(i + 1) * nb]);
            }
        }
    }
}

/// `Σ a·b` in eight lanes (vectorized by the compiler), then the lanes in order.
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// x quantized per block for the integer path (the same codes whatever `isa`).
pub(crate) fn quantize_x(isa: Isa, x: &[f32], m: usize, k: usize, out: &mut XInt) {
    assert!(
        x.len() >= m * k && out.kp >= k && out.q.len() >= m * out.kp && out.scale.len() >= m * (out.kp / BLOCK),
        "quantize_x: buffers"
    );
    assert!(out.sums.len() >= m * (out.kp / BLOCK), "quantize_x: sums");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if super::features().avx512f_bw() => {
            // SAFETY: features checked; the asserts above bound every access.
            unsafe { super::quant_avx512::quantize_x(x, m, k, out) }
        }
        _ => quant_scalar::quantize_x(x, m, k, out),
    }
}

/// Rows of `k` copied into rows of `kp` ≥ k, zero-padded.
fn pad_rows(x: &[f32], m: usize, k: usize, kp: usize) -> Vec<f32> {
    let mut v = vec![0.0; m * kp];
    for (d, s) in v.chunks_exact_mut(kp).zip(x.chunks_exact(k)) {
        d[..k].copy_from_slice(s);
    }
    v
}

/// Splits W's panels across rayon tasks; `kernel(panels, out, ldo)` writes the panels' rows of
/// every x row at `out[i * ldo + r]`.
fn stream(w: &QuantData, m: usize, n: usize, out: &mut [f32], kernel: impl Fn(&Panels<'_>, &mut [f32], usize) + Sync) {
    let pbb = w.format.panel_block_bytes() * w.blocks;
    let sb = PANEL * w.blocks;
    let scales: &[u16] = bytemuck::cast_slice(w.scales.as_slice());
    let run = |p0: usize, np: usize| Panels {
        format: w.format,
        blocks: w.blocks,
        rows: (n - p0 * PANEL).min(np * PANEL),
        codes: &w.codes[p0 * pbb..(p0 + np) * pbb],
        scales: &scales[p0 * sb..(p0 + np) * sb],
        zero_shifts: w.zero_shifts.as_ref().map(|z| {
            let rows = (n - p0 * PANEL).min(np * PANEL);
            &z[p0 * PANEL * w.blocks..(p0 * PANEL + rows) * w.blocks]
        }),
    };
    let tasks = 8 * rayon::current_num_threads();
    let per = w
        .panels
        .div_ceil(tasks)
        .max(TASK_MIN_BYTES.div_ceil(pbb + 2 * sb))
        .min(w.panels);
    if per >= w.panels {
        kernel(&run(0, w.panels), out, n);
        return;
    }
    let chunk = per * PANEL;
    if m == 1 {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(t, o)| kernel(&run(t * per, per.min(w.panels - t * per)), o, o.len()));
        return;
    }
    let dst = SendPtr(out.as_mut_ptr());
    (0..w.panels.div_ceil(per)).into_par_iter().for_each(|t| {
        let p = run(t * per, per.min(w.panels - t * per));
        let (j0, nr) = (t * chunk, p.rows);
        // The kernel writes every element of its m × nr block.
        let mut local = LOCAL.take();
        local.resize(m * nr, 0.0);
        kernel(&p, &mut local[..m * nr], nr);
        for (i, src) in local[..m * nr].chunks_exact(nr).enumerate() {
            // SAFETY: `out` is exclusively borrowed for this call and has m·n elements; task t
            // writes only columns j0..j0 + nr (≤ n) of each row i < m, disjoint between tasks.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.get().add(i * n + j0), nr) };
        }
        LOCAL.set(local);
    });
}

/// The f32 path on one run of panels with the kernels of `isa`.
pub(crate) fn f32_panels(isa: Isa, x: &XF32<'_>, m: usize, w: &Panels<'_>, out: &mut [f32], ldo: usize) {
    w.check_out(m, out.len(), ldo);
    assert!(x.x.len() >= m * x.kp && x.kp == w.blocks * BLOCK, "quantized matmul: x");
    assert!(
        w.format == QuantFormat::Int8 || x.sums.len() >= m * w.blocks,
        "quantized matmul: x sums"
    );
    match isa {
        Isa::Scalar => quant_scalar::f32_panels(x, m, w, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(
                super::features().avx2_fma_f16c(),
                "AVX2 kernels on a CPU without AVX2/FMA/F16C"
            );
            // SAFETY: features checked; the asserts above bound every x, code, scale and out index.
            unsafe { super::quant_avx2::f32_panels(x, m, w, out.as_mut_ptr(), ldo) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(
                super::features().avx512f_bw(),
                "AVX-512 kernels on a CPU without AVX-512F/BW"
            );
            // SAFETY: as above.
            unsafe { super::quant_avx512::f32_panels(x, m, w, out.as_mut_ptr(), ldo) }
        }
    }
}

/// The integer path on one run of panels with the kernels of `isa`.
pub(crate) fn int_panels(isa: Isa, x: &XInt, m: usize, w: &Panels<'_>, out: &mut [f32], ldo: usize) {
    w.check_out(m, out.len(), ldo);
    assert!(
        x.q.len() >= m * x.kp
            && x.kp == w.blocks * BLOCK
            && x.scale.len() >= m * w.blocks
            && x.sums.len() >= m * w.blocks,
        "quantized matmul: x"
    );
    match isa {
        Isa::Scalar => quant_scalar::int_panels(x, m, w, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(
                super::features().avx2_fma_f16c(),
                "AVX2 kernels on a CPU without AVX2/FMA/F16C"
            );
            // SAFETY: features checked; the asserts above bound every x, code, scale and out index.
            unsafe { super::quant_avx2::int_panels(x, m, w, out.as_mut_ptr(), ldo) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(
                super::features().avx512_vnni(),
                "VNNI kernels on a CPU without AVX-512 VNNI"
            );
            // SAFETY: as above.
            unsafe { super::quant_avx512::int_panels(x, m, w, out.as_mut_ptr(), ldo) }
        }
    }
}

/// Benchmarks only: a quantized matmul on a chosen path and instruction set, whatever the
/// batch size (to measure where the integer path starts paying, [`QuantPaths::int_min_m`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForcedPath {
    /// This CPU's best f32 kernels.
    F32,
    /// This CPU's best integer kernels.
    Int,
    /// The AVX2 f32 kernels (x86 with AVX2 only).
    Avx2F32,
    /// The AVX2 integer kernels (x86 with AVX2 only).
    Avx2Int,
}

#[doc(hidden)]
pub fn matmul_quant_forced(x: &[f32], m: usize, w: &crate::Matrix, out: &mut [f32], path: ForcedPath) {
    let crate::MatrixData::Quant(q) = &w.data else {
        panic!("matmul_quant_forced: not a quantized matrix")
    };
    let best = *paths();
    let p = match path {
        ForcedPath::F32 => QuantPaths {
            int_min_m: usize::MAX,
            ..best
        },
        ForcedPath::Int => QuantPaths { int_min_m: 1, ..best },
        #[cfg(target_arch = "x86_64")]
        ForcedPath::Avx2F32 | ForcedPath::Avx2Int => QuantPaths {
            f32: Isa::Avx2,
            int: Isa::Avx2,
            int_min_m: if path == ForcedPath::Avx2Int { 1 } else { usize::MAX },
        },
        #[cfg(not(target_arch = "x86_64"))]
        _ => panic!("no AVX2 off x86"),
    };
    matmul_quant_with(x, m, w.cols, w.rows, q, out, &p)
}
