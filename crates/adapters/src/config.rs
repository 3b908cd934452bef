//! `adapter_config.json` with PEFT's semantics: which modules a LoRA config targets and with
//! which rank and alpha. Unsupported options are refused, naming the field.

use std::fmt;

use regex::Regex;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use quiver_model::{Arch, ModelConfig, ModuleKind};

/// Regex patterns in document order (PEFT takes the first that matches).
#[derive(Debug, Default, Clone)]
struct OrderedMap(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<OrderedMap, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = m.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(OrderedMap(out))
            }
            fn visit_unit<E>(self) -> Result<OrderedMap, E> {
                Ok(OrderedMap::default())
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    r: Option<Value>,
    lora_alpha: Option<Value>,
    #[serde(default)]
    use_rslora: Option<bool>,
    target_modules: Option<Value>,
    exclude_modules: Option<Value>,
    #[serde(default)]
    rank_pattern: OrderedMap,
    #[serde(default)]
    alpha_pattern: OrderedMap,
    layers_to_transform: Option<Value>,
    layers_pattern: Option<Value>,
    fan_in_fan_out: Option<bool>,
    bias: Option<String>,
    use_dora: Option<bool>,
    modules_to_save: Option<Value>,
    lora_bias: Option<bool>,
    layer_replication: Option<Value>,
    target_parameters: Option<Value>,
}

/// Module selection as PEFT's `check_target_module_exists` does it.
#[derive(Debug, Clone)]
enum Targets {
    /// A module matches when its name equals an entry or ends with `.` + entry.
    List(Vec<String>),
    /// `re.fullmatch` on the module name; `layers_to_transform` does not apply.
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    targets: Targets,
    exclude: Option<Targets>,
    rank_pattern: Vec<(Regex, usize)>,
    alpha_pattern: Vec<(Regex, f64)>,
    layers_to_transform: Option<Vec<usize>>,
}

/// One module the config adapts, with its effective rank and scale.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetModule {
    pub layer: usize,
    pub kind: ModuleKind,
    pub rank: usize,
    pub scale: f32,
}

type FieldError = (String, String);

fn ferr(field: &str, reason: impl Into<String>) -> FieldError {
    (field.to_string(), reason.into())
}

fn pos_int(field: &str, v: &Value) -> Result<usize, FieldError> {
    v.as_u64()
        .filter(|&n| n > 0)
        .map(|n| n as usize)
        .ok_or_else(|| ferr(field, format!("expected a positive integer, got {v}")))
}

fn number(field: &str, v: &Value) -> Result<f64, FieldError> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| ferr(field, format!("expected a number, got {v}")))
}

/// The key a [`pattern_regex`] was built from, for error messages.
fn pattern_key(re: &Regex) -> &str {
    re.as_str()
        .strip_prefix(r"^(?:.*\.)?(?:")
        .and_then(|p| p.strip_suffix(")$"))
        .unwrap_or(re.as_str())
}

/// PEFT's `get_pattern_key`: the pattern `p` matches a module name when `(.*\.)?(p)$` matches
/// from its start.
fn pattern_regex(field: &str, p: &str) -> Result<Regex, FieldError> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{p})$"))
        .map_err(|e| ferr(&format!("{field}.{p}"), format!("invalid regex: {e}")))
}

fn parse_targets(field: &str, v: &Value) -> Result<Targets, FieldError> {
    match v {
        Value::String(s) if s == "all-linear" => Ok(Targets::List(
            ModuleKind::ALL.iter().map(|k| k.proj_name().to_string()).collect(),
        )),
        Value::String(s) => Regex::new(&format!("^(?:{s})$"))
            .map(Targets::Regex)
            .map_err(|e| ferr(field, format!("invalid regex: {e}"))),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ferr(field, format!("expected strings, got {i}")))
            })
            .collect::<Result<_, _>>()
            .map(Targets::List),
        other => Err(ferr(
            field,
            format!("expected a list, a regex string or \"all-linear\", got {other}"),
        )),
    }
}

impl Targets {
    fn matches(&self, name: &str) -> bool {
        match self {
            Targets::List(list) => list.iter().any(|t| name == t || name.ends_with(&format!(".{t}"))),
            Targets::Regex(re) => re.is_match(name),
        }
    }
}

