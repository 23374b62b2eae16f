"""The ``diekae-rag`` command line: train, train-reader, rebuild, eval, data, index, ship, edit, ask."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence


def _run_training(args: argparse.Namespace, config_cls, train_fn) -> int:
    """Load a training config, apply --out / --max-minutes, train, print the summary."""
    cfg = config_cls.from_file(args.config)
    if args.out:
        cfg.out = args.out
    if args.max_minutes is not None:
        cfg.max_minutes = args.max_minutes
    print(json.dumps({k: v for k, v in train_fn(cfg).items() if k != "history"}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training.trainer import TrainConfig, train
    return _run_training(args, TrainConfig, train)


def _train_reader(args: argparse.Namespace) -> int:
    from .training.reader import ReaderTrainConfig, train_reader
    return _run_training(args, ReaderTrainConfig, train_reader)


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import run_eval
    model = None
    if args.isolation is not None:  # evaluate a checkpoint with the passage-isolation switch flipped
        from .model import DiekaeModel
        model = DiekaeModel.from_pretrained(args.checkpoint)
        model.config.passage_isolation = args.isolation == "on"
    res = run_eval(args.checkpoint, n=args.n, ks=args.k, out=args.out, sets=args.sets, baseline=args.baseline,
                   model=model, distractors=args.distractors)
    print(json.dumps(res["summary"], indent=2))
    return 0


def _data(args: argparse.Namespace) -> int:
    from .data.bigbench import fetch_squad_shifts
    print(fetch_squad_shifts(args.out))
    return 0


def _ask(args: argparse.Namespace) -> int:
    from .model import DiekaeModel
    model = DiekaeModel.from_pretrained(args.checkpoint)
    print(model.generate(args.question, args.passage or None, mode=args.mode, max_new_tokens=args.max_new_tokens))
    return 0


def _index(args: argparse.Namespace) -> int:
    from .model import DiekaeModel
    from .retrievers import open_or_build
    from .state_store import states_folder
    model = DiekaeModel.from_pretrained(args.checkpoint)
    store = open_or_build(args.docs, args.store_dir, model=model, states_dtype=args.states_dtype)
    from .indexing import attach_states
    states = attach_states(model, states_folder(args.store_dir))
    print(json.dumps({"chunks": len(store), "stored_segments": len(states), "state_bytes": states.bytes,
                      "states": str(states.folder)}))
    return 0


def _ship(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .checkpoint import load_encoder, read_copy_config, save_encoder
    from .config import parse_settings
    from .copy import CopyConfig
    from .knowledge import FOLLOWUP_READER
    from .model import SHIPPED_WEIGHTS
    enc, _ = load_encoder(args.checkpoint)
    copy = read_copy_config(args.checkpoint) or CopyConfig.plain().for_encoder(enc.config)
    changes = parse_settings(args.set or [])
    if args.reader_weight is not None:
        changes["reader_weight"] = args.reader_weight
    copy = copy.replace(**changes)
    copy.check_for(enc.config)
    readers = {}
    if copy.reader_weight:  # the answer-start readers travel with the encoders
        from .answer_reader import AnswerStartReader
        readers["."] = AnswerStartReader.from_pretrained(args.reader or args.checkpoint)
        if args.followup_reader != "none":  # named, or the checkpoint's own where it has one
            folder = Path(args.followup_reader or Path(args.checkpoint) / FOLLOWUP_READER)
            if args.followup_reader or (folder / "reader.json").exists():
                readers[FOLLOWUP_READER] = AnswerStartReader.from_pretrained(folder)
    elif args.followup_reader not in (None, "none"):
        raise SystemExit("--followup-reader needs copy.reader_weight > 0: the follow-up reader steers the copy "
                         "as the answer-start reader does.")
    out = save_encoder(enc, args.out or SHIPPED_WEIGHTS, dtype=torch.float16, copy=copy)
    for folder, reader in readers.items():
        reader.save_pretrained(out / folder)
    if FOLLOWUP_READER not in readers and (out / FOLLOWUP_READER).exists():
        import shutil
        shutil.rmtree(out / FOLLOWUP_READER)  # a follow-up reader of the encoders shipped before
    print(f"wrote {out} (float16 weights, config.json, copy.json)")
    return 0


def _rebuild(args: argparse.Namespace) -> int:
    from .training.chain import rebuild
    print(f"wrote {rebuild(args.chain, args.out, args.install)}")
    return 0


def _edit(args: argparse.Namespace) -> int:
    from .editing import edit_command
    return edit_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diekae-rag", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train encoders from a JSON config (resumable)")
    t.add_argument("config")
    t.add_argument("--out")
    t.add_argument("--max-minutes", type=float)
    t.set_defaults(func=_train)
    tr = sub.add_parser("train-reader", help="train the answer-start reader from a JSON config")
    tr.add_argument("config")
    tr.add_argument("--out")
    tr.add_argument("--max-minutes", type=float)
    tr.set_defaults(func=_train_reader)
    e = sub.add_parser("eval", help="none / in_context / diekae on held-out sets, JSON + PNG")
    e.add_argument("checkpoint", nargs="?", default=None, help="encoder folder (default: shipped)")
    e.add_argument("--n", type=int, default=60)
    e.add_argument("--k", type=int, nargs="+", default=[1, 5])
    e.add_argument("--sets", nargs="+", default=["fictional_seen", "fictional_unseen", "squad_dev"])
    e.add_argument("--out", default="runs/eval")
    e.add_argument("--baseline", default=None, help="results.json whose none/in_context rows to reuse")
    e.add_argument("--distractors", choices=["random", "retrieved"], default="random",
                   help="k>1 distractors: other items' passages, or the question's nearest passages (FAISS)")
    e.add_argument("--isolation", choices=["on", "off"], default=None, help="override passage_isolation")
    e.set_defaults(func=_eval)
    d = sub.add_parser("data", help="build the SQuAD-Shifts files from the bigbench==1.0.0 sdist")
    d.add_argument("--out", default=None)
    d.set_defaults(func=_data)
    a = sub.add_parser("ask", help="answer one question from passages given on the command line")
    a.add_argument("question")
    a.add_argument("--passage", action="append")
    a.add_argument("--mode", default="diekae", choices=["diekae", "in_context", "none"])
    a.add_argument("--checkpoint", default=None)
    a.add_argument("--max-new-tokens", type=int, default=64)
    a.set_defaults(func=_ask)
    ix = sub.add_parser("index", help="build or update a FAISS store of a folder, with every chunk's encoder states")
    ix.add_argument("docs")
    ix.add_argument("store_dir")
    ix.add_argument("--checkpoint", default=None, help="encoder folder (default: shipped)")
    ix.add_argument("--states-dtype", choices=["float16", "float32", "int8", "int4"], default=None,
                    help="how a new store keeps the passage states (default int4; an existing store keeps its own)")
    ix.set_defaults(func=_index)
    sh = sub.add_parser("ship", help="copy a checkpoint (float16) into the package as the default encoders")
    sh.add_argument("checkpoint")
    sh.add_argument("--out", default=None)
    sh.add_argument("--reader", default=None, help="answer-start reader folder to ship with the encoders "
                    "(default: the checkpoint's own, if its config sets reader_weight)")
    sh.add_argument("--followup-reader", default=None, help="answer-start reader folder for questions read "
                    "with earlier turns (default: the checkpoint's followups/ folder, if it has one; "
                    "'none' ships none)")
    sh.add_argument("--reader-weight", type=float, default=None, help="set copy.reader_weight (0: no reader)")
    sh.add_argument("--set", action="append", metavar="FIELD=JSON",
                    help="set a copy setting (copy.json), e.g. --set first_unspaced=true")
    sh.set_defaults(func=_ship)
    rb = sub.add_parser("rebuild", help="train a committed chain of configs (configs/shipped.json: the shipped encoders)")
    rb.add_argument("chain")
    rb.add_argument("--out", default="runs/shipped", help="folder for each step's run and the final encoders")
    rb.add_argument("--install", action="store_true", help="write the result over the package's shipped encoders")
    rb.set_defaults(func=_rebuild)
    ed = sub.add_parser("edit", help="train editing encoders from an edits JSONL")
    ed.add_argument("edits")
    ed.add_argument("-o", "--out", required=True)
    ed.add_argument("--steps", type=int, default=300)
    ed.add_argument("--scope", choices=["fact", "subject", "all"], default="fact",
                    help="fact: edits act only on prompts naming an edited subject and worded like its edit; "
                         "subject: on every prompt naming an edited subject; all: on every prompt")
    ed.set_defaults(func=_edit)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"diekae-rag {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
