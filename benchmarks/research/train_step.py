"""Phase-2 training step (forward + backward) in the isolated and the joint encoder layout.

    python benchmarks/research/train_step.py [--batch 16] [--k 3] [--repeats 3]

Same examples (fictional facts, k passages each) and the shipped encoders in both layouts;
prints the median seconds per step and writes benchmarks/results/<device>/train_step.json.
"""
import argparse
import json
import statistics
from pathlib import Path

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from bench import hardware, timed
from diekae_rag.data.mixture import DataSpec
from diekae_rag.training.phase2 import lm_loss
from diekae_rag.training.trainer import autocast_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained()
    model.encoder.float().train()
    batch = DataSpec(fictional=10 * args.batch, other_facts=(0, 3), k=args.k, seed=1).build()[: args.batch]
    amp = autocast_for(model.device)

    def step() -> None:
        with amp:
            loss = lm_loss(model, batch)
        loss.backward()

    rows = {}
    for isolation in (True, False):
        model.config.passage_isolation = isolation
        step()  # warm-up
        rows["isolated" if isolation else "joint"] = statistics.median(timed(step, model.device)
                                                                     for _ in range(args.repeats))
    print(json.dumps(rows))
    out = Path(args.out) / model.device.type
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train_step.json", json.dumps({"hardware": hardware(model.device), "batch": args.batch,
                                                           "k": args.k, "step_s": rows}, indent=2))


if __name__ == "__main__":
    main()
