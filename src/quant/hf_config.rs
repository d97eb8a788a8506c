//! The `quantization_config` of an HF checkpoint (config.json, or the older
//! `quantize_config.json` / `quant_config.json`): which of GPTQ, AWQ or
//! bitsandbytes 4-bit it is, with its parameters (FORMATS.md §1-3).
//!
//! Everything tandem cannot load exactly is refused here, naming the field and
//! its value: other bit widths, Marlin or EXL2 packing, per-module overrides,
//! and any field this parser does not know (a new option could change the
//! meaning of the tensors; guessing would serve wrong weights).

use serde_json::{Map, Value};

/// A quantised checkpoint's format.
#[derive(Debug, Clone, PartialEq)]
pub enum HfQuant {
    Gptq(GptqConfig),
    Awq(AwqConfig),
    Bnb4(BnbConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GptqConfig {
    pub bits: u32,
    /// `None` for -1 (one group over all inputs).
    pub group_size: Option<usize>,
    pub desc_act: bool,
    pub sym: bool,
    /// `checkpoint_format` "gptq" (v1: zeros stored minus one) vs "gptq_v2".
    pub v1: bool,
    /// Whether `lm_head` is quantised too.
    pub lm_head: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AwqConfig {
    pub group_size: usize,
    /// Modules left in floating point (their `.weight` is read as usual).
    pub modules_to_not_convert: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bnb4Type {
    Nf4,
    Fp4,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BnbConfig {
    pub quant_type: Bnb4Type,
    pub double_quant: bool,
    /// Modules left in floating point.
    pub skip_modules: Vec<String>,
}

impl HfQuant {
    /// One line for the start-up report and `/v1/models`.
    pub fn describe(&self) -> String {
        match self {
            HfQuant::Gptq(c) => format!(
                "gptq {}-bit, group {}, {}{}{}",
                c.bits,
                c.group_size.map_or("-1".to_string(), |g| g.to_string()),
                if c.sym { "sym" } else { "asym" },
                if c.desc_act { ", desc_act" } else { "" },
                if c.v1 { "" } else { ", gptq_v2" }
            ),
            HfQuant::Awq(c) => format!("awq 4-bit, group {}", c.group_size),
            HfQuant::Bnb4(c) => format!(
                "bitsandbytes {}{}",
                match c.quant_type {
                    Bnb4Type::Nf4 => "nf4",
                    Bnb4Type::Fp4 => "fp4",
                },
                if c.double_quant { ", double quant" } else { "" }
            ),
        }
    }
    /// The short name (`gptq`, `awq`, `bitsandbytes`).
    pub fn method(&self) -> &'static str {
        match self {
            HfQuant::Gptq(_) => "gptq",
            HfQuant::Awq(_) => "awq",
            HfQuant::Bnb4(_) => "bitsandbytes",
        }
    }
}

/// Why a quantisation config is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("quantization_config: {0}")]
pub struct QuantConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, QuantConfigError> {
    Err(QuantConfigError(msg.into()))
}

/// Reads a config object. `None` when there is nothing to read (no
/// `quant_method` and none of the older files' keys).
pub fn parse(v: &Value) -> Result<HfQuant, QuantConfigError> {
    let Some(obj) = v.as_object() else { return err(format!("expected an object, found {v}")) };
    let method = match obj.get("quant_method") {
        Some(Value::String(s)) => s.to_ascii_lowercase(),
        Some(other) => return err(format!("quant_method = {other} is not a string")),
        // Older quantize_config.json (AutoGPTQ) / quant_config.json (AutoAWQ) files.
        None if obj.contains_key("w_bit") || obj.contains_key("q_group_size") => "awq".into(),
        None if obj.contains_key("bits") => "gptq".into(),
        None => return err("no quant_method"),
    };
    match method.as_str() {
        "gptq" => parse_gptq(obj).map(HfQuant::Gptq),
        "awq" => parse_awq(obj).map(HfQuant::Awq),
        "bitsandbytes" => parse_bnb(obj).map(HfQuant::Bnb4),
        other => err(format!(
            "quant_method = \"{other}\" is not supported (tandem loads gptq, awq and bitsandbytes 4-bit; \
             GGUF files load directly)"
        )),
    }
}

/// Keys that only guide calibration or other loaders' kernel choice.
const GPTQ_IGNORED: &[&str] = &[
    "quant_method",
    "method",
    "damp_percent",
    "true_sequential",
    "static_groups",
    "model_file_base_name",
    "model_name_or_path",
    "meta",
    "act_group_aware",
    "backend",
    "use_exllama",
    "exllama_config",
    "max_input_length",
    "use_cuda_fp16",
    "model_seqlen",
    "block_name_to_quantize",
    "module_name_preceding_first_block",
    "batch_size",
    "pad_token_id",
    "cache_block_outputs",
    "modules_in_block_to_quantize",
    "tokenizer",
    "dataset",
    "mse",
    "hyb_act",
    "v2",
    "v2_alpha",
    "v2_memory_device",
    "rotation",
    "is_marlin_format",
    "pack_dtype",
    "dynamic",
    "adapter",
    "fail_safe",
    "quant_method_version",
    "offload_to_disk",
    "offload_to_disk_path",
    "device",
    "damp_auto_increment",
    "gar",
    "gptaq",
    "foem",
    "failsafe",
    "format",
    "checkpoint_format",
    "lm_head",
    "bits",
    "group_size",
    "desc_act",
    "sym",
];

fn get_bool(obj: &Map<String, Value>, key: &str, default: bool) -> Result<bool, QuantConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => err(format!("{key} = {other} is not a boolean")),
    }
}

fn get_int(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, QuantConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| QuantConfigError(format!("{key} = {v} is not an integer"))),
    }
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, QuantConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => err(format!("{key} = {other} is not a string")),
    }
}

