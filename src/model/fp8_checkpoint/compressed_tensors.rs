//! The `compressed-tensors` quantization config, as llm-compressor writes it into
//! `config.json`:
//!
//! ```json
//! "quantization_config": {
//!   "quant_method": "compressed-tensors", "format": "float-quantized",
//!   "config_groups": {"group_0": {
//!     "targets": ["Linear"],
//!     "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true, "dynamic": false},
//!     "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true}}},
//!   "ignore": ["lm_head"]}
//! ```
//!
//! A module takes the scheme of the first group with a target naming it (exactly, or as
//! `re:` + a regular expression), else of the first group targeting its class (every
//! projection is a `Linear`), unless `ignore` names it.

use std::path::Path;

use regex::Regex;
use serde_json::Value;

use super::{anchored, strings, wrong, Fp8Scheme, InputQuant};
use crate::model::LoadError;
use crate::tensor::quant::ScaleGranularity;

/// The class every projection of a Llama is, for targets that name classes.
const LINEAR: &str = "linear";

#[derive(Debug)]
pub struct Config {
    groups: Vec<Group>,
    ignore: Vec<Target>,
}

#[derive(Debug)]
struct Group {
    targets: Vec<Target>,
    scheme: Fp8Scheme,
}

/// A module selector: a name (a layer's, or a class's), or `re:` and a pattern.
#[derive(Debug)]
enum Target {
    Plain(String),
    Pattern(Regex),
}

impl Target {
    fn parse(path: &Path, s: &str) -> Result<Self, LoadError> {
        Ok(match s.strip_prefix("re:") {
            Some(pattern) => Target::Pattern(anchored(path, pattern)?),
            None => Target::Plain(s.to_string()),
        })
    }

    fn names(&self, module: &str) -> bool {
        match self {
            Target::Plain(name) => name == module,
            Target::Pattern(re) => re.is_match(module),
        }
    }

    /// Whether this is a class name that a `Linear` module answers to (matched as
    /// compressed-tensors' loaders do: contained in the class name, ignoring case).
    fn is_linear_class(&self) -> bool {
        matches!(self, Target::Plain(name) if !name.is_empty() && LINEAR.contains(&name.to_ascii_lowercase()))
    }
}

impl Config {
    pub fn parse(path: &Path, qc: &Value) -> Result<Self, LoadError> {
        check_format(path, qc.get("format"))?;
        if let Some(sparsity) = qc.get("sparsity_config").filter(|v| !v.is_null()) {
            let format = sparsity.get("format").and_then(Value::as_str).unwrap_or("unknown");
            if format != "dense" {
                return Err(LoadError::unsupported_quantization(path, format!("sparse weights (format `{format}`)")));
            }
        }
        let groups = qc.get("config_groups").and_then(Value::as_object).ok_or_else(|| {
            LoadError::format(path, "compressed-tensors `quantization_config` has no `config_groups` object")
        })?;
        let groups = groups.iter().map(|(name, g)| parse_group(path, name, g)).collect::<Result<_, _>>()?;
        let ignore = strings(path, qc, "ignore")?.iter().map(|s| Target::parse(path, s)).collect::<Result<_, _>>()?;
        Ok(Config { groups, ignore })
    }

    pub fn scheme_for(&self, module: &str) -> Option<Fp8Scheme> {
        if self.ignore.iter().any(|t| t.names(module)) {
            return None;
        }
        let by_name = self.groups.iter().find(|g| g.targets.iter().any(|t| t.names(module)));
        let by_class = || self.groups.iter().find(|g| g.targets.iter().any(Target::is_linear_class));
        by_name.or_else(by_class).map(|g| g.scheme)
    }
}

fn check_format(path: &Path, format: Option<&Value>) -> Result<(), LoadError> {
    match format.and_then(Value::as_str) {
        None | Some("float-quantized") | Some("naive-quantized") => Ok(()),
        Some(other) => Err(LoadError::unsupported_quantization(path, format!("compressed-tensors format `{other}`"))),
    }
}

