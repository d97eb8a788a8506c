//! PEFT adapter parsing from outside bytes: the first byte picks where the
//! config ends; the rest is the safetensors file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::loader::safetensors::SafetensorsFile;
use tandem::lora::peft::parse_peft;
use tandem::lora::{LoraDtype, LoraOptions};
use tandem::model::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let split = (n as usize * 4).min(rest.len());
    let (config, weights) = rest.split_at(split);
    let base = ModelConfig::from_hf_json(&serde_json::json!({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": true
    }))
    .expect("a valid config");
    if let Ok(f) = SafetensorsFile::from_bytes(weights.to_vec()) {
        let _ = parse_peft(config, &f, &base, LoraOptions { max_rank: 64, dtype: LoraDtype::F32 });
    }
});
