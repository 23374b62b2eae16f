"""Per-step injection: cached decode rows equal a full re-encode; isolated passages' cached states."""

from __future__ import annotations

import pytest
import torch
from conftest import _per_step_model, assert_decode_rows_equal_reencode, in_threads, K, N_NEW, Q

from diekae_rag.indexing import precompute


@pytest.mark.parametrize("pointer,isolation,match,bigram",
                         [(False, False, False, False), (True, False, False, False), (True, True, False, False),
                          (True, False, True, False), (True, True, True, False), (True, False, True, True),
                          (True, True, True, True)])
def test_decode_step_rows_equal_full_reencode(pointer, isolation, match, bigram):
    extra = {}
    if bigram:  # the bigram match reads the previous token from the cache
        extra = {"bigram_bonus": 3.0}
    model = _per_step_model(pointer, isolation, match, **extra)
    model.knowledge.passage_cache.max_segments = 0  # recompute everything: the check is on the maths
    assert_decode_rows_equal_reencode(model)


@pytest.mark.parametrize("isolation", [False, True])
def test_per_step_streaming_and_threads_match_generate(isolation):
    model = _per_step_model(isolation=isolation)
    want = [model.generate(q, k, max_new_tokens=N_NEW) for q, k in zip(Q, K)]
    assert "".join(model.stream(Q[0], K[0], max_new_tokens=N_NEW)).strip() == want[0]
    assert in_threads(lambda i: model.generate(Q[i], K[i], max_new_tokens=N_NEW), 2) == want
    assert model.generate_batch(Q, K, max_new_tokens=N_NEW) == want


def test_match_classes_join_word_start_pieces():
    from diekae_rag.prompts import match_classes

    class Vocab:
        def get_vocab(self):
            return {"a": 0, "Ġa": 1, "▁b": 2, "b": 3, "Ġc": 4}

        def __len__(self):
            return 5

    assert match_classes(Vocab()).tolist() == [0, 0, 3, 3, 4]


def test_isolated_passages_are_cached_and_exact():
    model = _per_step_model(isolation=True)
    model.knowledge.passage_cache.max_segments = 0
    cold = model.generate_batch(Q, K, max_new_tokens=N_NEW)
    cold_score = model.score(Q[1], "north", K[1])
    model.knowledge.passage_cache.max_segments = 64
    assert precompute(model, [p for ps in K for p in ps]) == 3
    misses = model.knowledge.passage_cache.misses
    assert model.generate_batch(Q, K, max_new_tokens=N_NEW) == cold
    assert model.score(Q[1], "north", K[1]) == pytest.approx(cold_score, abs=1e-5)
    assert model.knowledge.passage_cache.misses == misses, "every passage came from the cache"
    assert model.knowledge.passage_cache.hits > 0
    # Segments keep their own positions, so the passages act as a set: order does not matter.
    assert model.score(Q[1], "north", list(reversed(K[1]))) == pytest.approx(cold_score, abs=1e-5)
    assert model.score(Q[1], "north", K[1][:1]) != pytest.approx(cold_score, abs=1e-4)
    with pytest.raises(ValueError, match="passage_isolation"):
        precompute(_per_step_model(), ["x"])


def test_append_kv_equals_cat_and_extends_in_place():
    from diekae_rag.encoder import append_kv
    past = torch.randn(3, 2, 4, 5, 8)
    steps = [torch.randn(3, 2, 4, 1, 8) for _ in range(4)]
    got, want = past, past
    for i, new in enumerate(steps):
        before = got
        got, want = append_kv(got, new), torch.cat([want, new], 3)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        if i > 0:
            assert got.data_ptr() == before.data_ptr(), "a decode step writes into the spare room"
    assert past.shape[3] == 5 and torch.equal(want[:, :, :, :5], past), "the first past is never written"
    leaf = torch.randn(3, 2, 4, 5, 8, requires_grad=True)
    append_kv(leaf, steps[0]).sum().backward()
    assert leaf.grad is not None and torch.equal(leaf.grad, torch.ones_like(leaf))


