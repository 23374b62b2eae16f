"""Dev loss of an encoder checkpoint on a training config's dev split (the trainer's own measure).

    python benchmarks/dev_loss.py configs/cpu_move_14_19.json [CHECKPOINT]

CHECKPOINT defaults to the shipped encoders; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from diekae_rag import DiekaeModel
from diekae_rag.data.mixture import DataSpec
from diekae_rag.training.phase2 import lm_loss
from diekae_rag.training.trainer import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("checkpoint", nargs="?", default=None)
    args = ap.parse_args()
    cfg = TrainConfig.from_file(args.config)
    dev = DataSpec(**cfg.data).build()[: cfg.dev_size]
    model = DiekaeModel.from_pretrained(args.checkpoint, decoder=cfg.decoder)
    model.encoder.float().eval()
    with torch.no_grad():
        losses = [float(lm_loss(model, dev[i:i + cfg.batch_size])) for i in range(0, len(dev), cfg.batch_size)]
    print(json.dumps({"checkpoint": args.checkpoint or "shipped", "config": args.config,
                      "dev_loss": round(sum(losses) / len(losses), 4), "n": len(dev)}))


if __name__ == "__main__":
    main()