fn unknown_keys(obj: &Map<String, Value>, known: &[&str], what: &str) -> Result<(), QuantConfigError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => err(format!("{what} field {k} = {} is not understood by tandem", obj[k])),
        None => Ok(()),
    }
}

fn group_size(key: &str, g: i64, allow_all: bool) -> Result<Option<usize>, QuantConfigError> {
    match g {
        -1 if allow_all => Ok(None),
        g if g > 0 && g % 32 == 0 => Ok(Some(g as usize)),
        g => err(format!(
            "{key} = {g} is not supported (a positive multiple of 32{})",
            if allow_all { ", or -1" } else { "" }
        )),
    }
}

fn parse_gptq(obj: &Map<String, Value>) -> Result<GptqConfig, QuantConfigError> {
    unknown_keys(obj, GPTQ_IGNORED, "gptq")?;
    let bits = get_int(obj, "bits")?.ok_or_else(|| QuantConfigError("gptq: bits is missing".into()))?;
    if bits != 4 && bits != 8 {
        return err(format!("bits = {bits} is not supported (gptq: 4 or 8)"));
    }
    let group = group_size("group_size", get_int(obj, "group_size")?.unwrap_or(128), true)?;
    if get_bool(obj, "is_marlin_format", false)? {
        return err("is_marlin_format = true: Marlin-packed checkpoints are not supported");
    }
    let format = match (get_str(obj, "checkpoint_format")?, get_str(obj, "format")?) {
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => "gptq",
    };
    let v1 = match format {
        "gptq" => true,
        "gptq_v2" => false,
        other => return err(format!("checkpoint_format = \"{other}\" is not supported (gptq or gptq_v2)")),
    };
    match obj.get("pack_dtype") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "int32" || s == "torch.int32" => {}
        Some(other) => return err(format!("pack_dtype = {other} is not supported (int32)")),
    }
    match obj.get("dynamic") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(other) => return err(format!("dynamic = {other}: per-module overrides are not supported")),
    }
    let sym = get_bool(obj, "sym", true)?;
    let desc_act = get_bool(obj, "desc_act", false)?;
    let lm_head = get_bool(obj, "lm_head", false)?;
    Ok(GptqConfig { bits: bits as u32, group_size: group, desc_act, sym, v1, lm_head })
}