def test_assembled_past_equals_cat_pad_stack_and_takes_the_tail_in_place():
    """Segment states are copied once into a left-padded buffer with room to spare: the same values
    as concatenating, padding and stacking them, and the tail's keys then go into that room."""
    from diekae_rag.encoder import append_kv
    from diekae_rag.passage_cache import SegmentState, assemble

    def seg(L):
        kv = tuple((torch.randn(3, 2, L, 4), torch.randn(3, 2, L, 4)) for _ in range(2))
        return SegmentState(torch.randint(0, 50, (L,)), kv, torch.randn(2, L, 6), torch.rand(L) > 0.5)
    items = [[seg(2), seg(5)], [seg(3)]]
    past = assemble(items, room=10)
    for blk in range(2):
        for i in (0, 1):
            want = [torch.cat([s.kv[blk][i] for s in segs], 2) for segs in items]
            want = torch.stack([torch.nn.functional.pad(w, [0, 0, 7 - w.shape[2], 0]) for w in want], 1)
            assert torch.equal(past.cache.kv[blk][i], want)
    assert past.keys.shape == (2, 2, 7, 6) and torch.equal(past.keys[1, :, :4], torch.zeros(2, 4, 6))
    assert past.cache.key_valid.tolist() == [[True] * 7, [False] * 4 + [True] * 3]
    assert torch.equal(past.ids[1, 4:], items[1][0].ids) and not past.knowledge[1, :4].any()
    half = [[SegmentState(s.ids, tuple((a.half(), b.half()) for a, b in s.kv), s.pointer_keys.half(), s.knowledge)
             for s in segs] for segs in items]
    cast = assemble(half, room=10, dtype=torch.float32)  # states kept as a float16 store holds them
    assert cast.cache.kv[1][1].dtype == cast.keys.dtype == torch.float32
    assert torch.equal(cast.cache.kv[1][1], assemble(half, room=10).cache.kv[1][1].float())
    k = past.cache.kv[0][0]
    tail = torch.randn(3, 2, 2, 3, 4)
    assert append_kv(k, tail).data_ptr() == k.data_ptr(), "the tail is written into the spare room"
    grad = [[SegmentState(s.ids, tuple((a.requires_grad_(), b) for a, b in s.kv), s.pointer_keys, s.knowledge)
             for s in segs] for segs in items]
    assemble(grad, room=10).cache.kv[0][0].sum().backward()  # training still back-propagates through it
    assert torch.equal(items[0][0].kv[0][0].grad, torch.ones(3, 2, 2, 4))


def test_bfloat16_encoders_read_the_question_while_the_passages_states_stay_float32():
    """``encoder_dtype``: a bfloat16 copy of the encoders reads the question and takes the decode steps
    (its decode-step rows agree with a re-encode to bfloat16's precision); the passages' states are the
    float32 encoders' own, and a change to the weights makes a new copy."""
    model = _per_step_model(isolation=True, match=True)
    model.knowledge.encoder_dtype = torch.bfloat16
    assert_decode_rows_equal_reencode(model, rel=0.05)  # bfloat16 keeps about 3 significant digits
    with torch.no_grad():
        served = model.knowledge.served(model.encoder)
        assert served.dtype == torch.bfloat16 and served is not model.encoder
        assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(model.encoder.parameters(), served.parameters()))
        kept = list(model.knowledge.passage_cache._kept._data.values())
        assert kept and all(k.dtype == v.dtype == torch.float32 for s in kept for k, v in s.kv)
        next(model.encoder.parameters()).add_(1.0)
        assert model.knowledge.served(model.encoder) is not served, "new weights, a new copy"
    assert model.knowledge.served(model.encoder) is model.encoder, "with gradients on, the float32 encoders"
