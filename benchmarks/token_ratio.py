"""How many decoder tokens a LlamaIndex token is worth on prose (what DiekaeLLM's context window assumes).

    python benchmarks/token_ratio.py

Counts each passage of 200+ characters in examples/docs and the first 150 paragraphs of each
SQuAD-Shifts file with LlamaIndex's tokenizer (tiktoken cl100k_base) and with the decoder's, and
prints the median, 95th and 99th percentile and maximum of the ratio. Writes
benchmarks/results/token_ratio.json.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from llama_index.core import Settings
from transformers import AutoTokenizer

from diekae_rag.atomic import atomic_write_text
from diekae_rag.data.squad import default_data_dir
from diekae_rag.defaults import default_decoder_path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    tok = AutoTokenizer.from_pretrained(default_decoder_path())
    texts = [p.read_text() for p in sorted((ROOT / "examples" / "docs").glob("*.md"))]
    for f in sorted(Path(default_data_dir()).glob("*.json")):
        paragraphs = [p["context"] for art in json.loads(f.read_text())["data"] for p in art["paragraphs"]]
        texts += paragraphs[:151]
    r = sorted(len(tok(t)["input_ids"]) / max(1, len(Settings.tokenizer(t))) for t in texts if len(t) > 200)
    out = {"passages": len(r), "median": round(statistics.median(r), 3), "p95": round(r[int(0.95 * len(r))], 3),
           "p99": round(r[int(0.99 * len(r))], 3), "max": round(r[-1], 3)}
    print(json.dumps(out))
    atomic_write_text(Path(__file__).parent / "results" / "token_ratio.json", json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
