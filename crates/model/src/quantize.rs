//! `--quantization`: which base weights are block-quantized at load, and the log of it.

use quiver_tensor::quant::quantize;
use quiver_tensor::{Matrix, QuantFormat};

use crate::error::{ModelError, Result};
use crate::prequant::PreQuantized;
use crate::weights::WeightStore;

/// How the base weights are stored once loaded (`--quantization`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quantization {
    /// Every linear of the layers in this format; `None`: the checkpoint's dtype.
    pub format: Option<QuantFormat>,
    /// With a format: keep the LM head (and so a tied embedding) in the checkpoint's dtype
    /// rather than int8.
    pub keep_lm_head: bool,
}

/// Quantizes matrices as they load (each in parallel over its rows) and totals what it did.
pub(crate) struct Quantizer {
    q: Quantization,
    /// The checkpoint's own quantization (GPTQ/AWQ), if any.
    pre: Option<PreQuantized>,
    imported: usize,
    matrices: usize,
    before: usize,
    after: usize,
    seconds: f64,
    /// Bytes of all weight matrices as stored (after any quantization).
    pub(crate) stored: usize,
}

impl Quantizer {
    /// `--quantization` cannot apply to a checkpoint that is quantized already.
    pub(crate) fn new(q: Quantization, pre: Option<PreQuantized>) -> Result<Self> {
        if let (Some(format), Some(p)) = (q.format, pre) {
            return Err(ModelError::Unsupported {
                field: "quantization_config".into(),
                reason: format!(
                    "the checkpoint is quantized already ({:?}, {}-bit): drop `--quantization {format}`",
                    p.method, p.bits
                ),
            });
        }
        Ok(Quantizer {
            q,
            pre,
            imported: 0,
            matrices: 0,
            before: 0,
            after: 0,
            seconds: 0.0,
            stored: 0,
        })
    }

    /// Linear `name` (`[out, in]`): its packed codes where the checkpoint has them (GPTQ/AWQ),
    /// else its weight in the chosen format.
    pub(crate) fn linear(&mut self, w: &WeightStore, name: &str, dims: (usize, usize)) -> Result<Matrix> {
        if let Some(pre) = self.pre.filter(|_| w.contains(&format!("{name}.qweight"))) {
            let start = std::time::Instant::now();
            let m = pre.load_linear(w, name, dims)?;
            self.seconds += start.elapsed().as_secs_f64();
            self.imported += 1;
            self.stored += m.bytes();
            return Ok(m);
        }
        let weight = format!("{name}.weight");
        self.store(w.matrix(&weight, dims.0, dims.1)?, self.q.format, &weight)
    }

    /// The LM head (or the tied embedding): int8 under any quantization unless kept.
    pub(crate) fn lm_head(&mut self, m: Matrix, name: &str) -> Result<Matrix> {
        let format = self
            .q
            .format
            .filter(|_| !self.q.keep_lm_head)
            .map(|_| QuantFormat::Int8);
        self.store(m, format, name)
    }

    fn store(&mut self, m: Matrix, format: Option<QuantFormat>, name: &str) -> Result<Matrix> {
        let Some(format) = format else {
            self.stored += m.bytes();
            return Ok(m);
        };
        let start = std::time::Instant::now();
        let q = quantize(&m, format).map_err(|e| ModelError::Weights(format!("{name}: {e}")))?;
        // The file's pages of this matrix are no longer read; drop them from RSS.
        m.release_file_pages();
        self.seconds += start.elapsed().as_secs_f64();
        self.matrices += 1;
        self.before += m.bytes();
        self.after += q.bytes();
        self.stored += q.bytes();
        Ok(q)
    }

    pub(crate) fn log(&self) {
        if let Some(pre) = self.pre {
            tracing::info!(
                method = ?pre.method,
                bits = pre.bits,
                group_size = pre.group_size.map_or(-1, |g| g as i64),
                matrices = self.imported,
                seconds = format!("{:.2}", self.seconds),
                "loaded the pre-quantized linears into the {} kernels",
                pre.format()
            );
        }
        if let Some(format) = self.q.format {
            tracing::info!(
                %format,
                lm_head = if self.q.keep_lm_head { "kept" } else { "int8" },
                matrices = self.matrices,
                seconds = format!("{:.2}", self.seconds),
                from_mib = format!("{:.1}", mib(self.before)),
                to_mib = format!("{:.1}", mib(self.after)),
                saved_mib = format!("{:.1}", mib(self.before - self.after)),
                "quantized the base weights"
            );
        }
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}
