"""Print markdown tables from result JSON files (eval, bench, edits), for README / docs/results.md.

    python benchmarks/report.py readme        # the README's quality and cost tables (make figures runs what they need)
    python benchmarks/report.py eval runs/eval/results.json [...]
    python benchmarks/report.py bench benchmarks/results/cpu/bench.json
    python benchmarks/report.py edits benchmarks/results/edits/edit_results.json
"""
import json
import sys


def _f(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def eval_table(paths):
    print("| checkpoint | set | none pref / acc | in-context pref / acc / len | DIEKÆ pref / acc / len "
          "| DIEKÆ NLL (none / ctx) | recovered pref / acc |")
    print("|---|---|---|---|---|---|---|")
    for p in paths:
        r = json.load(open(p))
        for key, row in r["summary"].items():
            n, c, d, rec = row["none"], row["in_context"], row["diekae"], row["recovered"]
            print(f"| {r['checkpoint']} | {key} | {_f(n['pref'])} / {_f(n['acc'])} | {_f(c['pref'])} / {_f(c['acc'])} / "
                  f"{_f(c['len'], 1)} | {_f(d['pref'])} / {_f(d['acc'])} / {_f(d['len'], 1)} | {_f(d['nll'])} "
                  f"({_f(n['nll'])} / {_f(c['nll'])}) | {_f(rec['pref'])} / {_f(rec['acc'])} |")


def bench_table(path):
    r = json.load(open(path))
    print(f"Hardware: {r['hardware']}, decoder dtype {r['dtype']}, torch {r['torch']}.\n")
    print("| k | mode | decoder tokens | time to first token | 32 tokens | decode step | peak extra memory |")
    print("|---|---|---|---|---|---|---|")
    for x in r.get("latency", []):
        print(f"| {x['k']} | {x['mode']} | {x['decoder_tokens']} | {x['ttft_s'] * 1000:.0f} ms | {x['total_s']:.2f} s | "
              f"{x['decode_step_s'] * 1000:.1f} ms | {x['peak_mem_mb']:.0f} MB |")
    if "ratios" in r:
        print("\n| k | TTFT diekae/in_context | TTFT diekae/none | TTFT cold/in_context | TTFT cold/none "
              "| 32-token latency diekae/in_context | decode step diekae/none |")
        print("|---|---|---|---|---|---|---|")
        for k, v in r["ratios"].items():
            print(f"| {k} | {_f(v.get('ttft_s_diekae/in_context'))} | {_f(v.get('ttft_s_diekae/none'))} | "
                  f"{_f(v.get('ttft_s_diekae_cold/in_context'))} | {_f(v.get('ttft_s_diekae_cold/none'))} | "
                  f"{_f(v.get('total_s_diekae/in_context'))} | {_f(v.get('decode_step_s_diekae/none'))} |")
    if "training" in r:
        t = r["training"]
        print(f"\nTraining (batch {t['batch_size']}): phase-1 step with cached Δ {t['phase1_cached_s']:.2f} s vs "
              f"recomputing the teacher {t['phase1_recompute_s']:.2f} s (**{t['phase1_speedup']:.1f}×**); "
              f"phase-2 step {t['phase2_step_s']:.2f} s; peak extra memory phase 1 {t['phase1_peak_mb']:.0f} MB, "
              f"phase 2 {t['phase2_peak_mb']:.0f} MB.")
    if "batch" in r:
        print("\n| batch | mode | answers/s | tokens/s |\n|---|---|---|---|")
        for b in r["batch"]:
            print(f"| {b['batch']} | {b['mode']} | {b['answers_per_s']:.2f} | {b['tokens_per_s']:.1f} |")
    if "retrieval" in r:
        print("\n| chunks | index | build (chunks/s) | top-5 p50 | top-5 p99 |\n|---|---|---|---|---|")
        for x in r["retrieval"]:
            print(f"| {x['chunks']:,} | {x['index']} | {x['build_chunks_per_s']:,.0f} | {x['p50_ms']:.2f} ms | "
                  f"{x['p99_ms']:.2f} ms |")
    if "load" in r:
        ld = r["load"]
        split = (f" (importing torch/transformers/diekae_rag {ld['import_s_median']:.1f} s, "
                 f"`from_pretrained()` {ld['from_pretrained_s_median']:.2f} s)") if "import_s_median" in ld else ""
        print(f"\nFresh-process load of the default model (cache warm): median {ld['load_s_median']:.1f} s{split}.")


def edits_table(path):
    r = json.load(open(path))
    print(f"{r['n_edits']} edits, edit encoder trained {r['steps']} steps ({r['train_minutes']:.1f} min, {r['device']}).\n")
    print("| method | efficacy | paraphrase | neighbourhood |\n|---|---|---|---|")
    for name, row in r["rows"].items():
        print(f"| {name} | {_f(row['efficacy'])} | {_f(row['paraphrase'])} | {_f(row['neighborhood'])} |")


NAMES = {"fictional_seen": "fictional, seen relations", "fictional_unseen": "fictional, unseen relations",
         "squad_dev": "SQuAD v1.1 dev A"}


def readme_quality(paths):
    """One row per eval row: contains-answer accuracy, exact match and F1 for in-context RAG and DIEKÆ."""
    print("| set | k | none acc | in-context acc / EM / F1 / len | **DIEKÆ** acc / EM / F1 / len | gate closes |")
    print("|---|---|---|---|---|---|")
    for path in paths:
        r = json.load(open(path))
        tag = " retrieved" if r.get("distractors") == "retrieved" else ""
        for key, row in r["summary"].items():
            name, k = key.split("@k=")
            n, c, d = row["none"], row["in_context"], row["diekae"]
            print(f"| {NAMES.get(name, name)} | {k}{tag} | {_f(n['acc'])} | {_f(c['acc'])} / {_f(c.get('em'))} / "
                  f"{_f(c.get('f1'))} / {_f(c['len'], 0)} | **{_f(d['acc'])}** / {_f(d.get('em'))} / {_f(d.get('f1'))} / "
                  f"{_f(d['len'], 0)} | {_f(d.get('gated'))} |")


def readme_negatives(path):
    """Passages that do not answer: accuracy, F1 and copy rate per mode (and abstention where on)."""
    r = json.load(open(path))
    print("| set (passages do not answer) | k | none acc / F1 | in-context acc / F1 / copy | **DIEKÆ** acc / F1 / copy "
          "| gate closes |")
    print("|---|---|---|---|---|---|")
    for key, row in r["summary"].items():
        name, k = key.split("@k=")
        n, c, d = row["none"], row["in_context"], row["diekae"]
        print(f"| {name} | {k} | {_f(n['acc'])} / {_f(n['f1'])} | {_f(c['acc'])} / {_f(c['f1'])} / {_f(c['copy'])} | "
              f"**{_f(d['acc'])}** / {_f(d['f1'])} / {_f(d['copy'])} | {_f(d.get('gated'))} |")


def readme_articles(bench_path):
    """Time to the first token over real retrieval (benchmarks/articles.py), one row per k."""
    r = json.load(open(bench_path))
    if "articles" not in r:
        return
    a, st = r["articles"], r["articles"]["store"]
    kept = all("diekae_reader_kept/none" in x for x in a["rows"])
    print(f"| top-k chunks of {st['chunks']} (4 articles) | no knowledge | in-context RAG | **DIEKÆ**, states from the store "
          "| DIEKÆ / none | DIEKÆ / in-context |" + (" without the reader's reading / none |" if kept else ""))
    print("|---|---|---|---|---|---|" + ("---|" if kept else ""))
    for x in a["rows"]:
        print(f"| k={x['k']} | {x['none_ttft_s'] * 1000:.0f} ms | {x['in_context_ttft_s'] * 1000:.0f} ms | "
              f"**{x['diekae_ttft_s'] * 1000:.0f} ms** | {x['diekae/none']:.2f}× | {x['diekae/in_context']:.2f}× |"
              + (f" {x['diekae_reader_kept/none']:.2f}× |" if kept else ""))
    print(f"\nStored states: {st['bytes_per_knowledge_token'] / 1024:.1f} KB a knowledge token ({st['states_dtype']}), "
          f"{st['bytes_per_chunk'] / 2**20:.2f} MB a chunk.\n")


def readme_cost(bench_path, step_path):
    """TTFT and decode step at k=5, one row per configuration."""
    readme_articles(bench_path)
    r, steps = json.load(open(bench_path)), json.load(open(step_path))
    lat = {x["mode"]: x for x in r["latency"] if x["k"] == 5}
    step = next(x for x in steps["rows"] if x["k"] == 5)
    none = lat["none"]["ttft_s"]
    print(f"| k=5, {r['hardware']} | decoder reads | time to first token | decode step |")
    print("|---|---|---|---|")
    rows = [("no knowledge", "none", f"{step['none_step_ms']:.1f} ms"),
            ("in-context RAG", "in_context", f"{lat['in_context']['decode_step_s'] * 1000:.1f} ms"),
            ("DIEKÆ, passages precomputed", "diekae", f"{step['diekae_step_ms']:.1f} ms ({step['ratio']:.2f}× none)"),
            ("DIEKÆ, states read from the store on disk", "diekae_store", "as above"),
            ("DIEKÆ, passages encoded in the call", "diekae_cold", "as above")]
    for label, mode, dec in rows:
        if mode not in lat:
            continue
        x = lat[mode]
        ratio = "" if mode == "none" else (f" ({x['ttft_s'] / lat['in_context']['ttft_s']:.2f}× in-context, "
                                           f"{x['ttft_s'] / none:.2f}× none)" if mode != "in_context" else "")
        print(f"| {label} | {x['decoder_tokens']} tokens | {x['ttft_s'] * 1000:.0f} ms{ratio} | {dec} |")
    if "fresh_process" in r:
        f = r["fresh_process"]
        later = f["retrieved_queries_s"]
        print(f"\nA new process that opens a stored index ({f['chunks']} chunks, `benchmarks/run.py`'s `fresh_process`, "
              f"median of {len(f.get('runs', [f]))} processes) loads in {f['load_s']:.1f} s and warms up (`warm_up(model)` from `diekae_rag.indexing`: "
              f"one call over 5 chunk-sized passages) in {f['warm_up_s']:.1f} s. Its first query, the table's question and "
              f"passages read from the store, takes {f['first_query_s'] * 1000:.0f} ms to the first token "
              f"({f['first_query_s'] / lat['in_context']['ttft_s']:.2f}× in-context; asked again in that process, "
              f"{f['second_query_s'] * 1000:.0f} ms), and questions over the chunks it retrieves take "
              f"{min(later) * 1000:.0f}–{max(later) * 1000:.0f} ms, retrieval included.")


def readme_tables():
    readme_quality(["runs/eval_shipped/results.json", "runs/eval_shipped_retrieved/results.json"])
    print()
    readme_negatives("runs/eval_negatives/results.json")
    print()
    readme_cost("benchmarks/results/ksweep/cpu/bench.json", "benchmarks/results/cpu/decode_step.json")


if __name__ == "__main__":
    kind, paths = sys.argv[1], sys.argv[2:]
    {"eval": lambda: eval_table(paths), "bench": lambda: bench_table(paths[0]),
     "edits": lambda: edits_table(paths[0]), "readme": readme_tables}[kind]()
