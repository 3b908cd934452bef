//! Pre-quantized checkpoints, detected from `config.json`'s `quantization_config` as vLLM does:
//! GPTQ (4- or 8-bit, symmetric or not, groups of 32·j or per channel, `desc_act: false`,
//! `checkpoint_format: gptq`) and AWQ (4-bit, GEMM packing, zero points). Anything else is
//! refused at start, naming what is supported.
//!
//! Both store `w = s·(q − z)` per group of the input dimension, with f16 scales `s`. The packed
//! tensors load into the block-quantized kernels of `quiver_tensor::quant` exactly: every block
//! of 32 inputs lies in one group and takes its scale; 4-bit codes become int4 codes (value
//! `(q − 8)·s`), 8-bit codes int8 codes `q − 128`; where a zero point is not 8 (or 128) the
//! block gets the zero shift `8 − z` (or `128 − z`): its values move by the shift times `s`,
//! exact in f32.
//!
//! Packing (AutoGPTQ's and AutoAWQ's, which transformers and vLLM read):
//! * GPTQ: `qweight` int32 `[in / (32/bits), out]`, element `(i, j)` in bits `bits·(i % (32/bits))`
//!   of word `(i / (32/bits), j)`; `qzeros` int32 `[groups, out / (32/bits)]` packed along the
//!   output dimension the same way, holding `z − 1` (the v1 format); `scales` f16
//!   `[groups, out]`; `g_idx` int32 `[in]`, which must be `i / group_size`.
//! * AWQ: `qweight` int32 `[in, out / 8]` and `qzeros` int32 `[groups, out / 8]`, packed along
//!   the output dimension with nibble `t` of a word holding column `8·word + [0, 2, 4, 6, 1, 3,
//!   5, 7][t]`; `scales` f16 `[groups, out]`.

use quiver_tensor::quant::{from_codes, BLOCK};
use quiver_tensor::{DType, Matrix, QuantFormat};
use rayon::prelude::*;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::weights::WeightStore;

/// A checkpoint's quantization method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreQuantMethod {
    Gptq,
    Awq,
}

/// What `quantization_config` says, once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreQuantized {
    pub method: PreQuantMethod,
    /// 4 or 8 (AWQ: 4).
    pub bits: u32,
    /// Inputs per group; `None`: one group per output channel (`group_size: -1`).
    pub group_size: Option<usize>,
}

fn unsupported(field: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Unsupported {
        field: format!("quantization_config.{field}"),
        reason: reason.into(),
    }
}

impl PreQuantized {
    /// Validates `quantization_config`.
    pub fn from_config(q: &Value) -> Result<Self> {
        let int = |key: &str| q.get(key).and_then(Value::as_i64);
        let method = match q.get("quant_method").and_then(Value::as_str) {
            Some("gptq") => PreQuantMethod::Gptq,
            Some("awq") => PreQuantMethod::Awq,
            other => {
                return Err(unsupported(
                    "quant_method",
                    format!(
                        "{} (supported: gptq, awq; or serve a bf16/f16/f32 checkpoint with `--quantization int8` or `int4`)",
                        other.map_or("missing".into(), |m| format!("`{m}`"))
                    ),
                ))
            }
        };
        let bits = int("bits").or(int("w_bit"));
        let bits = match (method, bits) {
            (PreQuantMethod::Gptq, Some(b @ (4 | 8))) | (PreQuantMethod::Awq, Some(b @ 4)) => b as u32,
            (_, b) => {
                let supported = if method == PreQuantMethod::Gptq { "4, 8" } else { "4" };
                return Err(unsupported("bits", format!("{b:?} (supported: {supported})")));
            }
        };
        let group_size = match int("group_size").or(int("q_group_size")) {
            Some(-1) if method == PreQuantMethod::Gptq => None,
            Some(g) if g > 0 && g % BLOCK as i64 == 0 => Some(g as usize),
            g => {
                return Err(unsupported(
                    "group_size",
                    format!("{g:?} (supported: multiples of {BLOCK}, or -1 for GPTQ per channel)"),
                ))
            }
        };
        let flag = |key: &str| q.get(key).and_then(Value::as_bool);
        let text = |key: &str| q.get(key).and_then(Value::as_str);
        match method {
            PreQuantMethod::Gptq => {
                if flag("desc_act") == Some(true) {
                    return Err(unsupported("desc_act", "true (act-order); only desc_act: false"));
                }
                if let Some(f) = text("checkpoint_format").filter(|f| *f != "gptq") {
                    return Err(unsupported("checkpoint_format", format!("`{f}` (supported: gptq)")));
                }
            }
            PreQuantMethod::Awq => {
                if flag("zero_point") == Some(false) {
                    return Err(unsupported("zero_point", "false (only AWQ with zero points)"));
                }
                if let Some(v) = text("version").filter(|v| !v.eq_ignore_ascii_case("gemm")) {
                    return Err(unsupported("version", format!("`{v}` (supported: gemm)")));
                }
            }
        }
        Ok(PreQuantized {
            method,
            bits,
            group_size,
        })
    }

