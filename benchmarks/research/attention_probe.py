"""The encoders' attention over the question, timed in the forms it could take (CPU micro-benchmark).

    python benchmarks/research/attention_probe.py [--out benchmarks/results/cpu/attention_probe.json]

The shapes of one block's call at k=5 (``ttft_profile.py --ops``): 7 trunks × 4 heads, 38 question
positions against 635 knowledge positions, head size 32, a causal mask over valid keys. Forms:
``scaled_dot_product_attention`` with the boolean mask expanded per trunk (as the encoders call it),
broadcast, as a float mask, without a mask (a floor), the same call in bfloat16, and the products
written out (``q @ kᵀ``, softmax, ``@ v``). The forms take turns call by call (medians), so the CPU's
drift and the cache's state reach them alike; each form's largest difference from the served call is
recorded.

Two more forms time what a block does with the passages' states, which are kept one segment apart:
the six segments' keys and values copied into one buffer with the question's, then the served call
(what serving does), against one flash call per segment and one over the question, merged by their
log-sum-exps, which reads each segment where it lies and copies nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diekae_rag.atomic import atomic_write_text
from bench import hardware


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

    # The states of a passage prefix and five passages (597 positions), each a view of its own batch,
    # as `passage_cache.encode_segments` leaves them, and the question's 38 positions.
    lengths = [3, 119, 121, 118, 117, 119]
    segments = [(torch.randn(n, 1, h, L + 2, hd)[:, 0, :, 2:], torch.randn(n, 1, h, L + 2, hd)[:, 0, :, 2:])
                for L in lengths]
    tail_k, tail_v = torch.randn(n, h, T, hd), torch.randn(n, h, T, hd)
    P = sum(lengths)
    seg_mask = ((torch.arange(T)[:, None] + P) >= torch.arange(P + T)[None])[None, None].expand(n, 1, T, P + T)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def copied_then_served() -> torch.Tensor:
        kbuf, vbuf = torch.empty(n, h, P + T + 64, hd), torch.empty(n, h, P + T + 64, hd)
        at = 0
        for (sk, sv), L in zip(segments + [(tail_k, tail_v)], lengths + [T]):
            kbuf[:, :, at:at + L].copy_(sk)
            vbuf[:, :, at:at + L].copy_(sv)
            at += L
        return F.scaled_dot_product_attention(q, kbuf[:, :, :at], vbuf[:, :, :at], attn_mask=seg_mask)

    def per_segment_merged() -> torch.Tensor:
        parts = [flash(q, sk, sv) for sk, sv in segments] + [flash(q, tail_k, tail_v, is_causal=True)]
        weights = torch.softmax(torch.stack([lse for _, lse in parts]), 0).unsqueeze(-1)
        return (torch.stack([out for out, _ in parts]) * weights).sum(0)

    def written_out() -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + additive, -1) @ v

    forms = {
        "sdpa, bool mask per trunk (served)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=expanded),
        "sdpa, bool mask broadcast": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "sdpa, float mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive),
        "sdpa, no mask (a floor)": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa, bfloat16": lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=ab),
        "written out": written_out,
        "segments copied into one buffer, then sdpa (served)": copied_then_served,
        "one flash call per segment, merged by log-sum-exp": per_segment_merged,
    }
    served, segments_served = "sdpa, bool mask per trunk (served)", "segments copied into one buffer, then sdpa (served)"
    compared_with = {name: segments_served if name.startswith(("segments", "one flash")) else served for name in forms}
    rows = {}
    with torch.inference_mode():
        for _ in range(10):  # warm-up; the last outputs are compared
            outs = {name: f() for name, f in forms.items()}
        times = {name: [] for name in forms}
        for _ in range(args.reps):  # the forms take turns, so the CPU's drift reaches them alike
            for name, f in forms.items():
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
        for name in forms:
            ms = statistics.median(times[name]) * 1000
            rows[name] = {"ms": round(ms, 3), "max_diff": float((outs[name].float() - outs[compared_with[name]]).abs().max()),
                          "compared_with": compared_with[name]}
            print(f"{name:52s} {ms:6.3f} ms  max diff {rows[name]['max_diff']:.2e}")
    result = {"hardware": hardware(torch.device("cpu")), "shape": {"trunks": n, "heads": h, "question": T,
              "knowledge": Tk, "head_dim": hd}, "forms": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