fn string_list(obj: &Map<String, Value>, key: &str) -> Result<Vec<String>, QuantConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| QuantConfigError(format!("{key} holds {v}, not a string")))
            })
            .collect(),
        Some(other) => err(format!("{key} = {other} is not a list of module names")),
    }
}

fn parse_awq(obj: &Map<String, Value>) -> Result<AwqConfig, QuantConfigError> {
    const KNOWN: &[&str] = &[
        "quant_method",
        "zero_point",
        "group_size",
        "q_group_size",
        "bits",
        "w_bit",
        "version",
        "modules_to_not_convert",
        "backend",
        "do_fuse",
        "fuse_max_seq_len",
        "exllama_config",
        "modules_to_fuse",
    ];
    unknown_keys(obj, KNOWN, "awq")?;
    let bits = get_int(obj, "bits")?.or(get_int(obj, "w_bit")?).unwrap_or(4);
    if bits != 4 {
        return err(format!("bits = {bits} is not supported (awq: 4)"));
    }
    if !get_bool(obj, "zero_point", true)? {
        return err("zero_point = false is not supported (AutoAWQ's GEMM layout always has zeros)");
    }
    let version = get_str(obj, "version")?.unwrap_or("gemm").to_ascii_lowercase();
    if version != "gemm" {
        return err(format!("version = \"{version}\" is not supported (the GEMM layout only)"));
    }
    let g = get_int(obj, "group_size")?.or(get_int(obj, "q_group_size")?).unwrap_or(128);
    let group_size = group_size("group_size", g, false)?.unwrap_or(0);
    Ok(AwqConfig { group_size, modules_to_not_convert: string_list(obj, "modules_to_not_convert")? })
}

