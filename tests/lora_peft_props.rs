//! Property tests for the PEFT adapter parser (outside bytes): any config
//! bytes, any values in the known config fields, any tensor sets and shapes,
//! and damaged safetensors files give an adapter or an error, never a panic;
//! an accepted adapter always fits the base model.

mod common;

use common::*;
use proptest::prelude::*;
use serde_json::{json, Value};
use tandem::loader::safetensors::{serialize, SafetensorsFile, StDtype};
use tandem::lora::peft::parse_peft;
use tandem::lora::{LoraDtype, LoraOptions, LoraTarget};
use tandem::model::ModelConfig;

fn base() -> ModelConfig {
    ModelConfig::from_hf_json(&read_json(&fixture("tiny/qwen2/hf-f32/config.json"))).unwrap()
}

fn real_weights(name: &str) -> Vec<u8> {
    std::fs::read(fixture("tiny/lora").join(name).join("adapter_model.safetensors")).unwrap()
}

fn real_config(name: &str) -> Value {
    read_json(&fixture("tiny/lora").join(name).join("adapter_config.json"))
}

const LIMITS: LoraOptions = LoraOptions { max_rank: 16, dtype: LoraDtype::F32 };

/// Parses and, when it succeeds, checks every matrix against the base model.
fn check(config: &[u8], weights: &[u8], base: &ModelConfig) {
    let Ok(file) = SafetensorsFile::from_bytes(weights.to_vec()) else { return };
    if let Ok((layers, _)) = parse_peft(config, &file, base, LIMITS) {
        assert_eq!(layers.len(), base.num_layers);
        for l in &layers {
            for (t, m) in LoraTarget::ALL.iter().zip(l) {
                let Some(m) = m else { continue };
                let (inf, outf) = t.shape(base);
                assert_eq!((m.in_features, m.out_features), (inf, outf));
                assert!(m.rank >= 1 && m.rank <= LIMITS.max_rank);
                assert_eq!(m.a.len(), m.rank * inf);
                assert_eq!(m.bt.len(), m.rank * outf);
                assert!(m.a.to_f32().iter().chain(&m.bt.to_f32()).all(|x| x.is_finite()));
            }
        }
    }
}

/// A safetensors file of the given (name, dtype, shape) tensors filled with small values.
fn safetensors(tensors: &[(String, &str, Vec<usize>)]) -> Vec<u8> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, dtype, shape)| {
            let n: usize = shape.iter().product();
            (0..n)
                .flat_map(|i| {
                    let v = ((i % 7) as f32 - 3.0) * 0.01;
                    match *dtype {
                        "F32" => v.to_le_bytes().to_vec(),
                        "F16" => half::f16::from_f32(v).to_le_bytes().to_vec(),
                        _ => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                    }
                })
                .collect()
        })
        .collect();
    let views: Vec<(&str, StDtype, &[usize], &[u8])> = tensors
        .iter()
        .zip(&data)
        .map(|((name, dtype, shape), d)| (name.as_str(), StDtype::parse(dtype).unwrap(), &shape[..], &d[..]))
        .collect();
    serialize(&views)
}

fn tensor_name() -> impl Strategy<Value = String> {
    let layer = prop_oneof![Just("0".to_string()), Just("1".to_string()), Just("2".to_string()), Just("x".to_string())];
    let module = prop_oneof![
        Just("self_attn.q_proj"),
        Just("self_attn.k_proj"),
        Just("self_attn.v_proj"),
        Just("self_attn.o_proj"),
        Just("mlp.gate_proj"),
        Just("mlp.up_proj"),
        Just("mlp.down_proj"),
        Just("mlp.q_proj"),
        Just("self_attn.c_attn"),
    ];
    let ab = prop_oneof![Just("lora_A.weight"), Just("lora_B.weight"), Just("lora_magnitude_vector"), Just("bias")];
    let prefix = prop_oneof![
        4 => Just("base_model.model.model.layers."),
        1 => Just("base_model.model.layers."),
        1 => Just("base_model.model.model.embed_tokens.lora_embedding_A."),
    ];
    (prefix, layer, module, ab).prop_map(|(p, l, m, ab)| format!("{p}{l}.{m}.{ab}"))
}

fn tensors() -> impl Strategy<Value = Vec<(String, &'static str, Vec<usize>)>> {
    let dim = prop_oneof![Just(1usize), Just(2), Just(4), Just(8), Just(32), Just(64), Just(128), Just(0)];
    let dtype = prop_oneof![Just("F32"), Just("F16"), Just("BF16")];
    prop::collection::vec((tensor_name(), dtype, prop::collection::vec(dim, 1..3)), 0..6)
}

fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-100.0f64..100.0).prop_map(Value::from),
        Just(json!(0)),
        Just(json!(4)),
        Just(json!(1e300)),
        "[a-z_.*|()]{0,12}".prop_map(Value::from),
        Just(json!(["q_proj", "v_proj"])),
        Just(json!(["lm_head"])),
        Just(json!("all-linear")),
        Just(json!(".*\\.(q_proj|v_proj)")),
        Just(json!({"q_proj": 2})),
        Just(json!({"(": 2})),
        Just(json!({"v_proj": -1})),
    ]
}

fn config() -> impl Strategy<Value = Value> {
    let fields = [
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "target_modules",
        "fan_in_fan_out",
        "bias",
        "use_dora",
        "lora_bias",
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
        "base_model_name_or_path",
    ];
    prop::collection::vec((0..fields.len(), json_value()), 0..6).prop_map(move |edits| {
        let mut c = real_config("a-r4-qv");
        for (f, v) in edits {
            c[fields[f]] = v;
        }
        c
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn any_config_bytes_give_an_adapter_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check(&bytes, &real_weights("a-r4-qv"), &base());
    }

    #[test]
    fn any_values_in_the_known_fields_never_panic(c in config()) {
        check(&serde_json::to_vec(&c).unwrap(), &real_weights("a-r4-qv"), &base());
    }

    #[test]
    fn any_tensor_sets_and_shapes_never_panic(t in tensors(), r in 1usize..10) {
        let mut c = real_config("a-r4-qv");
        c["r"] = json!(r);
        check(&serde_json::to_vec(&c).unwrap(), &safetensors(&t), &base());
    }

    #[test]
    fn damaged_safetensors_never_panic(cut in 0usize..4000, flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8)) {
        let mut w = real_weights("b-r8-all");
        for (at, v) in flips {
            let i = at % w.len();
            w[i] ^= v;
        }
        w.truncate(w.len().saturating_sub(cut));
        let c = serde_json::to_vec(&real_config("b-r8-all")).unwrap();
        check(&c, &w, &base());
    }
}

#[test]
fn the_generator_can_build_an_accepted_adapter() {
    // The strategies above are not only refusals: a well-formed set is accepted.
    let t = vec![
        ("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight".to_string(), "BF16", vec![4, 64]),
        ("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight".to_string(), "F16", vec![64, 4]),
    ];
    let file = SafetensorsFile::from_bytes(safetensors(&t)).unwrap();
    let c = serde_json::to_vec(&real_config("a-r4-qv")).unwrap();
    let (layers, _) = parse_peft(&c, &file, &base(), LIMITS).unwrap();
    assert!(layers[1][0].is_some());
    assert!(layers[0].iter().all(|m| m.is_none()));
}
