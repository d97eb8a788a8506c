//! The bodies of the fuzz targets in `fuzz/` (one function per target), here
//! so that `tests/fuzz_seeds.rs` runs the very same code on each target's
//! committed seeds and checks that some seed gets past the parser: a harness
//! that refuses everything (as `peft_adapter`'s once did, its own base config
//! being invalid) would fuzz nothing, and that test fails.
//!
//! Each function returns whether the input was accepted (parsed and its
//! invariants checked), and panics only on a broken invariant: what the
//! fuzzer is there to find.

use serde_json::{json, Value};

/// `GgufFile::from_bytes` returns, never panics, and every accessor of a file
/// it accepts stays in bounds.
pub fn gguf_parse(data: &[u8]) -> bool {
    use crate::loader::gguf::GgufFile;
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else { return false };
    for t in &f.tensors {
        let bytes = f.tensor_data(t);
        assert_eq!(bytes.len() as u64, t.n_bytes());
        // Small tensors only: dequantising is not what is being fuzzed.
        if t.n_elements() <= 4096 {
            let mut out = vec![0f32; t.n_elements() as usize];
            crate::quant::ggml::dequantize(t.ty, bytes, &mut out).expect("validated tensor dequantises");
        }
    }
    for k in f.metadata.keys() {
        let _ = (f.get_u64(k), f.get_f32(k), f.get_str(k), f.get_str_array(k));
    }
    let _ = f.architecture();
    true
}

/// `SafetensorsFile::from_bytes` returns, never panics, and every tensor of a
/// file it accepts has exactly dtype x shape bytes inside the file.
pub fn safetensors_parse(data: &[u8]) -> bool {
    use crate::loader::safetensors::SafetensorsFile;
    let Ok(f) = SafetensorsFile::from_bytes(data.to_vec()) else { return false };
    for name in f.names() {
        let t = f.tensor(name).expect("listed tensor is readable");
        let n: usize = t.shape.iter().product();
        assert_eq!(n * t.dtype.size_bytes(), t.data.len());
        assert_eq!(f.tensor_range(name).map(|r| r.len()), Some(t.data.len()));
    }
    true
}

/// Template source, a NUL byte, then messages as JSON (a fixed small
/// conversation when that part is not JSON): `ChatTemplate::new` and `render`
/// return, never panic, and stop (fuel) on runaway templates. Accepted: the
/// template compiled and rendered at least once.
pub fn chat_template(data: &[u8]) -> bool {
    use crate::tokenizer::ChatTemplate;
    let text = String::from_utf8_lossy(data);
    let (source, rest) = text.split_once('\0').unwrap_or((&text, ""));
    let messages = serde_json::from_str::<Value>(rest).unwrap_or_else(|_| {
        json!([
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hi", "extra": [1, 2.5, null]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
            ]},
            {"role": "tool", "content": "42"}
        ])
    });
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let Ok(template) = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into())) else { return false };
    let mut rendered = false;
    for add_generation_prompt in [false, true] {
        rendered |= template.render(&messages, None, add_generation_prompt, None).is_ok();
        let extra = json!({"x": 1});
        rendered |= template.render(&messages, Some(&tools), add_generation_prompt, Some(&extra)).is_ok();
    }
    rendered
}

/// A small engine's limits, which requests are validated against (here and
/// in tests/api_request_props.rs).
pub fn small_engine_info() -> crate::engine::EngineInfo {
    crate::engine::EngineInfo {
        max_model_len: 256,
        vocab_size: 256,
        eos_token_ids: vec![2],
        block_size: 16,
        num_blocks: 64,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_waiting: 8,
        max_loras: 0,
    }
}

/// A request body: parsing and validation return, never panic, and what they
/// accept fits the engine's limits.
pub fn openai_request(data: &[u8]) -> bool {
    use crate::api::json::parse;
    use crate::api::params::validate;
    use crate::api::protocol::{ChatCompletionRequest, CompletionRequest};
    let info = small_engine_info();
    let mut accepted = false;
    if let Ok(r) = parse::<CompletionRequest>(data) {
        if let Ok(p) = validate(&r.shared(), r.max_tokens, None, &info) {
            if let Ok(reqs) = p.engine_requests(&[1, 2, 3], &info, "prompt") {
                assert!(reqs.iter().all(|q| q.prompt.len() + q.stopping.max_tokens <= info.max_model_len));
                accepted = true;
            }
        }
    }
    if let Ok(r) = parse::<ChatCompletionRequest>(data) {
        let prepared = crate::api::chat::prepare_messages(&r.messages).is_ok();
        let valid = validate(&r.shared(), r.max_completion_tokens.or(r.max_tokens), None, &info).is_ok();
        accepted |= prepared && valid;
    }
    accepted
}

/// The base every PEFT input is checked against: the tiny Qwen2 fixture's
/// shape (tests/fixtures/tiny/qwen2/hf-f32), so its adapters are valid seeds.
fn peft_base() -> crate::model::ModelConfig {
    crate::model::ModelConfig::from_hf_json(&json!({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": true
    }))
    .expect("the fuzz harness's base config is valid")
}

