#!/usr/bin/env python3
"""The peer for `tandem bench-train`: peft + transformers training the same LoRA
adapter (rank 8, alpha 16, all seven projections, dropout 0) on the same
synthetic micro-batches, on the CPU, in float32 (transformers dequantises the
default GGUF to f32; peft cannot train through the GGUF's blocks).

Micro-batch: --batch sequences of --seq-len tokens, token i of sequence s =
(i * 7919 + s * 104729 + 17) % 32000 (what bench-train uses), labels = the
tokens on the last --loss-fraction of each sequence (-100 before). One
optimiser step per micro-batch: forward, loss (mean over labelled tokens),
backward, AdamW. The first step is a warm-up; the median of the others is
reported, with the process's peak RSS.

Run (the reference stack of scripts/fixtures/requirements.txt):
    python3 scripts/bench_peft_train.py [--model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf]
        [--batch 4] [--seq-len 256] [--steps 3] [--threads 2] [--loss-fraction 1.0]
"""

import argparse
import os
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--loss-fraction", type=float, default=1.0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t = time.time()
    d, f = os.path.split(os.path.abspath(a.model))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32, attn_implementation="sdpa")
    print(f"loaded in {time.time() - t:.1f} s")
    cfg = LoraConfig(
        r=a.rank,
        lora_alpha=2 * a.rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.train()
    ids = torch.tensor(
        [[(i * 7919 + s * 104729 + 17) % 32000 for i in range(a.seq_len)] for s in range(a.batch)], dtype=torch.long
    )
    first = max(1, round((1 - a.loss_fraction) * a.seq_len))
    labels = ids.clone()
    labels[:, :first] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    times = []
    for step in range(a.steps + 1):
        t = time.time()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        dt = time.time() - t
        print(f"step {step}: loss {out.loss.item():.4f} {dt:.2f} s")
        if step > 0:
            times.append(dt)
    med = statistics.median(times)
    tokens = a.batch * a.seq_len
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| peft training step | {med:.2f} s |")
    print(f"| peft training tok/s | {tokens / med:.1f} |")
    print(f"| peft peak RSS | {rss:.0f} MiB |")


if __name__ == "__main__":
    main()
