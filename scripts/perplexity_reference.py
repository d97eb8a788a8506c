#!/usr/bin/env python3
"""The reference stack's perplexity on the checkpoints `tandem quantize` writes, with
`tandem perplexity`'s (and llama-perplexity's) windows: the text's tokens cut into
non-overlapping windows of CTX tokens, each evaluated from scratch, the second half of
each scored. No BOS is put in front (the Qwen2 vocabulary adds none; `tandem perplexity`
puts one in place of each window's first token when the vocabulary adds one, as for Llama,
so this script's figures are comparable only for models without one).

    scripts/perplexity_reference.py MODEL_DIR_OR_GGUF [MODEL...]

Each argument is an HF directory (bitsandbytes NF4/FP4 loaded through transformers, each
Linear4bit then replaced by bitsandbytes' own `dequantize_4bit` in f32, since its CPU
forward computes in bf16; GPTQ through gptqmodel's kernels) or a `.gguf` (transformers'
GGUF loader, which dequantises with gguf-py to f32). The tokenizer is the model's own.
Python: the packers' venv (scripts/fixtures/requirements-packers.txt).
"""

import math
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.environ.get("PPL_TEXT", os.path.join(REPO, "tests/fixtures/text/tandem-docs.txt"))
CTX = int(os.environ.get("PPL_CTX", "512"))
CHUNKS = int(os.environ.get("PPL_CHUNKS", "4"))


def load(spec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.endswith(".gguf"):
        d, f = os.path.dirname(spec) or ".", os.path.basename(spec)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
        return tok, m
    tok = AutoTokenizer.from_pretrained(spec)
    m = AutoModelForCausalLM.from_pretrained(spec, torch_dtype=torch.float32, device_map="cpu")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return tok, m
    sys.path.insert(0, os.path.join(REPO, "scripts/fixtures"))
    from quantize_export import dequantized_bnb

    m = dequantized_bnb(m)
    # The checkpoint's other tensors are in its own float dtype (bf16 here): compute in f32.
    return tok, torch.nn.Module.float(m)


def perplexity(tok, m, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = min(len(ids) // CTX, CHUNKS)
    nll, scored = 0.0, 0
    torch.set_num_threads(os.cpu_count() or 2)
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor([ids[w * CTX:(w + 1) * CTX]])
            logits = m(x).logits[0].double()
            lp = torch.log_softmax(logits, dim=-1)
            for j in range(CTX // 2, CTX - 1):
                nll -= lp[j, x[0, j + 1]].item()
                scored += 1
            print(f"  window {w + 1}/{windows}: running perplexity {math.exp(nll / scored):.4f}", flush=True)
    return math.exp(nll / scored), len(ids)


def main():
    text = open(TEXT, encoding="utf-8").read()
    for spec in sys.argv[1:]:
        tok, m = load(spec)
        ppl, n = perplexity(tok, m, text)
        print(f"{spec}: perplexity {ppl:.4f} ({n} tokens, ctx {CTX}, {CHUNKS} windows)", flush=True)


if __name__ == "__main__":
    main()