    /// The stored format of this checkpoint's linears.
    pub fn format(&self) -> QuantFormat {
        if self.bits == 8 {
            QuantFormat::Int8
        } else {
            QuantFormat::Int4
        }
    }

    /// Linear `name` (`[out, in]`) from its packed tensors.
    pub fn load_linear(&self, w: &WeightStore, name: &str, (out_f, in_f): (usize, usize)) -> Result<Matrix> {
        let werr = |msg: String| ModelError::Weights(format!("{name}: {msg}"));
        let group = self.group_size.unwrap_or(in_f);
        if in_f % group != 0 {
            return Err(werr(format!(
                "{in_f} inputs are not a whole number of groups of {group}"
            )));
        }
        let pack = (32 / self.bits) as usize;
        if out_f % pack != 0 || (self.method == PreQuantMethod::Gptq && in_f % pack != 0) {
            return Err(werr(format!("[{out_f}, {in_f}] does not pack {pack} codes per int32")));
        }
        let groups = in_f / group;
        let tensor = |suffix: &str| format!("{name}.{suffix}");
        let scales = w.f16s(&tensor("scales"), &[groups, out_f])?;
        let (q, z) = match self.method {
            PreQuantMethod::Gptq => {
                if w.contains(&tensor("g_idx")) {
                    let g_idx = w.i32s(&tensor("g_idx"), &[in_f])?;
                    if let Some(i) = (0..in_f).find(|&i| g_idx[i] as usize != i / group) {
                        return Err(werr(format!(
                            "g_idx[{i}] = {} is not {i} / {group}: act-order checkpoints are not supported",
                            g_idx[i]
                        )));
                    }
                }
                let qweight = w.i32s(&tensor("qweight"), &[in_f / pack, out_f])?;
                let qzeros = w.i32s(&tensor("qzeros"), &[groups, out_f / pack])?;
                let q = Codes::new(out_f, in_f, |j, i| {
                    unpack(qweight[(i / pack) * out_f + j], i % pack, self.bits)
                });
                // v1 stores z − 1.
                let z = Codes::new(out_f, groups, |j, g| {
                    unpack(qzeros[g * (out_f / pack) + j / pack], j % pack, self.bits) + 1
                });
                (q, z)
            }
            PreQuantMethod::Awq => {
                // Nibble of column j % 8 within its word (the inverse of AWQ's [0, 2, 4, 6, 1, 3, 5, 7]).
                const SLOT: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];
                let words = out_f / 8;
                let qweight = w.i32s(&tensor("qweight"), &[in_f, words])?;
                let qzeros = w.i32s(&tensor("qzeros"), &[groups, words])?;
                let q = Codes::new(out_f, in_f, |j, i| unpack(qweight[i * words + j / 8], SLOT[j % 8], 4));
                let z = Codes::new(out_f, groups, |j, g| unpack(qzeros[g * words + j / 8], SLOT[j % 8], 4));
                (q, z)
            }
        };
        // Values (q − 8)·s for int4 codes q; int8 codes are q − 128 as a signed byte.
        let (format, center) = (self.format(), if self.bits == 8 { 128 } else { 8 });
        let codes: Vec<u8> =
            q.0.iter()
                .map(|&q| (q - center * (self.bits == 8) as i32) as u8)
                .collect();
        let nb = in_f.div_ceil(BLOCK);
        let (mut block_scales, mut shifts) = (Vec::with_capacity(out_f * nb), Vec::with_capacity(out_f * nb));
        for j in 0..out_f {
            for b in 0..nb {
                let g = b * BLOCK / group;
                let s = scales[g * out_f + j];
                block_scales.push(s);
                shifts.push((center - z.0[j * groups + g]) as i16);
            }
        }
        let symmetric = z.0.iter().all(|&z| z == center);
        let shifts = (!symmetric).then_some(shifts);
        Ok(from_codes(
            format,
            DType::F16,
            (out_f, in_f),
            &codes,
            &block_scales,
            shifts,
        )?)
    }
}

/// Unpacked codes, `rows × cols` row-major (built in parallel over rows).
struct Codes(Vec<i32>);

impl Codes {
    fn new(rows: usize, cols: usize, at: impl Fn(usize, usize) -> i32 + Sync) -> Self {
        let mut v = vec![0i32; rows * cols];
        if cols > 0 {
            v.par_chunks_mut(cols)
                .enumerate()
                .for_each(|(r, row)| row.iter_mut().enumerate().for_each(|(c, x)| *x = at(r, c)));
        }
        Codes(v)
    }
}

/// Code `slot` (of `32 / bits`) of a packed word.
fn unpack(word: i32, slot: usize, bits: u32) -> i32 {
    ((word as u32 >> (bits as usize * slot)) & ((1u32 << bits) - 1)) as i32
}
