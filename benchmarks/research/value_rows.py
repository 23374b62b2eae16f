"""Which value row makes the pointer's copied token the decoder's top token.

    python benchmarks/research/value_rows.py [--n 3000]

The pointer adds ``gain * value`` to the last layer's output; once that term dominates, the decoder's
logits are ``(lm_head * final_norm.weight) @ value`` up to a positive scale. For ``--n`` random
tokens of the embedded SmolLM2 this counts how often the token itself is then the top logit, for
its raw output-embedding row (what the pointer wrote before whitened values), that row centred
(the vocabulary mean removed) and its whitened row (``diekae_rag.encoder.whitened_values``, shipped),
and gives the mean logit boost of the token against the largest boost of any other token.
Writes benchmarks/results/value_rows.json unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diekae_rag.atomic import atomic_write_text
from diekae_rag.decoder import load_decoder
from diekae_rag.copy.values import whitened_values, whitener


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results" / "value_rows.json")
    args = ap.parse_args()
    decoder, _ = load_decoder()
    W = decoder.get_output_embeddings().weight.detach().float()
    g = decoder.model.norm.weight.detach().float()
    ids = torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(0))[: args.n]
    rows = {"raw": W[ids], "centred": W[ids] - W.mean(0), "whitened": whitened_values(W, g, whitener(W, g), ids)}
    out = {"n": args.n, "tied": decoder.config.tie_word_embeddings}
    for name, v in rows.items():
        logits = v @ (W * g).T
        own = logits[torch.arange(len(ids)), ids]
        other = logits.scatter(1, ids[:, None], float("-inf")).amax(1)
        out[name] = {"top_is_the_token": round(float((logits.argmax(1) == ids).float().mean()), 4),
                     "own_boost": round(float(own.mean()), 2), "largest_other_boost": round(float(other.mean()), 2)}
        print(name, out[name])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