/// A PEFT adapter: the first byte times 4 is the length of
/// `adapter_config.json`, the rest is `adapter_model.safetensors`.
pub fn peft_adapter(data: &[u8]) -> bool {
    use crate::loader::safetensors::SafetensorsFile;
    use crate::lora::peft::parse_peft;
    use crate::lora::{LoraDtype, LoraOptions};
    let Some((&n, rest)) = data.split_first() else { return false };
    let split = (n as usize * 4).min(rest.len());
    let (config, weights) = rest.split_at(split);
    let Ok(f) = SafetensorsFile::from_bytes(weights.to_vec()) else { return false };
    parse_peft(config, &f, &peft_base(), LoraOptions { max_rank: 64, dtype: LoraDtype::F32 }).is_ok()
}

/// A training file: the first byte picks the options (max_seq_len = 4 x its
/// low 7 bits, overflow by its high bit), the rest is the JSONL.
/// `parse_jsonl` returns a dataset or an error, never panics, and what it
/// accepts keeps its invariants.
pub fn train_jsonl(data: &[u8], tokenizer: &crate::tokenizer::Tokenizer) -> bool {
    use crate::train::data::{parse_jsonl, DataOptions, Overflow};
    let Some((&knob, file)) = data.split_first() else { return false };
    let opts = DataOptions {
        max_seq_len: usize::from(knob & 0x7f) * 4,
        overflow: if knob & 0x80 == 0 { Overflow::Truncate } else { Overflow::Refuse },
        max_issues: 8,
    };
    let Ok(ds) = parse_jsonl(file, tokenizer, &opts) else { return false };
    for ex in &ds.examples {
        assert_eq!(ex.tokens.len(), ex.targets.len());
        assert!(ex.tokens.len() <= opts.max_seq_len);
        assert!(!ex.targets[0] && ex.targets.contains(&true));
    }
    true
}

/// `count` words cycled from `words` (the fuzzer's bytes fill any size).
fn take(words: &[u32], from: usize, count: usize) -> Vec<u32> {
    (0..count).map(|i| words[(from + i) % words.len()]).collect()
}

/// Rewritten codes come out as whole rows that dequantise to exactly
/// `s·(q − z)`, with a true permutation.
fn check_codes(codes: crate::quant::gptq::GroupCodes) -> bool {
    let Ok(r) = codes.rewrite() else { return false };
    let row = r.kind.row_bytes(codes.k_in).expect("whole blocks");
    assert_eq!(r.bytes.len(), row * codes.n_out);
    let mut out = vec![0f32; codes.n_out * codes.k_in];
    crate::quant::ggml::dequantize(r.kind, &r.bytes, &mut out).expect("sizes agree");
    let order: Vec<usize> = match &r.input_perm {
        Some(p) => p.iter().map(|&k| k as usize).collect(),
        None => (0..codes.k_in).collect(),
    };
    let mut seen = vec![false; codes.k_in];
    assert!(order.iter().all(|&k| !std::mem::replace(&mut seen[k], true)), "a permutation");
    let want = codes.dequantize();
    for n in 0..codes.n_out {
        for (j, &k) in order.iter().enumerate() {
            let (a, b) = (out[n * codes.k_in + j], want[n * codes.k_in + k]);
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{:?} [{n},{k}]: {a} vs {b}", r.kind);
        }
    }
    true
}

/// The parts of a quantised checkpoint: the first byte picks what (0: the
/// `quantization_config` JSON; 1: GPTQ, 2: AWQ, 3: bitsandbytes tensors of a
/// small shape the next three bytes pick). Parsing and unpacking return a
/// value or an error, never panic or read past a buffer.
pub fn quant_checkpoint(data: &[u8]) -> bool {
    use crate::quant::bnb::{self, Absmax};
    use crate::quant::ggml::WeightKind;
    use crate::quant::{gptq, hf_config};
    let Some((head, rest)) = data.split_at_checked(4) else { return false };
    let words = gptq::words(rest);
    let n = 8 * (1 + usize::from(head[1] >> 4) % 4);
    let k = 32 * (1 + usize::from(head[2]) % 4);
    let exact = head[3] & 0x80 == 0; // sizes that fit, or whatever the bytes give
    match head[0] % 4 {
        0 => {
            let Ok(v) = serde_json::from_slice::<Value>(rest) else { return false };
            let Ok(q) = hf_config::parse(&v) else { return false };
            assert!(!q.describe().is_empty());
            true
        }
        1 if !words.is_empty() => {
            let bits = if head[1] & 1 == 0 { 4 } else { 8 };
            let per = 32 / bits as usize;
            let group = [None, Some(32), Some(64)][usize::from(head[3]) % 3];
            let groups = k.div_ceil(group.unwrap_or(k));
            let (nq, nz) = if exact { (k / per * n, groups * n / per) } else { (words.len() / 2, words.len() / 4) };
            let scales = take(&words, 7, groups * n).into_iter().map(|w| f32::from_bits(w & 0x3fff_ffff)).collect();
            let g_idx =
                (head[3] & 0x40 != 0).then(|| take(&words, 3, k).iter().map(|w| w % (groups as u32 + 1)).collect());
            let v1 = head[1] & 2 != 0;
            gptq::unpack_gptq(bits, group, v1, n, k, &take(&words, 0, nq), &take(&words, 5, nz), scales, g_idx)
                .is_ok_and(check_codes)
        }
        2 if !words.is_empty() => {
            let g = if head[3] & 1 == 0 { 32 } else { 64 };
            let groups = k / g;
            let (nq, nz) = if exact { (k * n / 8, groups * n / 8) } else { (words.len(), words.len() / 3) };
            let scales =
                take(&words, 1, groups * n).into_iter().map(|w| half::f16::from_bits(w as u16).to_f32()).collect();
            gptq::unpack_awq(g, n, k, &take(&words, 0, nq), &take(&words, 2, nz), scales).is_ok_and(check_codes)
        }
        3 => {
            let kind = if head[1] & 1 == 0 { WeightKind::Nf4 } else { WeightKind::Fp4 };
            let cols = 64 * (1 + usize::from(head[2]) % 3);
            let blocksize = [64, 128, 32, 256][usize::from(head[3]) % 4];
            let packed_len = if exact { n * cols / 2 } else { rest.len() };
            let packed: Vec<u8> = (0..packed_len).map(|i| rest.get(i).copied().unwrap_or(0)).collect();
            let absmax = Absmax::Plain((0..(n * cols).div_ceil(blocksize)).map(|i| i as f32 * 0.5).collect());
            let Ok(rows) = bnb::to_rows(kind, n, cols, blocksize, &packed, &absmax) else { return false };
            let mut out = vec![0f32; n * cols];
            crate::quant::ggml::dequantize(kind, &rows, &mut out).expect("sizes agree");
            true
        }
        _ => false,
    }
}

