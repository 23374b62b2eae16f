"""The encoders' attention over the question, timed in the forms it could take (CPU micro-benchmark).

    python benchmarks/research/attention_probe.py [--out benchmarks/results/cpu/attention_probe.json]

The shapes of one block's call at k=5 (``ttft_profile.py --ops``): 7 trunks × 4 heads, 38 question
positions against 635 knowledge positions, head size 32, a causal mask over valid keys. Forms:
``scaled_dot_product_attention`` with the boolean mask expanded per trunk (as the encoders call it),
broadcast, as a float mask, without a mask (a floor), the same call in bfloat16, and the products
written out (``q @ kᵀ``, softmax, ``@ v``). Each form's largest difference from the first is recorded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diekae_rag.atomic import atomic_write_text
from diekae_rag.bench import hardware


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/cpu/attention_probe.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    n, h, T, Tk, hd = 7, 4, 38, 635, 32
    q, k, v = torch.randn(n, h, T, hd), torch.randn(n, h, Tk, hd), torch.randn(n, h, Tk, hd)
    valid = torch.ones(1, Tk, dtype=torch.bool)
    valid[:, 100:110] = False  # a separator's padding
    q_idx, k_idx = torch.arange(T)[:, None] + Tk - T, torch.arange(Tk)[None]
    mask = (((k_idx <= q_idx)[None] & valid[:, None, :]) | (k_idx == q_idx)[None])[:, None]  # (1, 1, T, Tk)
    expanded = mask.expand(n, 1, T, Tk).reshape(n, 1, T, Tk)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    qb, kb, vb, ab = q.bfloat16(), k.bfloat16(), v.bfloat16(), additive.bfloat16()

    def written_out() -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + additive, -1) @ v

    forms = {
        "sdpa, bool mask per trunk (served)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=expanded),
        "sdpa, bool mask broadcast": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "sdpa, float mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive),
        "sdpa, no mask (a floor)": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa, bfloat16": lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=ab),
        "written out": written_out,
    }
    rows = {}
    with torch.inference_mode():
        ref = forms["sdpa, bool mask per trunk (served)"]()
        for name, f in forms.items():
            for _ in range(10):
                out = f()
            t = time.perf_counter()
            for _ in range(args.reps):
                f()
            ms = (time.perf_counter() - t) / args.reps * 1000
            rows[name] = {"ms": round(ms, 3), "max_diff": float((out.float() - ref).abs().max())}
            print(f"{name:40s} {ms:6.3f} ms  max diff {rows[name]['max_diff']:.2e}")
    result = {"hardware": hardware(torch.device("cpu")), "shape": {"trunks": n, "heads": h, "question": T,
              "knowledge": Tk, "head_dim": hd}, "forms": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
