"""Where DIEKÆ's first token goes over real retrieval: a cProfile of ``--calls`` new questions over
the top-k chunks of the four articles of ``benchmarks/articles.py`` (states read from the store, the
memory caches cleared before each call, retrieval and its question vector made before, untimed),
then the parts of a call timed on their own over the same questions (medians, in turns): the decoder's
forward over the prompt without and with the call's injection active (what the hooks add to the
prefill), the copy gate (the answer-start reader's reading) and the encoders' session (encoders over
the question, states read from the store, copy memory and readout), with a ``torch.profiler`` table of
the session op by op.

    python research/articles_profile.py [--checkpoint DIR] [--k 5] [--states-dtype int4] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from articles import forget_kept, load_articles, questions_for  # noqa: E402

from diekae_rag import DiekaeModel  # noqa: E402
from diekae_rag.atomic import atomic_write_text  # noqa: E402
from diekae_rag.indexing import warm_up  # noqa: E402
from diekae_rag.injection import injecting  # noqa: E402
from diekae_rag.knowledge import call_gate  # noqa: E402
from diekae_rag.retrievers import open_or_build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--states-dtype", default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/articles_profile.txt"))
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained(args.checkpoint)
    articles = load_articles()
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        for a in articles:
            (docs / f"{a['title']}.txt").write_text("\n\n".join(p["context"] for p in a["paragraphs"]), encoding="utf-8")
        store = open_or_build(docs, Path(tmp) / "store", model=model, progress=False, states_dtype=args.states_dtype)
        warm_up(model)
        prof, times = cProfile.Profile(), []
        for q in questions_for([args.k], args.calls, articles)[str(args.k)][1:]:
            store.embedder.forget_queries()
            passages = [p.text for p in store.search(q, args.k)]  # embeds the question, as retrieval does
            forget_kept(model)
            t = time.perf_counter()
            prof.enable()
            with torch.inference_mode():
                model.generate(q, passages, max_new_tokens=1)
            prof.disable()
            times.append(time.perf_counter() - t)
        parts_text = parts(model, store, questions_for([args.k], args.calls, articles)[str(args.k)], args.k)
    text = io.StringIO()
    text.write(f"checkpoint {args.checkpoint or 'shipped'}, k={args.k}, states {model.knowledge.state_store.dtype}, "
               f"{args.calls} calls: median {statistics.median(times) * 1000:.0f} ms to the first token\n\n")
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(r"diekae_rag|modeling_llama.py:427|_prefill", 40)
    text.write(parts_text)
    atomic_write_text(args.out, text.getvalue())
    print(text.getvalue())


def parts(model: DiekaeModel, store, questions: list[str], k: int) -> str:
    """The parts of a call on their own (see the module docstring): medians over ``questions`` in
    turns, and the session's operator table."""
    from torch.profiler import ProfilerActivity, profile

    times: dict[str, list[float]] = {"decoder forward": [], "decoder forward, injection active": [],
                                     "copy gate (the reader)": [], "encoders' session": []}

    def timed(label: str, fn):
        t = time.perf_counter()
        out = fn()
        if i:  # the first question warms up
            times[label].append(time.perf_counter() - t)
        return out

    with torch.inference_mode():
        for i, q in enumerate(questions):
            passages = [p.text for p in store.search(q, k)]
            prompts, held = model.prepare([q], [passages], "diekae")
            ids, mask = model.prompter.pad(prompts, model.device, side="left")
            forget_kept(model)
            gate, _ = timed("copy gate (the reader)", lambda: call_gate(model.knowledge, prompts, held, "diekae", model.copy))
            inj = timed("encoders' session", lambda: model.build_injection(prompts, held, mask, copy=model.copy, gate=gate))
            if inj is None:  # the gate closed: no injection to time against
                continue

            def injected():
                inj.forwards = 0  # a prefill again
                with injecting(inj):
                    return model.decoder(input_ids=ids, attention_mask=mask)
            forwards = [("decoder forward", lambda: model.decoder(input_ids=ids, attention_mask=mask)),
                        ("decoder forward, injection active", injected)]
            for label, fn in forwards[::1 if i % 2 else -1]:  # the two take turns going first
                timed(label, fn)
        forget_kept(model, reader=False)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                model.knowledge.passage_cache.clear()
                model.build_injection(prompts, held, mask, copy=model.copy, gate=[1.0])
    text = f"\nparts of a call on their own, medians over {len(questions) - 1} questions (the forwards where the gate " \
           "let the passages through; the decoder's forward computes logits at every prompt position):\n"
    text += "".join(f"  {label}: {statistics.median(v) * 1000:.1f} ms (n={len(v)})\n" for label, v in times.items())
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return text + f"\ntorch.profiler, the encoders' session of the last question, 5 calls (totals over them):\n{table}\n"


if __name__ == "__main__":
    main()
