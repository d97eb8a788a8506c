#!/usr/bin/env python3
"""One random LoRA adapter for a GGUF base model, written twice with the same
weights: as a PEFT directory (adapter_config.json + adapter_model.safetensors,
what tandem loads) and as a GGUF LoRA file (what llama.cpp's --lora loads).

Every attention and MLP projection (q, k, v, o, gate, up, down) of every layer
gets rank r; lora_alpha = r, so the scaling is 1 in both formats. Shapes come
from the base GGUF's metadata; Qwen2 GGUFs keep HF's Q/K row order, so the same
A/B apply unchanged (Llama GGUFs permute Q/K rows: not supported here).

usage: make_random_lora.py BASE.gguf OUT_DIR [--rank 16] [--seed 0]
  -> OUT_DIR/peft/{adapter_config.json,adapter_model.safetensors}, OUT_DIR/lora.gguf
needs: numpy, safetensors, gguf (loadtests/requirements.txt)
"""

import argparse
import json
import os

import numpy as np
from gguf import GGUFReader, GGUFWriter
from safetensors.numpy import save_file

TARGETS = [  # (PEFT module, parent, GGUF tensor)
    ("q_proj", "self_attn", "attn_q"),
    ("k_proj", "self_attn", "attn_k"),
    ("v_proj", "self_attn", "attn_v"),
    ("o_proj", "self_attn", "attn_output"),
    ("gate_proj", "mlp", "ffn_gate"),
    ("up_proj", "mlp", "ffn_up"),
    ("down_proj", "mlp", "ffn_down"),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("out")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    reader = GGUFReader(a.base)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    shapes = {t.name: (int(t.shape[1]), int(t.shape[0])) for t in reader.tensors if len(t.shape) == 2}  # (out, in)
    layers = 1 + max(int(n.split(".")[1]) for n in shapes if n.startswith("blk."))
    rng = np.random.default_rng(a.seed)
    r = a.rank
    tensors, gguf_tensors = {}, []
    for i in range(layers):
        for module, parent, gname in TARGETS:
            out_f, in_f = shapes[f"blk.{i}.{gname}.weight"]
            A = rng.uniform(-0.05, 0.05, size=(r, in_f)).astype(np.float32)
            B = rng.uniform(-0.05, 0.05, size=(out_f, r)).astype(np.float32)
            key = f"base_model.model.model.layers.{i}.{parent}.{module}"
            tensors[f"{key}.lora_A.weight"] = A
            tensors[f"{key}.lora_B.weight"] = B
            gguf_tensors.append((f"blk.{i}.{gname}.weight.lora_a", A))
            gguf_tensors.append((f"blk.{i}.{gname}.weight.lora_b", B))

    peft = os.path.join(a.out, "peft")
    os.makedirs(peft, exist_ok=True)
    save_file(tensors, os.path.join(peft, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "target_modules": [t[0] for t in TARGETS],
        "bias": "none",
        "base_model_name_or_path": os.path.basename(a.base),
    }
    with open(os.path.join(peft, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)

    w = GGUFWriter(os.path.join(a.out, "lora.gguf"), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(r))
    for name, t in gguf_tensors:
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{layers} layers x {len(TARGETS)} projections, rank {r}: {peft}, {os.path.join(a.out, 'lora.gguf')}")


if __name__ == "__main__":
    main()
