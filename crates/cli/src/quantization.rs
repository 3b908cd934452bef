//! `--quantization` and friends, shared by `quiver serve` and `quiver generate`.

use quiver_model::Quantization;
use quiver_tensor::QuantFormat;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct QuantizationArgs {
    /// Quantize the base model's linear weights at load: int8 or int4, in blocks of 32 input
    /// features with one f16 scale each (int8: 8.5 bits per weight; int4: 4.5). The LM head
    /// (and a tied embedding) becomes int8 in both modes. Default: the checkpoint's dtype (GPTQ
    /// and AWQ checkpoints are read from their quantization_config, without this flag).
    #[arg(long, env = "QUIVER_QUANTIZATION")]
    pub quantization: Option<QuantFormat>,
    /// With --quantization: keep the LM head (and a tied embedding) in the checkpoint's dtype.
    #[arg(long, env = "QUIVER_QUANTIZATION_KEEP_LM_HEAD")]
    pub quantization_keep_lm_head: bool,
}

impl QuantizationArgs {
    pub fn get(&self) -> Quantization {
        Quantization {
            format: self.quantization,
            keep_lm_head: self.quantization_keep_lm_head,
        }
    }
}
