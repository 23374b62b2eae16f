"""What the answer-start reader costs per question against k, in float32 and in its serving dtype.

    python benchmarks/reader_cost.py [READER_DIR ...] [--ks 1 5 10 20 50] [--repeats 7] [--dev 60]
                                     [--forms float32 serving bfloat16 int8 int8_channel]

For each reader (default: the shipped one), in float32 and in the dtype it serves in here
(``answer_reader.serving_dtype``: bfloat16 on a CPU with native bfloat16 matrix products), the median time of reading one new
question against k passages of about 120 decoder tokens (``bench_passages``). A reader with
``separate_layers`` is timed twice: with its passage sides kept (read at index time: only the
question and the joint top layers run) and cold (the passages read inside the call). ``--dev N``
adds the reader's dev rows (``training/reader.py``'s: the share of items whose top start, over all
passages and "no answer", is right) for each form. ``--forms`` picks them: ``float32``, ``serving``,
``bfloat16`` (whatever this CPU does with it), and, for comparison only (the reader does not serve this way), ``int8`` / ``int8_channel``: MiniLM's
transformer layers with dynamically quantized int8 weights, per tensor / per output channel
(``torch.ao.quantization.quantize_dynamic``). Writes benchmarks/results/<device>/reader_cost.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diekae_rag import DiekaeModel
from diekae_rag.answer_reader import AnswerStartReader, serving_dtype
from diekae_rag.atomic import atomic_write_text
from bench import bench_passages, hardware, median_time
from diekae_rag.model import SHIPPED_WEIGHTS


def quantize_int8(reader: AnswerStartReader, per_channel: bool) -> None:
    """Dynamic int8 quantization of every linear layer in MiniLM's transformer layers (CPU only)."""
    import warnings
    from torch.ao import quantization as q
    with warnings.catch_warnings():  # torch.ao.quantization warns that it moves to torchao
        warnings.simplefilter("ignore")
        spec = {torch.nn.Linear: q.per_channel_dynamic_qconfig if per_channel else q.default_dynamic_qconfig}
        q.quantize_dynamic(reader.bert.encoder, spec, dtype=torch.qint8, inplace=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("readers", nargs="*", help="reader folders (reader.json + reader.safetensors)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20, 50])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dev", type=int, default=0, help="also the reader's dev rows on N items per set")
    ap.add_argument("--forms", nargs="+", default=["float32", "serving"],
                    choices=["float32", "serving", "bfloat16", "int8", "int8_channel"])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained()
    readers = {}
    for folder in args.readers or [str(SHIPPED_WEIGHTS)]:
        for form in args.forms:
            reader = AnswerStartReader.from_pretrained(folder, model.device)
            if form.startswith("int8"):
                quantize_int8(reader, per_channel=form == "int8_channel")
            else:
                dtype = serving_dtype(model.device) if form == "serving" else getattr(torch, form)
                form = str(dtype).removeprefix("torch.")
                reader.serve_in(dtype)
            readers.setdefault((folder, form), reader)
    rows = []
    with torch.inference_mode():
        for k in args.ks:
            q, passages = bench_passages(model, k)
            for (name, form), reader in readers.items():
                def read(cold: bool) -> None:
                    reader.clear(passages=cold)  # a new question every time; cold: new passages too
                    reader.char_log_probs(q, passages)
                read(False)  # the passages' sides are now kept (as at index time)
                row = {"k": k, "reader": name, "dtype": form, "separate_layers": reader.separate,
                       "ms": median_time(lambda: read(False), args.repeats, model.device) * 1000}
                if reader.separate:
                    row["cold_ms"] = median_time(lambda: read(True), args.repeats, model.device) * 1000
                rows.append(row)
                print(json.dumps(row), flush=True)
    dev = []
    if args.dev:
        from diekae_rag.training.reader import dev_row, dev_sets
        sets = dev_sets(args.dev)
        for (name, form), reader in readers.items():
            dev.append({"reader": name, "dtype": form, **dev_row(reader, sets)})
            print(json.dumps(dev[-1]), flush=True)
    out = Path(args.out) / model.device.type / "reader_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"hardware": hardware(model.device), "repeats": args.repeats, "rows": rows,
                                       "dev_n": args.dev, "dev": dev}, indent=2))


if __name__ == "__main__":
    main()