/// Route specs (the body of `PUT /admin/routes/{alias}`, JSON, first byte
/// even) and API-key config (`[auth]`, TOML, first byte odd). A route that
/// validates answers any key with one of its targets; keys that load check
/// any presented key without panicking.
pub fn route_and_key_config(data: &[u8]) -> bool {
    use crate::auth::{AuthSection, Keys};
    use crate::routing::{Route, RouteSpec};
    let Some((&which, rest)) = data.split_first() else { return false };
    let text = String::from_utf8_lossy(rest);
    if which % 2 == 0 {
        let Ok(spec) = serde_json::from_slice::<RouteSpec>(rest) else { return false };
        let Ok(route) = Route::new("alias", spec) else { return false };
        for key in [None, Some(""), Some(text.as_ref()), Some("user-1")] {
            let t = route.choose(key, f64::from(which) / 255.0);
            assert!(route.targets.contains(t));
        }
        let _ = route.shadowed(0.5);
        true
    } else {
        let Ok(section) = toml::from_str::<AuthSection>(&text) else { return false };
        let env = text.split_once('\n').map(|(a, _)| a);
        let Ok(keys) = Keys::new(&section, env, None) else { return false };
        for k in [None, Some(""), Some(text.as_ref())] {
            if let Ok(id) = keys.check(k) {
                let _ = id.allows(&text);
                if let Ok(p) = id.admit() {
                    id.charge(rest.len() as u64);
                    drop(p);
                }
            }
        }
        true
    }
}

/// A `multipart/form-data` upload body (boundary `XyZ`), fed to multer (the
/// parser axum's `Multipart` wraps) in chunks of the size the first byte
/// picks, the `file` field's chunks going through the fine-tune JSONL check
/// as `POST /v1/files` does. Never panics, and the check's verdict does not
/// depend on how the body was cut. Accepted: every field read, one a file.
pub fn multipart_upload(data: &[u8]) -> bool {
    use crate::api::upload_check::JsonlCheck;
    use axum::body::Bytes;
    use futures::FutureExt;
    let Some((&cut, body)) = data.split_first() else { return false };
    let size = usize::from(cut % 64) + 1;
    let chunks: Vec<Result<Bytes, std::convert::Infallible>> =
        body.chunks(size).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let mut form = multer::Multipart::new(futures::stream::iter(chunks), "XyZ");
    // The body is all in memory: every future is ready at once.
    let ready = "an in-memory body never waits";
    let mut saw_file = false;
    loop {
        let field = match form.next_field().now_or_never().expect(ready) {
            Ok(Some(f)) => f,
            Ok(None) => return saw_file,
            Err(_) => return false,
        };
        match field.name() {
            Some("file") => {
                let mut field = field;
                let (mut streamed, mut whole) = (JsonlCheck::default(), Vec::new());
                loop {
                    match field.chunk().now_or_never().expect(ready) {
                        Ok(Some(c)) => {
                            streamed.push(&c);
                            whole.extend_from_slice(&c);
                        }
                        Ok(None) => break,
                        Err(_) => return false,
                    }
                }
                let mut at_once = JsonlCheck::default();
                at_once.push(&whole);
                assert_eq!(streamed.finish(), at_once.finish(), "the verdict depends on the chunking");
                saw_file = true;
            }
            _ => {
                if field.text().now_or_never().expect(ready).is_err() {
                    return false;
                }
            }
        }
    }
}
