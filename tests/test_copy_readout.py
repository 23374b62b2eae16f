"""The copy readout: the pointer, the token and bigram match, the first-position gain, the passage
prior, answer pieces, whitened values and continuation (tiny random decoders)."""

from __future__ import annotations

import pytest
import torch
from conftest import _assert_only_first_rows_differ, _first_position_rows, _per_step_model, assert_decode_rows_equal_reencode, K, Q, tiny_model

from diekae_rag.copy import KnowledgeLayout
from diekae_rag.copy.pieces import Piece, first_piece_ids


def _pointer_at_answer(model, question: str, answer: str, passage: str) -> tuple[torch.Tensor, list[int]]:
    """The copy rows (T, H) of a teacher-forced call, and the encoder input ids they cover."""
    prompts, passages = model.prepare([question], [[passage]], "diekae")
    with torch.no_grad():
        out = model.knowledge.encode(model.encoder, prompts, passages, [model.prompter.answer_ids(answer)],
                                     model.copy, model.knowledge.providers(model.copy))
    return out.pointer[0], out.ids[0].tolist()


def _match_only_model(isolation: bool, **cfg):
    """Learned pointer scores and the "nothing" slot at zero, a large token-match weight: the pointer
    follows the match prior alone."""
    model = _per_step_model(isolation=isolation, match=True, **cfg)
    enc = model.encoder
    with torch.no_grad():
        enc.copy_head.q.weight.zero_()
        enc.copy_head.null.fill_(0.0)
        enc.copy_head.match_weight.fill_(50.0 / enc.config.pointer_match_scale)
    return model


class _KeywordEmbedder:
    """A stand-in sentence embedder: texts naming "rain" point one way, all others another."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def encode(self, texts):
        import numpy as np
        self.texts += list(texts)
        v = np.array([[1.0, 0.0] if "rain" in t.lower() else [0.6, 0.8] for t in texts], dtype=np.float32)
        return v


def test_pointer_raises_the_logit_of_a_knowledge_token():
    """With a large gain and a sharp query, the copy rows are a mix of knowledge tokens' lm_head rows."""
    model = tiny_model("llama", layers=[], per_step=True, pointer_layer=3, pointer_heads=1)
    enc = model.encoder
    with torch.no_grad():
        enc.copy_head.gain.fill_(0.01)
    prompts, passages = model.prepare([Q[0]], [K[0]], "diekae")
    with torch.no_grad():
        out = model.knowledge.encode(enc, prompts, passages, copy=model.copy)
    # The output is a convex mix (times the gain) of lm_head rows of knowledge tokens only.
    lm = model.decoder.get_output_embeddings().weight
    memory = out.readout.memory
    basis = lm[memory.ids[0][memory.valid[0]].unique()]  # (n_k, H)
    last = out.pointer[0, -1] / (0.01 * model.copy.gain_scale)
    coef = torch.linalg.lstsq(basis.T, last[:, None]).solution
    torch.testing.assert_close(basis.T @ coef, last[:, None], atol=1e-4, rtol=1e-3)
    assert 0 <= float(coef.sum()) <= 1 + 1e-4


