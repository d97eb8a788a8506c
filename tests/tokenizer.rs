//! Tokenizer parity with transformers (goldens from scripts/fixtures/tokenizer.py).
//!
//! Qwen tests read the vocabulary from the default model and skip (with a reason
//! on stderr) when it has not been fetched; CI fetches it. The tiny tokenizer.json
//! and tiny SentencePiece GGUF fixtures are committed, so those always run.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;
use tandem::loader::gguf::GgufFile;
use tandem::tokenizer::{DecodeStream, GgufVocab, Tokenizer};

const DEFAULT_MODEL: &str = "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(p: &str) -> PathBuf {
    repo().join("tests/fixtures/tokenizer").join(p)
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn str_of<'a>(case: &'a Value, key: &str) -> &'a str {
    case[key].as_str().unwrap()
}

fn from_gguf(path: &Path) -> Tokenizer {
    let file = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Tokenizer::from_gguf_vocab(&GgufVocab::from_gguf(&file).unwrap()).unwrap()
}

/// The default model's tokenizer, built once per test binary.
fn qwen() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = repo().join(DEFAULT_MODEL);
        if !path.exists() {
            return None;
        }
        Some(from_gguf(&path))
    })
    .as_ref()
    .or_else(|| {
        eprintln!("skipping: {DEFAULT_MODEL} is missing (run scripts/get-default-model.sh; CI does)");
        None
    })
}

fn streamed(tok: &Tokenizer, ids: &[u32], skip: bool) -> String {
    let mut stream = DecodeStream::new(skip);
    let mut out = String::new();
    for &id in ids {
        if let Some(piece) = stream.step(tok, id).unwrap() {
            out.push_str(&piece);
        }
    }
    out.push_str(&stream.flush(tok).unwrap());
    out
}

