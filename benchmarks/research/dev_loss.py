"""Dev loss of an encoder checkpoint on a training config's dev split (the trainer's own measure).

    python benchmarks/research/dev_loss.py configs/cpu_move_14_19.json [CHECKPOINT]

CHECKPOINT defaults to the shipped encoders; the config's ``copy`` settings apply, as in training.
Prints one JSON line; with negative items in the split (``data.negatives``), also the answer NLL of
the answerable items and the KL to the bare decoder of the others, apart.
"""

from __future__ import annotations

import argparse
import json

from diekae_rag import DiekaeModel
from diekae_rag.training.phase2 import lm_loss
from diekae_rag.training.trainer import TrainConfig, mean_batch_loss, split_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("checkpoint", nargs="?", default=None)
    args = ap.parse_args()
    cfg = TrainConfig.from_file(args.config)
    dev, _ = split_examples(cfg)
    model = DiekaeModel.from_pretrained(args.checkpoint, decoder=cfg.decoder)
    model.encoder.float().eval()
    if cfg.copy:
        model.copy = model.copy.replace(**cfg.copy)
    row = {"checkpoint": args.checkpoint or "shipped", "config": args.config, "n": len(dev)}
    parts = {"dev_loss": dev}
    if not all(e.answerable for e in dev):
        parts["answerable_nll"] = [e for e in dev if e.answerable]
        parts["negative_kl"] = [e for e in dev if not e.answerable]
    for name, items in parts.items():
        loss = mean_batch_loss(lambda idx: lm_loss(model, [items[i] for i in idx]), len(items), cfg.batch_size)
        row[name] = round(loss, 4)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