@pytest.mark.parametrize("isolation", [False, True])
def test_token_match_copies_the_token_after_the_query_token(isolation):
    """With learned pointer scores at zero and a large match weight, a query token that occurs once in
    the passage makes the pointer output the lm_head row of the passage token right after it."""
    model = _match_only_model(isolation)
    enc = model.encoder
    passage = "zq kx"
    ids = model.prompter.ids(passage)
    z = model.prompter.ids("z")[0]
    assert ids.count(z) == 1
    after_z = ids[ids.index(z) + 1]
    pointer, inputs = _pointer_at_answer(model, "which?", "z", passage)  # the answer "z" follows the prompt
    at = len(inputs) - 1 - inputs[::-1].index(z)  # the answer's "z"
    lm = model.decoder.get_output_embeddings().weight
    gain = float(enc.copy_head.gain.detach().sum()) * model.copy.gain_scale
    torch.testing.assert_close(pointer[at], gain * lm[after_z], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("isolation", [False, True])
def test_bigram_match_keeps_the_copy_in_place_where_a_token_repeats(isolation):
    """"z" occurs twice in the passage; after the answer "wz" the unigram match splits the pointer between
    the tokens after both, the bigram bonus picks the one after "w z"."""
    outs = {}
    for bonus in (0.0, 50.0):
        model = _match_only_model(isolation, bigram_bonus=bonus)
        enc = model.encoder
        passage = "qzk wzm"
        ids = model.prompter.ids(passage)
        z = model.prompter.ids("z")[0]
        assert ids.count(z) == 2
        lm_tokens = {"k": ids[ids.index(z) + 1], "m": ids[len(ids) - 1 - ids[::-1].index(z) + 1]}
        pointer, inputs = _pointer_at_answer(model, "which?", "wz", passage)
        at = len(inputs) - 1 - inputs[::-1].index(z)  # the answer's "z"
        lm = model.decoder.get_output_embeddings().weight
        gain = float(enc.copy_head.gain.detach().sum()) * model.copy.gain_scale
        outs[bonus] = (pointer[at], gain, lm)
        if bonus:  # KV-cached decode steps read the previous token from the cache: "w", then "z"
            prompts, passages = model.prepare(["which?"], [[passage]], "diekae")
            _, mask = model.prompter.pad(prompts, model.device, side="left")
            with torch.no_grad():
                session = model.build_injection(prompts, passages, mask).sessions[0]
                for tok in model.prompter.answer_ids("wz"):
                    rows = session.step(torch.tensor([[tok]]))
            torch.testing.assert_close(rows[model.config.pointer_layer][0, 0], pointer[at], atol=1e-3, rtol=1e-3)
    p0, gain, lm = outs[0.0]
    torch.testing.assert_close(p0, gain * 0.5 * (lm[lm_tokens["k"]] + lm[lm_tokens["m"]]), atol=1e-3, rtol=1e-3)
    p1, gain, lm = outs[50.0]
    torch.testing.assert_close(p1, gain * lm[lm_tokens["m"]], atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="bigram_bonus needs the token match"):
        _per_step_model(bigram_bonus=3.0)


@pytest.mark.parametrize("isolation", [False, True])
def test_pointer_first_gain_scales_only_the_row_that_predicts_the_first_answer_token(isolation):
    """Left-padded prompts (generation) and right-padded prompt + answer (teacher forcing): the pointer
    row at each item's last prompt token is times the gain, every other row and decode step unchanged."""
    model = _per_step_model(isolation=isolation, match=True)
    runs = {}
    for gain in (1.0, 3.0):
        model.copy = model.copy.replace(first_gain=gain)
        runs[gain], firsts = _first_position_rows(model)
    _assert_only_first_rows_differ(runs[1.0], runs[3.0], firsts,
                                   lambda r1, r3: torch.testing.assert_close(r3, 3.0 * r1))
    with pytest.raises(ValueError, match="first_gain must be a positive number"):
        _per_step_model(first_gain=0.0)


def test_pointer_sharpness_scales_every_pointer_score():
    """Sharpness s equals s-times larger queries and match weight (scores, bonus and "nothing" slot alike)."""
    model = _per_step_model(match=True)
    head = model.encoder.copy_head
    with torch.no_grad():
        head.match_weight.fill_(2.0 / model.config.pointer_match_scale)
        head.null.normal_()
    prompts, passages = model.prepare([Q[0]], [K[0]], "diekae")

    def read(**copy):
        with torch.no_grad():
            return model.knowledge.encode(model.encoder, prompts, passages, copy=model.copy.replace(**copy))

    plain = read().pointer
    sharp = read(sharpness=3.0).pointer
    with torch.no_grad():
        head.q.weight.mul_(3.0)
        head.match_weight.mul_(3.0)
    out = read()
    torch.testing.assert_close(sharp, out.pointer, atol=1e-5, rtol=1e-4)
    attn, valid = out.readout.attention, out.readout.memory.valid
    # (B, heads, T, S); the rest of each row is the "nothing" slot
    assert attn.shape[:3] == (1, 2, out.pointer.shape[1]) and float(attn.sum(-1).max()) <= 1 + 1e-5
    assert float(attn[0, :, :, ~valid[0]].abs().max()) == 0, "only knowledge tokens are read"
    assert not torch.allclose(sharp, plain, atol=1e-3), "sharpness changes the readout"
    with pytest.raises(ValueError, match="sharpness must be a positive number"):
        tiny_model("llama", layers=[], per_step=True, pointer_layer=3, sharpness=0.0)


def test_passage_prior_is_zero_for_the_nearest_passage_and_scaled_cosine_below():
    from diekae_rag.copy import PassagePrior
    embedder = _KeywordEmbedder()
    prior = PassagePrior(embedder=embedder)
    got = prior(["Does it rain?", "Where?", "x"], [["Calgra lies north.", "It rains there."], ["a", "b"], ["one"]], 10.0)
    assert got[0] == pytest.approx([10.0 * (0.6 - 1.0), 0.0])  # cosines 0.6 and 1.0
    assert got[1] == pytest.approx([0.0, 0.0]) and got[2] == [0.0], "ties and single passages get no penalty"
    embedder.texts.clear()
    assert prior(["Is it wet?"], [["a", "It rains there."]], 10.0) == [pytest.approx([0.0, -4.0])]
    assert embedder.texts == ["Is it wet?"], "passage vectors come from the cache; only the question is embedded"
    assert prior(["q"], [["solo"]], 10.0) == [[0.0]] and embedder.texts == ["Is it wet?"], "one passage: no embedding"
    with pytest.raises(ValueError, match="positive"):
        prior(["q"], [["a", "b"]], 0.0)


def test_passage_prior_steers_the_pointer_to_the_nearest_passage():
    """The prior reaches the copy scores (prefill and cached decode steps) and nothing else."""
    from diekae_rag.copy import PassagePrior
    model = _per_step_model(isolation=True)
    q, k = ["Does it rain there?"], [["Calgra lies in the north.", "It rains there."]]
    prompts, passages = model.prepare(q, k, "diekae")
    ids, mask = model.prompter.pad(prompts, model.device, side="left")

    def session(strength):
        with torch.no_grad():
            return model.build_injection(prompts, passages, mask, copy={"passage_prior": strength}).sessions[0]

    model.passage_prior = PassagePrior(embedder=_KeywordEmbedder())
    plain, biased = session(0.0), session(100.0)
    memory = biased.readout.memory
    far = memory.prior[0] < -1
    assert int(far.sum()) == len(model.prompter.ids("Calgra lies in the north.")), "the far passage's tokens only"
    attn = biased.readout.attention[0]
    assert float(attn[..., far].sum()) < 1e-6 < float(attn[..., ~far & memory.valid[0]].sum())
    with torch.no_grad():
        rows = biased.step(ids[:, -1:])
    assert float(biased.readout.attention[0][..., far].sum()) < 1e-6, "decode steps keep the prior"
    assert plain.readout.memory.prior is None
    layer = model.config.pointer_layer
    assert not torch.allclose(plain.layer_rows[layer], biased.layer_rows[layer])
    for l in model.config.layers:  # the per-step rows are not biased (layer 3 is copy-only)
        torch.testing.assert_close(plain.layer_rows[l], biased.layer_rows[l])
    assert set(rows) == set(model.config.hooked_layers)
    with pytest.raises(ValueError, match="passage_prior needs a pointer over isolated passages"):
        tiny_model("llama", layers=[1], per_step=True, pointer_layer=3, passage_prior=30.0)
    with pytest.raises(ValueError, match="would do nothing"):
        _per_step_model().passage_prior = PassagePrior(embedder=_KeywordEmbedder())


def test_pointer_first_unspaced_copies_the_space_less_variant_at_the_first_position_only():
    """Joint layout: with every token's match class set to one token c, the first-position pointer row is
    the attention mass times c's output embedding. Isolated passages: the first row copies, for each passage
    token, the first token of the text from there on without its leading space. Every other row and the
    decode step are unchanged."""
    lm = None
    for isolation in (False, True):
        model = _per_step_model(isolation=isolation, match=True)
        model.knowledge.passage_cache.max_segments = 0
        lm = model.decoder.get_output_embeddings().weight.detach()
        c = 7
        model.knowledge.classes = torch.full((lm.shape[0],), c, dtype=torch.long)
        runs = {}
        for on in (False, True):
            model.copy = model.copy.replace(first_unspaced=on)
            runs[on], firsts = _first_position_rows(model)

        def copies(off, on):
            assert (on - off).abs().max() > 1e-3
            cos = torch.nn.functional.cosine_similarity(on.float(), lm[c].float(), dim=0)
            assert (cos.abs() > 0.999) == (not isolation), "joint: a multiple of c's embedding; isolated: not"
        _assert_only_first_rows_differ(runs[False], runs[True], firsts, copies)
    prompts, passages = model.prepare(Q, K, "diekae")
    items = [model.prompter.isolated_item(p, x) for x, p in zip(prompts, passages)]
    layout = KnowledgeLayout.of([it[0] for it in items], [it[1] for it in items], model.knowledge.passage_tokens.spans,
                                passages, 80)
    pieces = first_piece_ids(model.knowledge.passage_tokens, passages, layout, model.device)[0]
    text = [model.tokenizer.decode([int(i)]) if i >= 0 else "" for i in pieces]
    at = len(text) - len(K[0][0]) + K[0][0].index(" Ithpelith")  # the space before the name
    assert text[at] == "I" and text[at + 1] == "I" and text[at - 1] == "o" and text[0] == ""


def test_answer_pieces_extend_the_pointer_memory_and_decode_steps_still_equal_a_re_encode():
    """With answer pieces the pointer memory gets extra slots (one per later piece of each word whose
    answer-start tokenisation differs), which never change the first copy; decode rows still equal a
    full re-encode of the same sequence."""
    model = _per_step_model(isolation=True, match=True, first_unspaced=True)
    model.knowledge.passage_cache.max_segments = 0
    # A byte tokenizer writes a word the same way everywhere, so it has no answer pieces of its own:
    # give every passage two (piece "x" after "q" keyed on token 1, "z" after "x" keyed on token 2).
    tid = model.tokenizer.convert_tokens_to_ids
    model.knowledge.passage_tokens.word_pieces = lambda text, classes: [Piece(tid("x"), tid("q"), 1, 1, 0, 1), Piece(tid("z"), tid("x"), 2, 2, 0, 2)]
    prompts, passages = model.prepare(Q, K, "diekae")
    sizes, firsts = {}, {}
    for on in (False, True):
        model.copy = model.copy.replace(answer_pieces=on)
        with torch.no_grad():
            out = model.knowledge.encode(model.encoder, prompts, passages, copy=model.copy)
        sizes[on] = out.readout.memory.valid.sum(1)
        firsts[on] = out.pointer[torch.arange(len(Q)), out.first]
    assert (sizes[True] == sizes[False] + torch.tensor([2, 4])).all()  # two slots per passage
    torch.testing.assert_close(firsts[True], firsts[False], atol=1e-4, rtol=1e-3)
    assert_decode_rows_equal_reencode(model)
    with pytest.raises(ValueError, match="answer_pieces needs the token match over isolated passages"):
        _per_step_model(isolation=False, match=True, answer_pieces=True)


def test_answer_pieces_have_a_slot_with_each_key():
    """An answer piece has a slot with the key of the passage token covering it and, where it differs,
    one with the key of the slot after the token where the piece before it ends."""
    model = _per_step_model(isolation=True, match=True, first_unspaced=True, answer_pieces=True)
    model.knowledge.passage_cache.max_segments = 0
    tid = model.tokenizer.convert_tokens_to_ids
    model.knowledge.passage_tokens.word_pieces = lambda text, classes: [Piece(tid("x"), tid("q"), 1, 3, 0, 1)]
    prompts, passages = model.prepare(Q[:1], K[:1], "diekae")
    with torch.no_grad():
        memory = model.knowledge.encode(model.encoder, prompts, passages, copy=model.copy).readout.memory
    keys = memory.keys[0]  # (heads, slots, dk); the piece's two slots are the last
    width = keys.shape[1] - 2
    items = [model.prompter.isolated_item(passages[0], prompts[0])]
    layout = KnowledgeLayout.of([items[0][0]], [items[0][1]], model.knowledge.passage_tokens.spans, passages, width)
    start = layout.items[0][0][0]  # the passage's first slot
    assert not torch.allclose(keys[:, start + 1], keys[:, start + 3])
    torch.testing.assert_close(keys[:, -2], keys[:, start + 1])
    torch.testing.assert_close(keys[:, -1], keys[:, start + 3])
    assert memory.ids[0, -2:].tolist() == [tid("x")] * 2 and memory.valid[0, -2:].all()


def test_a_piece_keeps_its_second_slot_where_the_piece_before_it_has_one():
    """Continuation follows each block's own chain, so a piece whose two keys are the same still gets a
    slot in the second block after a piece that has one there (a copy that went on along the second
    block's keys goes on), and none after a piece that has none."""
    model = _per_step_model(isolation=True, match=True, first_unspaced=True, answer_pieces=True)
    model.knowledge.passage_cache.max_segments = 0
    tid = model.tokenizer.convert_tokens_to_ids
    prompts, passages = model.prepare(Q[:1], K[:1], "diekae")
    for first_after, second_kept in ((3, True), (1, False)):  # the first piece's keys differ / are the same
        model.knowledge.passage_tokens.word_pieces = lambda text, classes: [
            Piece(tid("x"), tid("q"), 1, first_after, 0, 1), Piece(tid("z"), tid("x"), 2, 2, 0, 2)]
        with torch.no_grad():
            memory = model.knowledge.encode(model.encoder, prompts, passages, copy=model.copy).readout.memory
        cover, second = slice(-4, -2), slice(-2, None)  # the two blocks of two pieces each
        assert memory.valid[0, cover].all()
        assert memory.valid[0, second].tolist() == [first_after != 1, second_kept]
        width = memory.width
        assert memory.predecessors()[0, -1] == width - 2 and memory.predecessors()[0, -3] == width - 4


def test_whitened_values_raise_the_copied_token_alone_and_decode_steps_still_equal_a_re_encode():
    """A whitened value row gives its token the raw row's logit boost through the final norm and the
    output layer, and that token is the top logit when the row is all there is; every knowledge path
    (prefill, cached passages, answer pieces) uses the same rows, and decode rows still equal a re-encode."""
    from diekae_rag.copy.values import whitened_values, whitener
    model = _per_step_model(isolation=True, match=True, first_unspaced=True, answer_pieces=True,
                            whitened_values=True)
    model.knowledge.passage_cache.max_segments = 0
    enc, dec = model.encoder, model.decoder
    W, g = dec.get_output_embeddings().weight.detach(), dec.model.norm.weight.detach()
    ids = torch.arange(W.shape[0])
    rows = whitened_values(W, g, whitener(W, g), ids)
    logits = rows @ (W * g).T
    torch.testing.assert_close(logits[ids, ids], (W * (W * g)).sum(-1), atol=1e-3, rtol=1e-3)
    assert (logits.argmax(-1) == ids).float().mean() > 0.95
    values = model.knowledge.values
    torch.testing.assert_close(values.rows(ids[:5], True, enc.dtype), rows[:5].to(enc.dtype))
    torch.testing.assert_close(values.rows(ids[:5], False, enc.dtype), W[:5].to(enc.dtype))
    some = torch.tensor([7, 3, 7, 11, 3])  # repeats, and tokens the table already holds beside new ones
    torch.testing.assert_close(values.rows(some, True, enc.dtype), rows[some].to(enc.dtype))
    assert values._made.sum() == 7  # ids 0-4, then 7 and 11: a token's row is made once
    assert_decode_rows_equal_reencode(model)


def test_continuation_keeps_a_copy_on_the_occurrence_it_started_on():
    """With continue_bonus, after writing "a" the slot after the "a" the previous position attended to
    wins over the slot after another "a"; without it the two tie. Cached decode steps still equal a full
    re-encode, with answer pieces (whose predecessors are the first copy or the piece before them) and
    without."""
    from diekae_rag.copy import CopyReadout
    model = _per_step_model(isolation=True, match=True, continue_bonus=4.0)
    model.knowledge.passage_cache.max_segments = 0
    enc, tid = model.encoder, model.tokenizer.convert_tokens_to_ids
    with torch.no_grad():
        enc.copy_head.q.weight.zero_()  # scores: the token match and the continuation only
    prompts, passages = model.prepare(["q?"], [["mab mac"]], "diekae")
    with torch.no_grad():
        prefill = model.knowledge.encode(enc, prompts, passages, copy=model.copy)
    memory = prefill.readout.memory
    slots = [s for s, i in enumerate(memory.ids[0].tolist()) if i == tid("a") and memory.valid[0, s]]
    assert len(slots) == 2
    last = torch.zeros_like(memory.valid, dtype=torch.float)
    last[0, slots[0]] = 1.0  # the previous position copied the first "a"
    att = {}
    for bonus in (0.0, 4.0):
        readout = CopyReadout(enc.copy_head, memory, model.copy.replace(continue_bonus=bonus), model.knowledge.classes,
                              model.knowledge.values, model.config.pointer_match_scale)
        readout.last_class, readout.last_attention = prefill.readout.last_class, last
        tok = torch.tensor([[tid("a")]])
        with torch.no_grad():
            out = enc(tok, torch.ones(1, 1, dtype=torch.bool), cache=prefill.out.cache, use_cache=True)
            readout(out.states, tok)
        att[bonus] = readout.attention[0, :, -1].mean(0)
    after = [s + 1 for s in slots]  # "b" and "c"
    torch.testing.assert_close(att[0.0][after[0]], att[0.0][after[1]])
    assert att[4.0][after[0]] > 3 * att[4.0][after[1]]
    assert readout.last_attention is not None and readout.last_attention.shape == memory.valid.shape
    assert_decode_rows_equal_reencode(_per_step_model(isolation=True, match=True, continue_bonus=4.0))
    model = _per_step_model(isolation=True, match=True, continue_bonus=4.0, first_unspaced=True, answer_pieces=True)
    model.knowledge.passage_tokens.word_pieces = lambda text, classes: [Piece(tid("x"), tid("q"), 1, 3, 0, 1),
                                                                        Piece(tid("z"), tid("x"), 2, 3, 0, 2)]
    assert_decode_rows_equal_reencode(model)
    with pytest.raises(ValueError, match="continue_bonus needs the token match"):
        _per_step_model(isolation=True, match=False, continue_bonus=4.0)
