# DIEKAE_RAG_DATA=../shared/data/squad_shifts python research/reader_top_recall.py
"""Dev: whole-article retrieval over SQuAD-Shifts dev questions (the reader's squad_train_k1 dev
items): the gold paragraph's rank by MiniLM cosine among the retrieved top-k, and how many passages
reader_margin=0.3 reads."""
import numpy as np
from sentence_transformers import SentenceTransformer
from diekae_rag.data.squad import TRAIN_FILES, load_squad_items
from diekae_rag.training.reader import dev_sets
from diekae_rag.defaults import default_embedder_path
facts = load_squad_items(TRAIN_FILES, max_passage_chars=None)
article = {}
for f in facts:
    article.setdefault(f.subject, [])
    if f.passage not in article[f.subject]:
        article[f.subject].append(f.passage)
of = {f.passage: f.subject for f in facts}
dev = dev_sets(200)["squad_train_k1"]
emb = SentenceTransformer(str(default_embedder_path()), device="cpu")
golds = [next(p for p in ex.passages if ex.answer in p) for ex in dev]
need = sorted({p for g in golds for p in article[of[g]]})
pv = dict(zip(need, emb.encode(need, normalize_embeddings=True, batch_size=64)))
qv = emb.encode([ex.question for ex in dev], normalize_embeddings=True)
print(len(need), "paragraphs")
for k in (5, 10, 20):
    ranks, nears, inr = [], [], []
    for ex, gold, q in zip(dev, golds, qv):
        pool = article[of[gold]]
        if len(pool) < k: continue
        cos = np.stack([pv[p] for p in pool]) @ q
        order = np.argsort(-cos)[:k]
        top = [pool[i] for i in order]
        c = cos[order]
        near = [i for i in range(k) if c[i] >= c[0] - 0.3]
        r = top.index(gold) if gold in top else None
        ranks.append(r); nears.append(len(near)); inr.append(r is not None and r in near)
    n = len(ranks)
    rec = {m: sum(r is not None and r < m for r in ranks) / n for m in (1, 2, 3, 5, 10, 20) if m <= k}
    print(f"k={k} n={n} recall@m {rec} near-set read mean {np.mean(nears):.2f}, gold in near {np.mean(inr):.2f}")
