"""Dev loss of an encoder checkpoint on a training config's dev split (the trainer's own measure).

    python benchmarks/research/dev_loss.py configs/cpu_move_14_19.json [CHECKPOINT]

CHECKPOINT defaults to the shipped encoders; prints one JSON line.
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
    loss = mean_batch_loss(lambda idx: lm_loss(model, [dev[i] for i in idx]), len(dev), cfg.batch_size)
    print(json.dumps({"checkpoint": args.checkpoint or "shipped", "config": args.config,
                      "dev_loss": round(loss, 4), "n": len(dev)}))


if __name__ == "__main__":
    main()