impl LoraConfig {
    /// Parses and checks everything that does not need the base model.
    pub fn parse(json: &Value, arch: Arch) -> Result<Self, FieldError> {
        let raw: RawConfig = serde_json::from_value(json.clone()).map_err(|e| ferr("(file)", e.to_string()))?;
        if let Some(t) = raw.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(ferr("peft_type", format!("`{t}` (only LORA adapters are supported)")));
        }
        if raw.use_dora == Some(true) {
            return Err(ferr("use_dora", "DoRA adapters are not supported"));
        }
        if let Some(b) = raw.bias.as_deref().filter(|b| *b != "none") {
            return Err(ferr(
                "bias",
                format!("`{b}` (only \"none\": trained biases are not supported)"),
            ));
        }
        if raw.lora_bias == Some(true) {
            return Err(ferr("lora_bias", "LoRA biases are not supported"));
        }
        let non_empty = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null() && v != &Value::Array(vec![]));
        if non_empty(&raw.modules_to_save) {
            return Err(ferr("modules_to_save", "fully trained extra modules are not supported"));
        }
        if non_empty(&raw.layer_replication) {
            return Err(ferr("layer_replication", "not supported"));
        }
        if non_empty(&raw.target_parameters) {
            return Err(ferr("target_parameters", "not supported"));
        }
        if raw.fan_in_fan_out == Some(true) {
            // PEFT resets it to false for nn.Linear targets (every Llama-family projection).
            tracing::warn!("adapter_config.json: fan_in_fan_out=true is ignored for Linear layers, as PEFT does");
        }
        let r = pos_int("r", raw.r.as_ref().ok_or_else(|| ferr("r", "missing"))?)?;
        let lora_alpha = match &raw.lora_alpha {
            Some(v) => number("lora_alpha", v)?,
            None => 8.0,
        };
        let targets = match &raw.target_modules {
            Some(v) if !v.is_null() => parse_targets("target_modules", v)?,
            // PEFT's default (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
            _ => match arch {
                Arch::Llama | Arch::Mistral | Arch::Qwen2 => Targets::List(vec!["q_proj".into(), "v_proj".into()]),
            },
        };
        let exclude = match &raw.exclude_modules {
            Some(v) if !v.is_null() => Some(parse_targets("exclude_modules", v)?),
            _ => None,
        };
        let rank_pattern = raw
            .rank_pattern
            .0
            .iter()
            .map(|(k, v)| {
                Ok((
                    pattern_regex("rank_pattern", k)?,
                    pos_int(&format!("rank_pattern.{k}"), v)?,
                ))
            })
            .collect::<Result<_, FieldError>>()?;
        let alpha_pattern = raw
            .alpha_pattern
            .0
            .iter()
            .map(|(k, v)| {
                Ok((
                    pattern_regex("alpha_pattern", k)?,
                    number(&format!("alpha_pattern.{k}"), v)?,
                ))
            })
            .collect::<Result<_, FieldError>>()?;
        let layers_to_transform = match &raw.layers_to_transform {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![
                n.as_u64().ok_or_else(|| ferr("layers_to_transform", "negative"))? as usize
            ]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        v.as_u64()
                            .map(|n| n as usize)
                            .ok_or_else(|| ferr("layers_to_transform", format!("{v} is not a layer index")))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(other) => {
                return Err(ferr(
                    "layers_to_transform",
                    format!("expected an integer or a list, got {other}"),
                ))
            }
        };
        match &raw.layers_pattern {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "layers" => {}
            Some(Value::Array(a)) if a.iter().all(|v| v.as_str() == Some("layers")) => {}
            Some(other) => {
                return Err(ferr(
                    "layers_pattern",
                    format!("{other} (these models only have `layers`)"),
                ))
            }
        }
        Ok(LoraConfig {
            r,
            lora_alpha,
            use_rslora: raw.use_rslora.unwrap_or(false),
            targets,
            exclude,
            rank_pattern,
            alpha_pattern,
            layers_to_transform,
        })
    }

    /// The modules of `model` this config adapts, in layer order. A list entry or regex that
    /// matches nothing in the model is an error: the adapter was trained for another network.
    pub fn resolve(&self, model: &ModelConfig) -> Result<Vec<TargetModule>, FieldError> {
        let mut out = Vec::new();
        for layer in 0..model.num_layers {
            for kind in ModuleKind::ALL {
                let name = kind.path(layer);
                if !self.targets.matches(&name) || self.exclude.as_ref().is_some_and(|e| e.matches(&name)) {
                    continue;
                }
                let layer_ok = match (&self.targets, &self.layers_to_transform) {
                    (Targets::List(list), Some(layers)) if !list.contains(&name) => layers.contains(&layer),
                    _ => true,
                };
                if !layer_ok {
                    continue;
                }
                let rank = self
                    .rank_pattern
                    .iter()
                    .find(|(re, _)| re.is_match(&name))
                    .map_or(self.r, |(_, r)| *r);
                let (alpha_field, alpha) = self
                    .alpha_pattern
                    .iter()
                    .find(|(re, _)| re.is_match(&name))
                    .map_or(("lora_alpha".to_string(), self.lora_alpha), |(re, a)| {
                        (format!("alpha_pattern.{}", pattern_key(re)), *a)
                    });
                let scale = if self.use_rslora {
                    alpha / (rank as f64).sqrt()
                } else {
                    alpha / rank as f64
                };
                // The kernels scale in f32: alpha 1e300 is a finite f64 but an infinite f32.
                if !(scale as f32).is_finite() {
                    let divisor = if self.use_rslora { "sqrt(r)" } else { "r" };
                    return Err(ferr(
                        &alpha_field,
                        format!("the scale of {name} (alpha {alpha:e} / {divisor}, rank {rank}) is {scale:e}, not a finite f32"),
                    ));
                }
                out.push(TargetModule {
                    layer,
                    kind,
                    rank,
                    scale: scale as f32,
                });
            }
        }
        if let Targets::List(list) = &self.targets {
            let all: Vec<String> = (0..model.num_layers)
                .flat_map(|l| ModuleKind::ALL.map(|k| k.path(l)))
                .collect();
            if let Some(t) = list
                .iter()
                .find(|t| !all.iter().any(|n| n == *t || n.ends_with(&format!(".{t}"))))
            {
                return Err(ferr(
                    "target_modules",
                    format!("`{t}` is not a module of this model (supported: q/k/v/o/gate/up/down_proj)"),
                ));
            }
        }
        if let Some(layers) = &self.layers_to_transform {
            if let Some(l) = layers.iter().find(|&&l| l >= model.num_layers) {
                return Err(ferr(
                    "layers_to_transform",
                    format!("layer {l} but the model has {}", model.num_layers),
                ));
            }
        }
        if out.is_empty() {
            return Err(ferr("target_modules", "matches no module of this model"));
        }
        Ok(out)
    }
}