fn parse_group(path: &Path, name: &str, g: &Value) -> Result<Group, LoadError> {
    let unsupported =
        |what: String| LoadError::unsupported_quantization(path, format!("config group `{name}`: {what}"));
    if !g.is_object() {
        return Err(unsupported("a preset scheme name instead of a scheme".into()));
    }
    check_format(path, g.get("format"))?;
    if g.get("output_activations").is_some_and(|v| !v.is_null()) {
        return Err(unsupported("quantized output activations".into()));
    }
    let weights = match g.get("weights") {
        Some(w) if !w.is_null() => Args::parse(path, w)?,
        _ => return Err(unsupported("activations quantized without the weights".into())),
    };
    let scheme = Fp8Scheme {
        weights: weight_scales(&weights).map_err(unsupported)?,
        inputs: input_quant(path, g).map_err(unsupported)?,
    };
    let targets = strings(path, g, "targets")?.iter().map(|s| Target::parse(path, s)).collect::<Result<_, _>>()?;
    Ok(Group { targets, scheme })
}

/// The fields of compressed-tensors' `QuantizationArgs` that decide what we can run, with
/// its defaults (`type` int, 8 bits, symmetric, static; the strategy follows `group_size`).
struct Args {
    kind: String,
    bits: u64,
    symmetric: bool,
    dynamic: Value,
    strategy: String,
    group_size: Option<i64>,
    block: Option<Value>,
}

impl Args {
    fn parse(path: &Path, v: &Value) -> Result<Self, LoadError> {
        let text = |key: &str, default: &str| match v.get(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.to_ascii_lowercase()),
            Some(_) => Err(wrong(path, key, "a string")),
        };
        let group_size = v.get("group_size").and_then(Value::as_i64);
        let inferred = match group_size {
            None => "tensor",
            Some(-1) => "channel",
            Some(_) => "group",
        };
        Ok(Args {
            kind: text("type", "int")?,
            bits: v.get("num_bits").and_then(Value::as_u64).unwrap_or(8),
            symmetric: v.get("symmetric").and_then(Value::as_bool).unwrap_or(true),
            dynamic: v.get("dynamic").cloned().unwrap_or(Value::Bool(false)),
            strategy: text("strategy", inferred)?,
            group_size,
            block: v.get("block_structure").filter(|b| !b.is_null()).cloned(),
        })
    }

    /// Refuses anything but symmetric 8-bit floats (E4M3 in compressed-tensors).
    fn check_fp8(&self, what: &str) -> Result<(), String> {
        if self.kind != "float" || self.bits != 8 {
            return Err(format!("{}-bit {} {what}", self.bits, self.kind));
        }
        if !self.symmetric {
            return Err(format!("asymmetric {what}"));
        }
        Ok(())
    }
}

fn weight_scales(w: &Args) -> Result<ScaleGranularity, String> {
    w.check_fp8("weights")?;
    if w.dynamic != Value::Bool(false) {
        return Err(format!("dynamic weight scales ({})", w.dynamic));
    }
    match w.strategy.as_str() {
        "channel" => Ok(ScaleGranularity::PerChannel),
        "tensor" => Ok(ScaleGranularity::PerTensor),
        "group" | "tensor_group" => Err(format!(
            "group-wise weight scales (strategy `{}`, group_size {})",
            w.strategy,
            w.group_size.map_or("none".into(), |g| g.to_string())
        )),
        "block" => Err(format!(
            "block-wise weight scales (block_structure {})",
            w.block.as_ref().map_or("none".into(), Value::to_string)
        )),
        other => Err(format!("weight scales with strategy `{other}`")),
    }
}

