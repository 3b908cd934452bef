//! Any bytes as `adapter_config.json`: PEFT's fields parse into a config or a field error for
//! every architecture, never a panic (regexes in patterns included).
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_adapters::LoraConfig;
use quiver_model::Arch;

fuzz_target!(|bytes: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(bytes) else { return };
    for arch in [Arch::Llama, Arch::Mistral, Arch::Qwen2] {
        let _ = LoraConfig::parse(&json, arch);
    }
});