fn parse_bnb(obj: &Map<String, Value>) -> Result<BnbConfig, QuantConfigError> {
    const KNOWN: &[&str] = &[
        "quant_method",
        "load_in_4bit",
        "load_in_8bit",
        "_load_in_4bit",
        "_load_in_8bit",
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_quant_storage",
        "llm_int8_skip_modules",
        "llm_int8_threshold",
        "llm_int8_has_fp16_weight",
        "llm_int8_enable_fp32_cpu_offload",
    ];
    unknown_keys(obj, KNOWN, "bitsandbytes")?;
    if get_bool(obj, "load_in_8bit", false)? || get_bool(obj, "_load_in_8bit", false)? {
        return err("load_in_8bit = true: LLM.int8 checkpoints are not supported (4-bit nf4/fp4 only)");
    }
    if !(get_bool(obj, "load_in_4bit", false)? || get_bool(obj, "_load_in_4bit", false)?) {
        return err("load_in_4bit is not true");
    }
    let quant_type = match get_str(obj, "bnb_4bit_quant_type")?.unwrap_or("fp4") {
        "nf4" => Bnb4Type::Nf4,
        "fp4" => Bnb4Type::Fp4,
        other => return err(format!("bnb_4bit_quant_type = \"{other}\" is not supported (nf4 or fp4)")),
    };
    match get_str(obj, "bnb_4bit_quant_storage")?.unwrap_or("uint8") {
        "uint8" | "torch.uint8" => {}
        other => return err(format!("bnb_4bit_quant_storage = \"{other}\" is not supported (uint8)")),
    }
    Ok(BnbConfig {
        quant_type,
        double_quant: get_bool(obj, "bnb_4bit_use_double_quant", false)?,
        skip_modules: string_list(obj, "llm_int8_skip_modules")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_three_formats() {
        let g = parse(&json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true,
            "sym": false, "checkpoint_format": "gptq_v2", "damp_percent": 0.01}))
        .unwrap();
        assert_eq!(
            g,
            HfQuant::Gptq(GptqConfig {
                bits: 4,
                group_size: Some(128),
                desc_act: true,
                sym: false,
                v1: false,
                lm_head: false
            })
        );
        let a = parse(&json!({"zero_point": true, "q_group_size": 64, "w_bit": 4, "version": "GEMM"})).unwrap();
        assert_eq!(a, HfQuant::Awq(AwqConfig { group_size: 64, modules_to_not_convert: vec![] }));
        let b = parse(&json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "bfloat16"}))
        .unwrap();
        assert_eq!(b.method(), "bitsandbytes");
        assert!(b.describe().contains("nf4, double quant"));
    }

    #[test]
    fn refusals_name_the_field_and_value() {
        let cases = [
            (json!({"quant_method": "gptq", "bits": 3}), "bits = 3"),
            (json!({"quant_method": "gptq", "bits": 2}), "bits = 2"),
            (json!({"quant_method": "gptq", "bits": 4, "group_size": 48}), "group_size = 48"),
            (json!({"quant_method": "gptq", "bits": 4, "group_size": 0}), "group_size = 0"),
            (
                json!({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}),
                "checkpoint_format = \"marlin\"",
            ),
            (json!({"quant_method": "gptq", "bits": 4, "is_marlin_format": true}), "is_marlin_format"),
            (json!({"quant_method": "gptq", "bits": 4, "dynamic": {"-:.*down": {}}}), "dynamic"),
            (json!({"quant_method": "gptq", "bits": 4, "pack_dtype": "int16"}), "pack_dtype"),
            (json!({"quant_method": "gptq", "bits": 4, "wild_new_knob": 1}), "wild_new_knob = 1"),
            (json!({"quant_method": "gptq", "bits": "4"}), "bits = \"4\""),
            (json!({"quant_method": "gptq", "bits": 4, "sym": "yes"}), "sym = \"yes\""),
            (json!({"quant_method": "gptq"}), "bits is missing"),
            (json!({"quant_method": "exl2", "bits": 4}), "\"exl2\""),
            (json!({"quant_method": "marlin"}), "\"marlin\""),
            (json!({"quant_method": "awq", "bits": 8}), "bits = 8"),
            (json!({"quant_method": "awq", "version": "gemv"}), "version = \"gemv\""),
            (json!({"quant_method": "awq", "zero_point": false}), "zero_point = false"),
            (json!({"quant_method": "awq", "group_size": -1}), "group_size = -1"),
            (json!({"quant_method": "awq", "modules_to_not_convert": "lm_head"}), "modules_to_not_convert"),
            (json!({"quant_method": "bitsandbytes", "load_in_8bit": true}), "load_in_8bit"),
            (json!({"quant_method": "bitsandbytes", "load_in_4bit": false}), "load_in_4bit"),
            (json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "int4"}), "\"int4\""),
            (
                json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_storage": "bfloat16"}),
                "bnb_4bit_quant_storage",
            ),
            (json!({"quant_method": 3}), "quant_method = 3"),
            (json!([1, 2]), "expected an object"),
            (json!({}), "no quant_method"),
        ];
        for (v, want) in cases {
            let e = parse(&v).expect_err(&v.to_string()).to_string();
            assert!(e.contains(want), "{v}: {e} lacks {want}");
        }
    }

    proptest::proptest! {
        /// Whatever the object, the parser answers (never panics), and what it
        /// accepts is within what the kernels take.
        #[test]
        fn any_object_is_accepted_or_refused(
            method in proptest::sample::select(vec!["gptq", "awq", "bitsandbytes", "x"]),
            bits in -2i64..10, group in -3i64..300, flag in proptest::bool::ANY,
            fmt in proptest::sample::select(vec!["gptq", "gptq_v2", "marlin", ""]),
        ) {
            let v = json!({"quant_method": method, "bits": bits, "group_size": group, "desc_act": flag,
                "sym": !flag, "checkpoint_format": fmt, "load_in_4bit": flag, "bnb_4bit_quant_type": "nf4"});
            match parse(&v) {
                Ok(HfQuant::Gptq(c)) => {
                    proptest::prop_assert!(c.bits == 4 || c.bits == 8);
                    proptest::prop_assert!(c.group_size.is_none_or(|g| g % 32 == 0 && g > 0));
                }
                Ok(HfQuant::Awq(c)) => proptest::prop_assert!(c.group_size % 32 == 0 && c.group_size > 0),
                Ok(HfQuant::Bnb4(_)) => proptest::prop_assert!(flag),
                Err(e) => proptest::prop_assert!(!e.0.is_empty()),
            }
        }
    }
}
