//! Any bytes as a request body: parsing and validation return, never panic,
//! and what they accept fits the engine's limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::api::json::parse;
use tandem::api::params::validate;
use tandem::api::protocol::{ChatCompletionRequest, CompletionRequest};
use tandem::engine::EngineInfo;

fuzz_target!(|data: &[u8]| {
    let info = EngineInfo {
        max_model_len: 256,
        vocab_size: 256,
        eos_token_ids: vec![2],
        block_size: 16,
        num_blocks: 64,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_waiting: 8,
        max_loras: 0,
    };
    if let Ok(r) = parse::<CompletionRequest>(data) {
        if let Ok(p) = validate(&r.shared(), r.max_tokens, None, &info) {
            if let Ok(reqs) = p.engine_requests(&[1, 2, 3], &info, "prompt") {
                assert!(reqs.iter().all(|q| q.prompt.len() + q.stopping.max_tokens <= info.max_model_len));
            }
        }
    }
    if let Ok(r) = parse::<ChatCompletionRequest>(data) {
        let _ = tandem::api::chat::prepare_messages(&r.messages);
        let _ = validate(&r.shared(), r.max_completion_tokens.or(r.max_tokens), None, &info);
    }
});
