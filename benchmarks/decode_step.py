"""Decode-step cost of per-step injection against the bare decoder, robust to a noisy machine.

    python benchmarks/decode_step.py [--ks 5 10] [--pairs 8] [--out benchmarks/results] \
        [--variant pointer_continue_bonus=0] [--profile]

For each k, `none` and `diekae` (passages precomputed) alternate; each sample is
(time for 34 new tokens − time for 2) / 32, and the medians over the pairs are compared; each round
also times one new token (time to first token, passages precomputed, the reader reading the question).
The encoders' own decode step (one token through the trunk against the cached passages, then the copy
readout) is timed alone; ``--profile`` writes the operator table of one generation.
With ``--variant FIELD=JSON ...``, a third mode, `diekae` with those serving-time settings, takes
its turn in the same rounds (so the cost of one setting is read without the machine's drift), and
the encoders' own decode step is timed alone under both settings (200 turns each).
With ``--compiled [MODE]``, `none_compiled` and `diekae_compiled` (``DiekaeModel.compile_decode``:
torch.compile and a static cache for the decode steps) take their turns too, after one untimed
call each that compiles the graphs, and each compiled token sequence is checked against the eager one.
Writes <out>/<device>/decode_step.json.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from bench import bench_passages, hardware, timed
from diekae_rag.config import parse_settings
from diekae_rag.indexing import precompute


def encoder_step_ms(model: DiekaeModel, q: str, passages: list[str], settings: dict[str, dict], repeats: int = 200
                    ) -> dict[str, float]:
    """Median time (ms) of the encoders' own decode step (one token through the trunk against the cached
    passages, then the copy readout) under each of ``settings`` ({label: {copy field: value}}), timed in
    turns: this part of a decode step is small enough to read without the decoder's noise."""
    prompts, knowledge = model.prepare([q], [passages], "diekae")
    ids = torch.tensor([[model.prompter.ids(" the")[0]]], device=model.device)
    ones = torch.ones_like(ids, dtype=torch.bool)
    times: dict[str, list[float]] = {label: [] for label in settings}
    prefills = {}
    for label, values in settings.items():
        copy = model.copy.replace(**values)
        with torch.inference_mode():
            prefills[label] = model.knowledge.encode(model.encoder, prompts, knowledge, copy=copy,
                                                     providers=model.knowledge.providers(copy))

    def step(label: str) -> None:
        out = model.encoder(ids, ones, cache=prefills[label].out.cache, use_cache=True)
        prefills[label].readout(out.states, ids)
    for _ in range(repeats):
        for label in settings:
            with torch.inference_mode():
                times[label].append(timed(lambda: step(label), model.device))
    return {label: statistics.median(v) * 1000 for label, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--variant", nargs="*", default=[], help="FIELD=JSON copy settings (CopyConfig) to time against the shipped ones")
    ap.add_argument("--profile", action="store_true",
                    help="also write <out>/<device>/decode_profile_k<k>.txt: torch.profiler's operator table of one "
                         "34-token diekae generation")
    ap.add_argument("--compiled", nargs="?", const="auto", default=None, metavar="MODE",
                    help="also time compiled decode steps (torch.compile mode; default: reduce-overhead on CUDA, "
                         "default on the CPU)")
    args = ap.parse_args()
    try:
        variant = parse_settings(args.variant)
    except ValueError as exc:
        ap.error(f"--variant {exc}")
    model = DiekaeModel.from_pretrained()
    compiled = None
    if args.compiled:
        compiled = model.compile_decode(None if args.compiled == "auto" else args.compiled).decode_compile
        model.compile_decode(backend=None)
    shipped = {name: getattr(model.copy, name) for name in variant}
    rows = []
    out = Path(args.out) / model.device.type
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for k in args.ks:
            q, passages = bench_passages(model, k)
            precompute(model, passages)

            def answer(mode: str, n: int) -> str:
                if mode != "none" and model.answer_reader is not None:
                    model.answer_reader.clear()  # each call reads the question anew, as a new question would
                model.decode_compile = compiled if mode.endswith("_compiled") else None
                base = mode.removesuffix("_compiled")
                return model.generate(q, passages, mode="diekae" if base == "variant" else base,
                                      max_new_tokens=n, min_new_tokens=n, copy=variant if base == "variant" else None)

            def seconds(mode: str, n: int) -> float:
                return timed(lambda: answer(mode, n), model.device)

            samples: dict[str, list[float]] = {"none": [], "diekae": [], **({"variant": []} if variant else {})}
            if compiled is not None:
                samples.update(none_compiled=[], diekae_compiled=[])
            same, warm_up_s = {}, {}
            for mode in samples:
                warm_up_s[mode] = seconds(mode, 4)  # warm-up (and, for a compiled mode, compiling)
                if mode.endswith("_compiled"):
                    same[mode] = answer(mode, 34) == answer(mode.removesuffix("_compiled"), 34)
            first: dict[str, list[float]] = {mode: [] for mode in samples}  # time to first token
            for _ in range(args.pairs):
                for mode in samples:
                    first[mode].append(seconds(mode, 1))
                    samples[mode].append((seconds(mode, 34) - seconds(mode, 2)) / 32)
            none, diekae = statistics.median(samples["none"]), statistics.median(samples["diekae"])
            row = {"k": k, "none_step_ms": none * 1000, "diekae_step_ms": diekae * 1000,
                   "ratio": diekae / none, "samples": samples,
                   "ttft_ms": {mode: statistics.median(v) * 1000 for mode, v in first.items()}}
            line = (f"k={k}: decode step none {none * 1000:.1f} ms, diekae {diekae * 1000:.1f} ms, ratio {diekae / none:.2f}"
                    f"; TTFT (ms) " + ", ".join(f"{m} {t:.0f}" for m, t in row["ttft_ms"].items()))
            if compiled is not None:
                cn, cd = statistics.median(samples["none_compiled"]), statistics.median(samples["diekae_compiled"])
                row["compiled"] = {"mode": compiled.mode, "none_step_ms": cn * 1000, "diekae_step_ms": cd * 1000,
                                   "ratio": cd / cn, "none_vs_eager": cn / none, "same_answers_as_eager": same,
                                   "first_call_s": {m: warm_up_s[m] for m in same}}
                line += (f"; compiled ({compiled.mode}): none {cn * 1000:.1f} ms, diekae {cd * 1000:.1f} ms, ratio "
                         f"{cd / cn:.2f}, same answers as eager {same}")
            row["encoder_step_ms"] = encoder_step_ms(model, q, passages, {"diekae": {}})["diekae"]
            line += f"; the encoders' own step {row['encoder_step_ms']:.2f} ms"
            if args.profile:
                from torch.profiler import ProfilerActivity, profile
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
                with profile(activities=acts) as prof:
                    seconds("diekae", 34)
                atomic_write_text(out / f"decode_profile_k{k}.txt",
                                  prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            if variant:
                v = statistics.median(samples["variant"])
                enc = encoder_step_ms(model, q, passages, {"diekae": shipped, "variant": variant})
                row.update({"variant": variant, "variant_step_ms": v * 1000, "variant_ratio": v / none,
                            "encoder_step_ms": enc})
                line += (f"; with {variant}: {v * 1000:.1f} ms, ratio {v / none:.2f}; the encoders' own step "
                         f"{enc['diekae']:.2f} ms, with the variant {enc['variant']:.2f} ms")
            rows.append(row)
            print(line, flush=True)
            # written after every k, so a run cut short keeps the rows it finished
            atomic_write_text(out / "decode_step.json", json.dumps({"hardware": hardware(model.device),
                                                                    "pairs": args.pairs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
