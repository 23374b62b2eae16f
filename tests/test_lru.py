"""One least-recently-used store behind every per-passage and per-question cache."""

from __future__ import annotations

import numpy as np

from conftest import tiny_model
from diekae_rag.lru import LRU
from diekae_rag.passage_cache import PassageCache
from diekae_rag.copy import PassagePrior
from diekae_rag.indexing import precompute


class CountingEmbedder:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode(self, texts):
        self.seen += list(texts)
        return np.eye(8, dtype=np.float32)[[len(t) % 8 for t in texts]]


def test_lru_keeps_the_most_recently_used():
    lru = LRU(2)
    lru.put_many([("a", 1), ("b", 2)])
    assert lru.get_many(["a"]) == {"a": 1}       # "a" is now the most recent
    lru.put_many([("c", 3)])                     # so "b" goes
    assert lru.get_many(["a", "b", "c"]) == {"a": 1, "c": 3} and len(lru) == 2
    assert lru.get_or_make("b", lambda: 4) == 4 and lru.get_many(["a"]) == {}


def test_passage_prior_and_passage_cache_share_the_lru():
    prior = PassagePrior(embedder=CountingEmbedder(), max_cached=2)
    assert isinstance(prior._vectors, LRU)
    prior.passage_vectors(["one", "three"])
    prior.passage_vectors(["one", "sixsix"])     # "one" kept, "three" dropped
    prior.passage_vectors(["one", "three"])
    assert prior.embedder.seen == ["one", "three", "sixsix", "three"]

    model = tiny_model("llama", pointer_layer=3, passage_isolation=True)
    cache = PassageCache(max_segments=2)
    assert isinstance(cache._kept, LRU)
    model.knowledge.passage_cache = cache
    precompute(model, ["alpha beta", "gamma delta", "epsilon"])
    assert len(cache) == 2 and cache.misses == 4  # the prefix segment and three passages, two kept
    hits = cache.hits
    precompute(model, ["epsilon"])
    assert cache.hits == hits + 1                 # "epsilon" was kept; the prefix, used first, was not
