//! Greedy generation for one prompt: the `quiver generate` command and the golden tests.

use std::sync::Arc;

use quiver_tensor::Backend;

use crate::error::{ModelError, Result};
use crate::kv::{BatchBuilder, BlockAllocator, SequenceCache};
use crate::llama::Llama;
use crate::lora::LoraAdapter;

/// An adapter resident in `pool`, for [`generate_greedy`].
pub type WithAdapter<'a, B> = Option<(&'a <B as Backend>::PagePool, &'a Arc<LoraAdapter>)>;

pub const BLOCK_SIZE: usize = 16;

/// Index of the largest logit (first one on ties, like `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Prefills `prompt` and decodes up to `max_tokens` greedily (through `adapter` if given),
/// stopping after any of `stop`. `on_token` sees each new token as it is produced.
pub fn generate_greedy<B: Backend>(
    model: &Llama<B>,
    prompt: &[u32],
    max_tokens: usize,
    stop: &[u32],
    adapter: WithAdapter<'_, B>,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(ModelError::Input("empty prompt".into()));
    }
    let total = prompt.len() + max_tokens;
    if total > model.max_positions() {
        return Err(ModelError::Input(format!(
            "prompt ({}) + max tokens ({max_tokens}) exceed the context {}",
            prompt.len(),
            model.max_positions()
        )));
    }
    let mut alloc = BlockAllocator::new(total.div_ceil(BLOCK_SIZE), BLOCK_SIZE);
    let mut kv = model.new_kv_pool(alloc.total(), BLOCK_SIZE)?;
    let mut seq = SequenceCache::default();
    let mut out = Vec::new();
    let mut next: Vec<u32> = prompt.to_vec();
    while out.len() < max_tokens {
        seq.reserve(&mut alloc, next.len())
            .map_err(|_| ModelError::Input("KV cache exhausted".into()))?;
        let mut batch = BatchBuilder::new();
        batch.push_with_adapter(&mut seq, BLOCK_SIZE, &next, true, adapter.map(|(_, a)| a));
        let logits = model.forward_with_adapters(&batch.finish(), &mut kv, adapter.map(|(p, _)| p))?;
        let logits = model.backend.download(&logits)?;
        let token = argmax(&logits);
        out.push(token);
        on_token(token);
        if stop.contains(&token) {
            break;
        }
        next = vec![token];
    }
    Ok(out)
}