/// ids, decode and streaming decode against a golden file's cases. `expected_ids`
/// picks the golden ids for a case (Qwen's NFC column or the plain one).
fn check_cases(tok: &Tokenizer, golden: &Value, expected_ids: &str) {
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "corpus too small: {}", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let text = str_of(case, "text");
        let want = ids(&case[expected_ids]);
        let got = tok.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("encode {text:?}:\n  got  {got:?}\n  want {want:?}"));
        }
        // The ids HF adds around a text (BOS/EOS) do not depend on the normaliser:
        // splice the expected plain ids between them.
        let want_special = ids(&case["ids_special"]);
        let plain = ids(&case["ids"]);
        let start = (0..=want_special.len() - plain.len())
            .find(|&i| want_special[i..i + plain.len()] == plain[..])
            .expect("golden ids_special contains ids");
        let mut expect_special = want_special[..start].to_vec();
        expect_special.extend(&want);
        expect_special.extend(&want_special[start + plain.len()..]);
        let got_special = tok.encode(text, true).unwrap();
        if got_special != expect_special {
            failures.push(format!("encode(special) {text:?}:\n  got  {got_special:?}\n  want {expect_special:?}"));
        }
        for (skip, key) in [(false, "decoded"), (true, "decoded_skip")] {
            let want_text = str_of(case, key);
            let got_text = tok.decode(&plain, skip).unwrap();
            if got_text != want_text {
                failures.push(format!("decode(skip={skip}) {text:?}: got {got_text:?} want {want_text:?}"));
            }
            let got_stream = streamed(tok, &plain, skip);
            if got_stream != want_text {
                failures.push(format!("stream(skip={skip}) {text:?}: got {got_stream:?} want {want_text:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn qwen2_gguf_matches_transformers() {
    let Some(tok) = qwen() else { return };
    let golden = read_json(&fixture("qwen2_golden.json"));
    // Our qwen2 tokenizer normalises to NFC like Qwen's own tokenizer.json;
    // transformers' GGUF loader does not, so the goldens differ on non-NFC text only.
    check_cases(tok, &golden, "ids_nfc");
    let differing: Vec<&str> = golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ids"] != c["ids_nfc"])
        .map(|c| str_of(c, "text"))
        .collect();
    assert_eq!(differing.len(), 2, "only the two non-NFC strings may differ: {differing:?}");
}

#[test]
fn qwen2_gguf_special_tokens_and_metadata() {
    let Some(tok) = qwen() else { return };
    let golden = read_json(&fixture("qwen2_golden.json"));
    assert_eq!(tok.vocab_size(), golden["vocab_size"].as_u64().unwrap() as usize);
    assert_eq!(tok.bos_token_id(), Some(151643));
    // eos first, then <|endoftext|> (what Qwen's generation_config lists).
    assert_eq!(tok.eos_token_ids(), vec![151645, 151643]);
    for (text, id) in golden["special_tokens"].as_object().unwrap() {
        assert_eq!(tok.token_to_id(text), Some(id.as_u64().unwrap() as u32), "{text}");
        assert_eq!(tok.id_to_token(id.as_u64().unwrap() as u32).as_deref(), Some(text.as_str()));
        assert!(tok.is_special(id.as_u64().unwrap() as u32));
    }
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![151644]);
    // USER_DEFINED tokens stay whole but are not special: skip_special keeps them.
    assert_eq!(tok.encode("<tool_call>", false).unwrap(), vec![151657]);
    assert!(!tok.is_special(151657));
    assert_eq!(tok.decode(&[151657, 151644], true).unwrap(), "<tool_call>");
    let template = tok.chat_template().expect("the GGUF has a chat template");
    let chat = read_json(&fixture("chat_golden.json"));
    assert_eq!(template.source(), chat["templates"]["qwen2"].as_str().unwrap());
    assert!(tok.chat_template_error().is_none());
}

#[test]
fn qwen2_stream_with_context_and_long_generation() {
    let Some(tok) = qwen() else { return };
    let golden = read_json(&fixture("qwen2_golden.json"));
    // All corpus ids back to back: one long stream, as a generation would be.
    let all: Vec<u32> = golden["cases"].as_array().unwrap().iter().flat_map(|c| ids(&c["ids"])).collect();
    assert_eq!(streamed(tok, &all, false), tok.decode(&all, false).unwrap());
    assert_eq!(streamed(tok, &all, true), tok.decode(&all, true).unwrap());
    // Emoji and CJK split across byte-level tokens: no piece may hold half a character.
    let emoji = tok.encode("👨\u{200d}👩\u{200d}👧 and 日本語", false).unwrap();
    let mut stream = DecodeStream::new(false);
    for &id in &emoji {
        if let Some(piece) = stream.step(tok, id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "partial character emitted: {piece:?}");
        }
    }
    let prompt = tok.encode("Say hello:", false).unwrap();
    let gen = tok.encode(" Hello there", false).unwrap();
    let mut stream = DecodeStream::with_context(&prompt, false);
    let text: String = gen.iter().filter_map(|&id| stream.step(tok, id).unwrap()).collect();
    assert_eq!(text, " Hello there");
}

#[test]
fn tiny_bpe_dir_matches_transformers() {
    let dir = fixture("tiny_bpe");
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    let golden = read_json(&dir.join("golden.json"));
    check_cases(&tok, &golden, "ids");
    assert_eq!(tok.vocab_size(), golden["vocab_size"].as_u64().unwrap() as usize);
    assert_eq!(tok.bos_token_id(), Some(golden["bos_token_id"].as_u64().unwrap() as u32));
    // tokenizer_config's eos, then generation_config's list (deduplicated).
    assert_eq!(tok.eos_token_ids(), vec![2, 0]);
    let chat = &golden["chat"];
    let rendered = tok.chat_template().unwrap().render(&chat["messages"], None, true, None).unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
}

#[test]
fn tiny_bpe_from_file_equals_from_dir() {
    let dir = fixture("tiny_bpe");
    let a = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let b = Tokenizer::from_hf_dir(&dir).unwrap();
    let text = "<|user|>\nHi fox, 12345 élèves<|assistant|>";
    assert_eq!(a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
    assert_eq!(a.eos_token_ids(), b.eos_token_ids());
    assert!(a.chat_template().is_some());
}

#[test]
fn tiny_spm_gguf_matches_transformers() {
    let tok = from_gguf(&fixture("tiny_spm.gguf"));
    let golden = read_json(&fixture("spm_golden.json"));
    check_cases(&tok, &golden, "ids");
    assert_eq!(tok.vocab_size(), golden["vocab_size"].as_u64().unwrap() as usize);
    assert_eq!(tok.bos_token_id(), Some(golden["bos_token_id"].as_u64().unwrap() as u32));
    assert_eq!(tok.eos_token_ids()[0], golden["eos_token_id"].as_u64().unwrap() as u32);
    assert!(tok.chat_template().is_some());
}

#[test]
fn tiny_byte_level_ggufs_match_transformers() {
    // The same BPE as tiny_bpe/, as llama.cpp stores it, with Llama 3's split regex
    // ("llama-bpe", BOS added) and GPT-2's ("default"), plus a USER_DEFINED <think>
    // and a CONTROL token outside the byte alphabet (which stays plain text).
    for pre in ["llama-bpe", "default"] {
        let tok = from_gguf(&fixture(&format!("tiny_bpe_{pre}.gguf")));
        let golden = read_json(&fixture(&format!("tiny_bpe_{pre}_golden.json")));
        check_cases(&tok, &golden, "ids");
        assert_eq!(tok.vocab_size(), golden["vocab_size"].as_u64().unwrap() as usize, "{pre}");
        assert_eq!(tok.encode("<think>", false).unwrap(), vec![452], "{pre}");
    }
}

#[test]
fn tiny_spm_stream_with_context() {
    let tok = from_gguf(&fixture("tiny_spm.gguf"));
    let golden = read_json(&fixture("spm_golden.json"));
    for case in golden["cases"].as_array().unwrap() {
        let all = ids(&case["ids"]);
        let (context, rest) = all.split_at(all.len() / 2);
        let whole = tok.decode(&all, false).unwrap();
        let head = tok.decode(context, false).unwrap();
        let Some(want) = whole.strip_prefix(&head) else { continue };
        let mut stream = DecodeStream::with_context(context, false);
        let mut got: String = rest.iter().filter_map(|&id| stream.step(&tok, id).unwrap()).collect();
        got.push_str(&stream.flush(&tok).unwrap());
        assert_eq!(got, want, "{:?}", case["text"]);
    }
}

#[test]
fn gguf_vocab_errors_are_errors() {
    let empty = GgufVocab { model: "gpt2".into(), ..Default::default() };
    assert!(Tokenizer::from_gguf_vocab(&empty).is_err());
    let unknown = GgufVocab { model: "rwkv".into(), tokens: vec!["a".into()], ..Default::default() };
    assert!(Tokenizer::from_gguf_vocab(&unknown).is_err());
    let bad_merge = GgufVocab {
        model: "gpt2".into(),
        tokens: vec!["a".into(), "b".into()],
        merges: vec!["ab".into()],
        ..Default::default()
    };
    assert!(Tokenizer::from_gguf_vocab(&bad_merge).is_err());
    let bad_eos = GgufVocab { model: "gpt2".into(), tokens: vec!["a".into()], eos_id: Some(5), ..Default::default() };
    assert!(Tokenizer::from_gguf_vocab(&bad_eos).is_err());
    assert!(Tokenizer::from_hf_dir(Path::new("/nonexistent/dir")).is_err());
}