fn input_quant(path: &Path, group: &Value) -> Result<InputQuant, String> {
    let a = match group.get("input_activations") {
        None | Some(Value::Null) => return Ok(InputQuant::None),
        Some(v) => Args::parse(path, v).map_err(|e| e.to_string())?,
    };
    a.check_fp8("activations")?;
    match (&a.dynamic, a.strategy.as_str()) {
        (Value::Bool(true), "token") => Ok(InputQuant::DynamicPerToken),
        (Value::Bool(false), "tensor") => Ok(InputQuant::StaticPerTensor),
        (Value::Bool(true), "tensor") => Err("dynamic per-tensor activation scales (a token's result would \
                                              depend on the rest of its batch)"
            .into()),
        (Value::Bool(dynamic), strategy) => {
            Err(format!("{} `{strategy}` activation scales", if *dynamic { "dynamic" } else { "static" }))
        }
        (other, strategy) => Err(format!("activation scales with dynamic = {other} and strategy `{strategy}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(qc: Value) -> Result<Config, LoadError> {
        Config::parse(Path::new("config.json"), &qc)
    }

    fn fp8(strategy: &str) -> Value {
        json!({"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": true, "dynamic": false})
    }

    #[test]
    fn targets_ignore_and_schemes() {
        let c = config(json!({
            "format": "float-quantized",
            "config_groups": {
                "group_0": {"targets": ["re:.*mlp.down_proj"], "weights": fp8("tensor"),
                            "input_activations": fp8("tensor")},
                "group_1": {"targets": ["Linear"], "weights": fp8("channel"),
                            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true}},
            },
            "ignore": ["lm_head", "re:model.layers.1.self_attn.*"],
        }))
        .unwrap();
        let dynamic = Fp8Scheme { weights: ScaleGranularity::PerChannel, inputs: InputQuant::DynamicPerToken };
        let fixed = Fp8Scheme { weights: ScaleGranularity::PerTensor, inputs: InputQuant::StaticPerTensor };
        assert_eq!(c.scheme_for("model.layers.0.self_attn.q_proj"), Some(dynamic));
        assert_eq!(c.scheme_for("model.layers.0.mlp.down_proj"), Some(fixed));
        assert_eq!(c.scheme_for("model.layers.1.self_attn.o_proj"), None);
        assert_eq!(c.scheme_for("model.layers.1.mlp.up_proj"), Some(dynamic));
        assert_eq!(c.scheme_for("lm_head"), None);
    }

    #[test]
    fn strategy_follows_group_size_when_absent() {
        let weights = json!({"num_bits": 8, "type": "float", "group_size": -1});
        let c = config(json!({"config_groups": {"g": {"targets": ["Linear"], "weights": weights}}})).unwrap();
        let scheme = Fp8Scheme { weights: ScaleGranularity::PerChannel, inputs: InputQuant::None };
        assert_eq!(c.scheme_for("model.layers.0.mlp.up_proj"), Some(scheme));
    }

    #[test]
    fn unsupported_schemes_are_named() {
        let refused = |group: Value, needle: &str| {
            let err = config(json!({"config_groups": {"group_0": group}})).unwrap_err();
            assert!(matches!(err, LoadError::UnsupportedQuantization { .. }), "{err}");
            assert!(err.to_string().contains(needle), "`{err}` does not mention `{needle}`");
        };
        let group = |weights: Value| json!({"targets": ["Linear"], "weights": weights});
        refused(group(json!({"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128})), "group-wise");
        refused(
            group(json!({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]})),
            "block-wise",
        );
        refused(group(json!({"num_bits": 8, "type": "int", "strategy": "channel"})), "8-bit int weights");
        refused(group(json!({"num_bits": 4, "type": "float", "strategy": "tensor_group"})), "4-bit float weights");
        refused(
            group(json!({"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": false})),
            "asymmetric",
        );
        let dynamic_tensor = {
            let mut g = group(fp8("channel"));
            g["input_activations"] = json!({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": true});
            g
        };
        refused(dynamic_tensor, "dynamic per-tensor");
        let int_inputs = {
            let mut g = group(fp8("channel"));
            g["input_activations"] = json!({"num_bits": 8, "type": "int", "strategy": "token", "dynamic": true});
            g
        };
        refused(int_inputs, "8-bit int activations");
        let err = config(json!({"format": "pack-quantized", "config_groups": {}})).unwrap_err();
        assert!(err.to_string().contains("pack-quantized"), "{err}");
    }
}
