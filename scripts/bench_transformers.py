#!/usr/bin/env python3
"""transformers on the same shapes as `tandem bench --model random:<shape>:bf16`,
for the side-by-side ratio in scripts/gpu-check.sh.

Random weights (outputs do not matter; the work does). Prefill: one prompt of
--prompt-len tokens. Decode: --decode-steps steps at each batch size, with a
KV cache (DynamicCache), greedy, timed after a warm-up step. Prints a markdown
table like `tandem bench`, plus the device's measured copy bandwidth.

    python3 scripts/bench_transformers.py --shape llama3-8b --batch 1,16,64
"""
import argparse, statistics, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, rope theta
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256, 500000.0),
    "llama3-1b": (2048, 8192, 16, 32, 8, 128256, 500000.0),
    "tiny": (256, 512, 2, 4, 2, 1024, 10000.0),
}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth_gbs(dev):
    """Device memory bandwidth by a large device-to-device copy (read + write)."""
    if dev.type != "cuda":
        return float("nan")
    n = 1 << 30  # 1 GiB of bytes each way
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(dev)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        b.copy_(a)
        sync(dev)
        times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    h, ff, layers, heads, kv, vocab, theta = SHAPES[a.shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      rope_theta=theta, max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=dev).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.eval()
    print(f"model: transformers random {a.shape} {a.dtype}\ndevice: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}")
    print(f"torch {torch.__version__}")
    rows = []
    with torch.no_grad():
        ids = torch.randint(0, vocab, (1, a.prompt_len), device=dev)
        model(ids)  # warm-up
        ts = []
        for _ in range(a.reps):
            sync(dev)
            t = time.perf_counter()
            model(ids)
            sync(dev)
            ts.append(time.perf_counter() - t)
        rows.append((f"prefill pp{a.prompt_len}", a.prompt_len / statistics.median(ts), None))
        for b in [int(x) for x in a.batch.split(",")]:
            ts = []
            for _ in range(a.reps):
                prompt = torch.randint(0, vocab, (b, 32), device=dev)
                out = model(prompt, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                sync(dev)
                t = time.perf_counter()
                for _ in range(a.decode_steps):
                    out = model(tok, past_key_values=past, use_cache=True)
                    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                sync(dev)
                ts.append(time.perf_counter() - t)
            step = statistics.median(ts) / a.decode_steps
            rows.append((f"decode batch {b}", b / step, step * 1e3))
    print("| test | tok/s |\n| --- | ---: |")
    for name, tps, ms in rows:
        print(f"| {name} | {tps:.1f}" + (f" ({ms:.1f} ms/step)" if ms is not None else "") + " |")
    print(f"copy bandwidth: {copy_bandwidth_gbs(dev):.0f} GB/s")


if __name__ == "__main__":
    main()
