//! Structure-aware fuzzing of adapter files, bounded for CI: a valid PEFT adapter whose
//! `adapter_config.json` fields and safetensors header (dtypes, shapes, offsets, names, the header
//! length, the bytes around it) are mutated at random. Every load must end in `Ok` or an error
//! that names the adapter — never a panic. `QUIVER_FUZZ_CASES` / `QUIVER_FUZZ_SEED` run more or
//! other cases; a failure prints its seed and case number.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use quiver_adapters::load_peft_adapter;
use quiver_model::ModelConfig;
use quiver_testkit::{adapter_spec_by_name, spec_by_name, write_adapter, write_model};
use serde_json::{json, Value};

const NAME: &str = "llama-r8-all-linear";

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn odd_value(rng: &mut Rng) -> Value {
    let values = [
        Value::Null,
        json!(true),
        json!(0),
        json!(-1),
        json!(1),
        json!(3),
        json!(1e300),
        json!(-1e300),
        json!(u64::MAX),
        json!(0.5),
        json!(""),
        json!("q_proj"),
        json!("all-linear"),
        json!(["q_proj", "nope"]),
        json!({"model.layers.0": 4}),
        json!({".*q_proj": 1e38}),
        json!([0, 1, 99]),
        json!("(unclosed"),
        json!([]),
        json!({}),
    ];
    values[rng.below(values.len())].clone()
}

const CONFIG_FIELDS: &[&str] = &[
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "layers_to_transform",
    "layers_pattern",
    "bias",
    "use_dora",
    "modules_to_save",
    "peft_type",
    "task_type",
    "lora_dropout",
    "init_lora_weights",
    "exclude_modules",
    "base_model_name_or_path",
    "unknown_field",
];

fn mutate_config(rng: &mut Rng, config: &mut Value) {
    let Some(obj) = config.as_object_mut() else { return };
    let field = CONFIG_FIELDS[rng.below(CONFIG_FIELDS.len())].to_string();
    if rng.below(4) == 0 {
        obj.remove(&field);
    } else {
        obj.insert(field, odd_value(rng));
    }
}

/// Mutates one tensor entry of the header: dtype, shape, offsets, or its name.
fn mutate_header(rng: &mut Rng, header: &mut Value) {
    let Some(obj) = header.as_object_mut() else { return };
    let names: Vec<String> = obj.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if names.is_empty() {
        return;
    }
    let name = names[rng.below(names.len())].clone();
    if !obj[&name].is_object() {
        return;
    }
    match rng.below(7) {
        0 => {
            let dtypes = ["F64", "I8", "BOOL", "BF16", "F16", "F32", "U64", "nope"];
            obj[&name]["dtype"] = json!(dtypes[rng.below(dtypes.len())]);
        }
        1 => {
            let shapes = [
                json!([]),
                json!([0, 8]),
                json!([1u64 << 40, 1u64 << 40]),
                json!([8]),
                json!([9, 8, 1]),
                json!([u64::MAX, 2]),
            ];
            obj[&name]["shape"] = shapes[rng.below(shapes.len())].clone();
        }
        2 => {
            let a = rng.below(1 << 20) as u64;
            obj[&name]["data_offsets"] = json!([a, a + rng.below(1 << 12) as u64]);
        }
        3 => obj[&name]["data_offsets"] = json!([0, u64::MAX]),
        4 => {
            if let Some(v) = obj.remove(&name) {
                let renamed = name.replace("layers.1", "layers.999").replace("lora_A", "lora_Z");
                obj.insert(renamed, v);
            }
        }
        5 => {
            obj.remove(&name);
        }
        _ => obj[&name] = odd_value(rng),
    }
}

/// Rewrites `adapter_model.safetensors` with a mutated header and/or mangled bytes.
fn mutate_weights(rng: &mut Rng, original: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(original[..8].try_into().expect("8 bytes")) as usize;
    let mut header: Value = serde_json::from_slice(&original[8..8 + n]).expect("the fixture's header");
    let data = &original[8 + n..];
    for _ in 0..1 + rng.below(3) {
        mutate_header(rng, &mut header);
    }
    let text = serde_json::to_vec(&header).expect("JSON");
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&text);
    bytes.extend_from_slice(data);
    match rng.below(8) {
        0 => bytes.truncate(rng.below(bytes.len())),
        1 => bytes[..8].copy_from_slice(&(rng.next() >> rng.below(64)).to_le_bytes()),
        2 => {
            let i = 8 + rng.below(text.len());
            bytes[i] = rng.next() as u8;
        }
        3 => bytes.extend_from_slice(&[0u8; 3]),
        _ => {}
    }
    bytes
}

fn load_case(dir: &Path, cfg: &ModelConfig) -> Result<bool, String> {
    match catch_unwind(AssertUnwindSafe(|| load_peft_adapter("fuzzed", dir, cfg))) {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) => {
            let msg = e.to_string();
            if msg.contains("adapter `fuzzed`") {
                Ok(false)
            } else {
                Err(format!("an error that does not name the adapter: {msg}"))
            }
        }
        Err(_) => Err("the loader panicked".into()),
    }
}

#[test]
fn fuzzed_adapter_files_are_loaded_or_refused_never_a_panic() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let spec = adapter_spec_by_name(NAME).expect("test-kit adapter");
    write_model(&spec_by_name(&spec.base).expect("base spec"), &tmp.path().join("base")).expect("model");
    let cfg = ModelConfig::from_dir(&tmp.path().join("base")).expect("config");
    let dir = tmp.path().join("adapter");
    write_adapter(&spec, &dir).expect("adapter");
    let config: Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).expect("config")).expect("JSON");
    let weights = std::fs::read(dir.join("adapter_model.safetensors")).expect("weights");

    let cases: usize = std::env::var("QUIVER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let seed: u64 = std::env::var("QUIVER_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xada);
    let mut rng = Rng(seed);
    let (mut loaded, mut refused) = (0, 0);
    for case in 0..cases {
        let mut c = config.clone();
        let w = match rng.below(3) {
            0 => {
                (0..1 + rng.below(3)).for_each(|_| mutate_config(&mut rng, &mut c));
                weights.clone()
            }
            1 => mutate_weights(&mut rng, &weights),
            _ => {
                mutate_config(&mut rng, &mut c);
                mutate_weights(&mut rng, &weights)
            }
        };
        std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec(&c).expect("JSON")).expect("write");
        std::fs::write(dir.join("adapter_model.safetensors"), &w).expect("write");
        match load_case(&dir, &cfg) {
            Ok(true) => loaded += 1,
            Ok(false) => refused += 1,
            Err(e) => panic!("case {case} (seed {seed}): {e}\nconfig: {c}"),
        }
    }
    eprintln!("{loaded} loaded, {refused} refused");
    assert!(
        refused > cases / 2,
        "too few cases refused ({refused} of {cases}): the mutations do not bite"
    );
    assert!(loaded > 0, "no case loaded: the mutations never leave a valid adapter");
}
