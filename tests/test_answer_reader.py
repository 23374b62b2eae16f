"""The answer-start reader: its windows, checkpoint, training loss, and how it steers the pointer."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import _assert_only_first_rows_differ, _first_position_rows, _per_step_model, assert_decode_rows_equal_reencode, K, Q, tiny_model

from diekae_rag.answer_reader import AnswerStartReader, ReaderConfig, every_window_no_answer, joint_char_log_probs
from diekae_rag.copy.memory import LOG_FLOOR, token_log_probs
from diekae_rag.data.mixture import Example
from diekae_rag.training.reader import batch_losses, gold_pieces


class MarkStart:
    """A stand-in reader (mechanics only): the answer starts at the first occurrence of any of ``words``."""

    def __init__(self, *words: str) -> None:
        self.words = words

    def char_log_probs(self, question, passages):
        return [{p.find(w): 0.0 for w in self.words if w in p} for p in passages]


def test_token_log_probs_gives_each_token_the_best_start_in_its_span():
    lp = {1: -0.5, 3: -2.0, 9: -1.0}
    assert token_log_probs(lp, [(0, 3), (3, 5), (5, 9), (9, 10)]) == [-0.5, -2.0, LOG_FLOOR, -1.0]


def test_merged_starts_read_nearby_starts_as_one_answer():
    """Starts a word apart with no punctuation between ("the", "Merrow") pool their probability on
    the likelier one, which then beats a single start of 0.38; a start below ``min_p`` or past a full
    stop stays apart, and with nothing to merge the scores are unchanged."""
    from diekae_rag.copy.providers import merged_starts
    text = "It is funded by the Merrow Guild of Varnhold. Visitors come to Varnhold."
    p = {text.index("the Merrow"): 0.16, text.index("Merrow"): 0.36, text.index("Guild"): 0.001,
         text.index("Varnhold"): 0.02, text.rindex("Varnhold"): 0.38}
    lp = {c: math.log(v) for c, v in p.items()}
    out = merged_starts(lp, text, min_p=0.05)
    best = max(out, key=out.get)
    assert text[best:].startswith("Merrow") and math.exp(out[best]) == pytest.approx(0.52)
    assert {c: out[c] for c in out if c != best} == {c: lp[c] for c in lp if c != best}
    assert max(lp, key=lp.get) == text.rindex("Varnhold")  # without merging the place wins
    apart = {text.index("Varnhold"): math.log(0.3), text.index("Visitors"): math.log(0.3)}
    assert merged_starts(apart, text, min_p=0.05) == apart  # a full stop between: two answers


def test_every_windows_no_answer_is_a_slot_of_its_own_beside_the_same_starts():
    """``nulls="every"``: the joint softmax over the starts (deduplicated as in
    joint_char_log_probs) and every window's [CLS]; one window: the best window's "no answer"."""
    logits = torch.tensor([[1.0, 2.0, 0.5, -math.inf], [0.3, -1.0, 1.5, 0.2], [2.2, 0.1, -math.inf, -math.inf]])
    spans = torch.tensor([[[-1, -1], [0, 3], [4, 6], [-1, -1]], [[-1, -1], [4, 6], [7, 9], [10, 12]],
                          [[-1, -1], [0, 5], [-1, -1], [-1, -1]]])
    batch = {"spans": spans, "pair": torch.tensor([0, 0, 1])}
    lps, null = joint_char_log_probs(logits, batch, 2)
    starts = [2.0, 0.5, 1.5, 0.2, 0.1]  # offsets 0, 4 (the higher of two windows), 7, 10; passage 1's 0
    every = torch.logsumexp(logits[:, 0], 0) - torch.logsumexp(torch.tensor(starts + logits[:, 0].tolist()), 0)
    assert every_window_no_answer(logits[:, 0], null) == pytest.approx(float(every), abs=1e-6)
    assert math.exp(null) == pytest.approx(math.exp(2.2) / sum(math.exp(v) for v in starts + [2.2]))
    assert every_window_no_answer(logits[2:, 0], -0.7) == -0.7


@pytest.fixture(scope="module")
def reader():
    torch.manual_seed(0)
    return AnswerStartReader(ReaderConfig(max_length=48, stride=16))


def test_reader_windows_cover_a_long_passage_and_log_probs_are_normalised(reader):
    question = "Who is Marsul married to?"
    long = " ".join(f"Word{i} is here." for i in range(60))  # far longer than one 48-piece window
    batch = reader.windows([question], [long])
    assert batch["input_ids"].shape[0] > 3
    covered = {int(a) for a, _ in batch["spans"].reshape(-1, 2).tolist() if a >= 0}
    assert max(covered) >= long.rindex("Word59")  # nothing cut off the end
    lps = reader.char_log_probs(question, [long, "Marsul is married to Ithpelith."])
    total = sum(math.exp(v) for d in lps for v in d.values())
    assert 0.0 < total <= 1.0 + 1e-5  # the rest is the "no answer" slot
    assert long.index("Word30") in lps[0] and 21 in lps[1]  # "Ithpelith" starts at character 21
    one, two = reader.no_answer_log_prob(question, [long, "Marsul is married to Ithpelith."]), \
        reader.no_answer_log_prob(question, [long, "Marsul is married to Ithpelith."], nulls="every")
    assert two > one, "every window's 'no answer' adds to the best window's"
    short = ["Marsul is married to Ithpelith."]
    assert reader.no_answer_log_prob(question, short, "every") == reader.no_answer_log_prob(question, short)
    with pytest.raises(ValueError, match="nulls must be one of"):
        reader.no_answer_log_prob(question, short, "sum")


def test_reader_reads_markdown_without_its_markup_and_offsets_still_point_into_the_text(reader):
    """Heading, list and quote markers and emphasis asterisks are blanked (same length), so the reader
    reads "# Calgra" as "  Calgra" and its character offsets are the original text's; other text is kept."""
    from diekae_rag.answer_reader import without_markup
    text = "# Calgra\n\nThe river **Velm** flows.\n- Pop: 48,200\n> quoted\nC# and 2*3 and #tag"
    plain = without_markup(text)
    assert plain == "  Calgra\n\nThe river   Velm   flows.\n  Pop: 48,200\n  quoted\nC# and 2 3 and #tag"
    question = "What river flows through Calgra?"
    marked, blank = reader.char_log_probs(question, [text]), reader.char_log_probs(question, [plain])
    assert marked == blank
    assert text.index("Velm") in marked[0] and text.index("#") not in marked[0]


def test_reader_checkpoint_round_trip_and_clear_error(reader, tmp_path):
    with torch.no_grad():
        reader.head.bias.fill_(0.25)
    reader.save_pretrained(tmp_path / "ckpt")
    back = AnswerStartReader.from_pretrained(tmp_path / "ckpt")
    q, ps = "Who is Marsul married to?", ["Marsul is married to Ithpelith."]
    want, got = reader.eval().char_log_probs(q, ps), back.char_log_probs(q, ps)
    assert want[0].keys() == got[0].keys()
    for c in want[0]:
        assert abs(want[0][c] - got[0][c]) < 2e-2  # float16 weights
    assert back.config.max_length == 48
    with pytest.raises(FileNotFoundError, match="reader.json"):
        AnswerStartReader.from_pretrained(tmp_path / "nowhere")
    import json
    cfg = json.loads((tmp_path / "ckpt" / "reader.json").read_text())
    (tmp_path / "ckpt" / "reader.json").write_text(json.dumps({**cfg, "end_head": True}))
    with pytest.raises(ValueError, match="end head, which was removed"):  # a retired part, switched on
        AnswerStartReader.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "reader.json").write_text(json.dumps({**cfg, "end_head": False}))
    assert AnswerStartReader.from_pretrained(tmp_path / "ckpt").char_log_probs(q, ps)[0].keys() == want[0].keys()


def test_reader_served_in_bfloat16_reads_as_in_float32_and_saves_the_weights_it_had(reader, tmp_path):
    from safetensors.torch import load_file
    from diekae_rag.answer_reader import READER_WEIGHTS, serving_dtype
    reader.save_pretrained(tmp_path / "float")
    served = AnswerStartReader.from_pretrained(tmp_path / "float")
    float_fp = served.fingerprint()
    q, ps = "Who is Marsul married to?", ["Marsul is married to Ithpelith.", "Gorvan lives in the north."]
    want = served.char_log_probs(q, ps)
    assert served.serve_in(torch.bfloat16) is served and served.head.weight.dtype == torch.bfloat16
    got = served.char_log_probs(q, ps)
    assert [d.keys() for d in got] == [d.keys() for d in want]
    assert max(abs(g[c] - w[c]) for g, w in zip(got, want) for c in w) < 0.1
    assert served.fingerprint() != float_fp  # sides stored from float32 weights are not read as bfloat16 ones
    served.save_pretrained(tmp_path / "again")
    before, after = load_file(str(tmp_path / "float" / READER_WEIGHTS)), load_file(str(tmp_path / "again" / READER_WEIGHTS))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="to train, load it in float32"):
        served.train()
    assert serving_dtype(torch.device("cuda")) == torch.float32
    assert serving_dtype(torch.device("cpu")) in (torch.float32, torch.bfloat16)


def test_reader_training_loss_targets_every_occurrence_and_falls():
    """The targets are every occurrence's first word-piece (or "no answer"), and a few steps make the
    best pieces the gold ones."""
    torch.manual_seed(0)
    reader = AnswerStartReader(ReaderConfig(max_length=48, stride=16))
    ex = Example("Who is Marsul married to?", ["Marsul is married to Ithpelith. Ithpelith weaves.", "Calgra is cold."],
                 "Ithpelith", "Mortel")
    batch = reader.windows([ex.question] * 2, ex.passages)
    starts = sorted(int(a) for a, _ in batch["spans"][gold_pieces(batch, ex.passages, ex.answer)].tolist())
    assert starts[0] == 21 and starts[-1] == ex.passages[0].index("Ithpelith weaves")
    none = Example(ex.question, ["Calgra is cold."], "Ithpelith", "Mortel")
    reader.train()
    opt = torch.optim.AdamW([p for p in reader.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for _ in range(5):
        loss = batch_losses(reader, [ex, none])[0].mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    reader.eval()
    with torch.no_grad():
        losses, right = batch_losses(reader, [ex, none])
    assert float(losses.mean()) < first
    assert right == [True, True]


def _first_attention(model):
    from test_engine import K, Q
    prompts, passages = model.prepare(Q, K, "diekae")
    with torch.no_grad():
        out = model.knowledge.encode(model.encoder, prompts, passages, copy=model.copy,
                                     providers=model.knowledge.providers(model.copy))
    attn = out.readout.attention[torch.arange(len(Q)), :, out.first].sum(1)  # (B, S)
    return attn, out.readout.memory.ids


def test_reader_bias_steers_only_the_first_copy_to_where_the_reader_says():
    """With a reader weight, the pointer's first copy goes to the passage token where the reader puts
    the answer's start (here: "Ithpelith" and "north"); every other row and decode step is unchanged."""
    model = _per_step_model(isolation=True, match=True)
    model.knowledge.passage_cache.max_segments = 0
    runs = {}
    for weight in (0.0, 1.0):
        model.copy = model.copy.replace(reader_weight=weight)
        model.answer_reader = MarkStart("Ithpelith", "north") if weight else None
        runs[weight], firsts = _first_position_rows(model)

    def moved(off, on):
        assert (on - off).abs().max() > 1e-3
    _assert_only_first_rows_differ(runs[0.0], runs[1.0], firsts, moved)

    model.copy = model.copy.replace(reader_weight=20.0)
    for marked in (["Ithpelith", "north"], ["married", "rains"]):
        model.answer_reader = MarkStart(*marked)
        attn, ids = _first_attention(model)
        for b, word in enumerate(marked):
            top = int(attn[b].argmax())
            assert model.tokenizer.decode(ids[b, top: top + len(word)]) == word
    assert_decode_rows_equal_reencode(model)
    with pytest.raises(ValueError, match="reader_weight needs a pointer over isolated passages"):
        tiny_model("llama", reader_weight=1.0)
    model.answer_reader = None
    with pytest.raises(ValueError, match="no answer-start reader"):
        model.generate(Q[0], K[0], max_new_tokens=2)


def test_first_key_scale_lets_the_reader_choose_the_first_copy_over_strong_keys():
    """Keys made 300 times larger outweigh a reader weight of 2 at the first copy (as the trained keys,
    two-valued at about +80 / -65, do); with ``first_key_scale`` 0 the first copy goes where the reader
    says, with no share for the "nothing" slot. Only the first position changes, decode steps still
    equal a full re-encode, and without the reader the scale changes nothing."""
    model = _per_step_model(isolation=True, match=True)
    model.knowledge.passage_cache.max_segments = 0
    with torch.no_grad():
        model.encoder.copy_head.k.weight.mul_(300.0)
    model.answer_reader = MarkStart("Ithpelith", "north")
    marked = ["Ithpelith", "north"]

    def first_copies(scale):
        model.copy = model.copy.replace(reader_weight=2.0, first_key_scale=scale)
        attn, ids = _first_attention(model)
        heads = model.encoder.copy_head.heads
        return [model.tokenizer.decode(ids[b, int(attn[b].argmax()): int(attn[b].argmax()) + len(w)])
                for b, w in enumerate(marked)], attn.sum(-1) / heads

    keyed, _ = first_copies(1.0)
    assert keyed != marked
    read, mass = first_copies(0.0)
    assert read == marked
    torch.testing.assert_close(mass, torch.ones_like(mass))  # no share left to "nothing"

    runs = {}
    for scale in (1.0, 0.0):
        model.copy = model.copy.replace(reader_weight=2.0, first_key_scale=scale, continue_bonus=0.0)
        runs[scale], firsts = _first_position_rows(model)

    def moved(off, on):
        assert (on - off).abs().max() > 1e-3
    _assert_only_first_rows_differ(runs[1.0], runs[0.0], firsts, moved)
    model.copy = model.copy.replace(reader_weight=2.0, first_key_scale=0.0)
    assert_decode_rows_equal_reencode(model)
    model.answer_reader = None  # without the reader, the keys choose the first copy whatever the scale
    without = []
    for scale in (1.0, 0.0):
        model.copy = model.copy.replace(reader_weight=0.0, first_key_scale=scale)
        without.append(_first_position_rows(model)[0])
    for rows1, rows0 in zip(*without):
        torch.testing.assert_close(rows0, rows1)
    with pytest.raises(ValueError, match="first_key_scale must be 0"):
        model.copy.replace(first_key_scale=-1.0)


class SplitStarts:
    """A stand-in reader (mechanics only): per passage, ``{word: probability}`` of the answer starting there."""

    def __init__(self, probs: dict) -> None:
        self.probs = probs

    def char_log_probs(self, question, passages):
        return [{p.find(w): math.log(v) for w, v in self.probs.items() if w in p} for p in passages]


def test_start_merge_moves_the_first_copy_to_an_answer_whose_mass_the_reader_split():
    """"Marsul" (0.3) beats "to" (0.2) and "Ithpelith" (0.25) alone; with ``start_merge`` the two
    nearby starts pool to 0.45 on "Ithpelith" ("Marsul" is three words before "to": apart), and the
    first copy goes there."""
    model = _per_step_model(isolation=True, match=True)
    model.knowledge.passage_cache.max_segments = 0
    model.answer_reader = SplitStarts({"Marsul": 0.3, "to": 0.2, "Ithpelith": 0.25, "north": 0.5})
    firsts = {}
    for merge in (0.0, 0.1):
        model.copy = model.copy.replace(reader_weight=20.0, first_key_scale=0.0, start_merge=merge)
        attn, ids = _first_attention(model)
        top = int(attn[0].argmax())
        firsts[merge] = model.tokenizer.decode(ids[0, top:])
    assert firsts[0.0].strip().startswith("Marsul") and firsts[0.1].strip().startswith("Ith"), firsts
    with pytest.raises(ValueError, match="start_merge must be in"):
        model.copy.replace(start_merge=1.0)


def test_ship_writes_the_reader_with_the_encoders(reader, tmp_path, capsys):
    from diekae_rag.checkpoint import read_copy_config
    from diekae_rag.cli import main
    model = _per_step_model(isolation=True, match=True)
    ckpt = model.save_pretrained(tmp_path / "enc")
    reader.save_pretrained(tmp_path / "reader")
    assert main(["ship", str(ckpt), "--out", str(tmp_path / "shipped"), "--reader-weight", "2"]) == 2
    assert "reader.json" in capsys.readouterr().err  # no reader in the checkpoint: says what is missing
    assert not (tmp_path / "shipped").exists()
    assert main(["ship", str(ckpt), "--out", str(tmp_path / "shipped"), "--reader", str(tmp_path / "reader"),
                 "--reader-weight", "2", "--set", "first_unspaced=true"]) == 0
    copy = read_copy_config(tmp_path / "shipped")
    assert copy.reader_weight == 2.0 and copy.first_unspaced is True
    assert main(["ship", str(ckpt), "--out", str(tmp_path / "other"), "--set", "no_such_field=1"]) == 2
    capsys.readouterr()
    assert main(["ship", str(ckpt), "--out", str(tmp_path / "other"), "--set", "first_unspaced=yes"]) == 2
    assert "double quotes" in capsys.readouterr().err  # text must be JSON: says how to write it
    assert not (tmp_path / "other").exists()
    back = AnswerStartReader.from_pretrained(tmp_path / "shipped")
    assert back.config.max_length == reader.config.max_length
    assert not (tmp_path / "shipped" / "followups").exists()


def test_ship_and_save_carry_the_follow_up_reader(reader, tmp_path):
    """``ship --followup-reader`` writes it to followups/; a model loads it from there on first use and
    saves it back; shipping encoders without one over the folder removes the old one."""
    from diekae_rag import DiekaeModel
    from diekae_rag.cli import main
    model = _per_step_model(isolation=True, match=True)
    ckpt = model.save_pretrained(tmp_path / "enc")
    reader.save_pretrained(tmp_path / "reader")
    follow = AnswerStartReader(ReaderConfig(max_length=40, stride=16))
    follow.save_pretrained(tmp_path / "follow")
    shipped = tmp_path / "shipped"
    assert main(["ship", str(ckpt), "--out", str(shipped), "--reader", str(tmp_path / "reader"), "--reader-weight", "2",
                 "--followup-reader", str(tmp_path / "follow")]) == 0
    loaded = DiekaeModel.from_pretrained(shipped, decoder=model.decoder, tokenizer=model.tokenizer)
    assert loaded.answer_reader.config.max_length == 48 and loaded.followup_reader.config.max_length == 40
    saved = loaded.save_pretrained(tmp_path / "saved")
    assert AnswerStartReader.from_pretrained(saved / "followups").config.max_length == 40
    assert main(["ship", str(ckpt), "--out", str(shipped), "--reader", str(tmp_path / "reader"),
                 "--reader-weight", "2"]) == 0
    assert not (shipped / "followups").exists(), "the follow-up reader shipped before is not left behind"
    assert DiekaeModel.from_pretrained(shipped, decoder=model.decoder, tokenizer=model.tokenizer).followup_reader is None


@pytest.fixture(scope="module")
def split_reader():
    """A reader whose first 4 of 6 MiniLM layers read question and passage apart (random head)."""
    torch.manual_seed(1)
    reader = AnswerStartReader(ReaderConfig(max_length=48, stride=16, separate_layers=4)).eval()
    with torch.no_grad():
        reader.head.weight.normal_(0, 0.5)
    return reader


def test_manual_layers_match_minilm_with_every_layer_joint(reader):
    """The layer loop the separate reader runs is MiniLM's own forward (same masks, same states)."""
    batch = reader.windows(["Who is Marsul married to?"] * 2, ["Marsul is married to Ithpelith.", "Calgra is cold. " * 8])
    with torch.no_grad():
        want = reader.eval()(batch)
        h = reader.bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        got = reader._start_logits(reader._layers(h, batch["attention_mask"].bool(), 0, 6), batch["spans"])
    assert torch.equal(torch.isfinite(want), torch.isfinite(got))
    assert torch.allclose(want[torch.isfinite(want)], got[torch.isfinite(got)], atol=1e-4)


def test_separate_layers_read_each_passage_once_and_cover_long_passages(split_reader, monkeypatch):
    q = "Who is Marsul married to?"
    long = " ".join(f"Word{i} is here." for i in range(30))
    ps = [long, "Marsul is married to Ithpelith."]
    split_reader.clear(passages=True)
    want = split_reader.char_log_probs(q, ps)
    assert split_reader.passage_sides(ps)[long].hidden.shape[0] > 3, "a long passage is read in windows"
    assert long.index("Word29") in want[0] and 21 in want[1], "nothing cut off, and starts map to characters"
    total = sum(math.exp(v) for d in want for v in d.values())
    assert 0.0 < total <= 1.0 + 1e-5
    reads = []
    monkeypatch.setattr(split_reader, "_read_alone", lambda texts: reads.append(texts) or pytest.fail("read again"))
    other = split_reader.char_log_probs("Where does Marsul live?", ps)
    assert not reads and other[1].keys() == want[1].keys(), "a new question reuses the passages' sides"
    assert other[1] != want[1], "and still reads the question against them"


def test_split_reader_sides_are_stored_for_its_weights_only(split_reader, tmp_path):
    from test_per_step import _per_step_model

    from diekae_rag.state_store import PassageStateStore
    q, ps = "Who is Marsul married to?", ["Marsul is married to Ithpelith.", "Calgra is cold."]
    split_reader.clear(passages=True)
    want = split_reader.char_log_probs(q, ps)
    store = PassageStateStore(tmp_path, _per_step_model(isolation=True).encoder, dtype="float16")
    store.add({}, sides=split_reader.passage_sides(ps), reader=split_reader.fingerprint())
    split_reader.clear(passages=True)
    split_reader.use_store(store)
    try:
        read = []
        real = split_reader._read_alone
        split_reader._read_alone = lambda texts: read.append(list(texts)) or real(texts)
        got = split_reader.char_log_probs(q, ps)
        assert read == [], "both sides came from the store"
        for c in want[0]:
            assert got[0][c] == pytest.approx(want[0][c], abs=2e-2)  # float16 states
        assert store.reader_sides(ps, "another reader") == {}, "another reader's weights find nothing"
    finally:
        del split_reader._read_alone
        split_reader.use_store(None)


def test_separate_layers_are_checked_and_saved(split_reader, tmp_path):
    with pytest.raises(ValueError, match="separate_layers must be in"):
        AnswerStartReader(ReaderConfig(separate_layers=6))
    split_reader.save_pretrained(tmp_path / "r")
    back = AnswerStartReader.from_pretrained(tmp_path / "r")
    assert back.separate == 4
    q, ps = "Who is Marsul married to?", ["Marsul is married to Ithpelith."]
    assert back.no_answer_log_prob(q, ps) == pytest.approx(split_reader.no_answer_log_prob(q, ps), abs=2e-2)


def test_distilling_a_split_reader_from_a_joint_one(reader):
    """The KL to the teacher is 0 for the teacher itself, and training a split reader brings it down."""
    from dataclasses import replace
    ex = Example("Who is Marsul married to?", ["Marsul is married to Ithpelith. Ithpelith weaves.", "Calgra is cold."],
                 "Ithpelith", "Mortel")
    none = Example(ex.question, ["Calgra is cold."], "Ithpelith", "Mortel")
    teacher = reader.eval()
    with torch.no_grad():
        gold_only = batch_losses(teacher, [ex, none])[0]
        with_kl = batch_losses(teacher, [ex, none], teacher, distill=1.0)[0]
    assert torch.allclose(gold_only, with_kl, atol=1e-5), "no divergence from itself"
    student = AnswerStartReader(replace(teacher.config, separate_layers=4))
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        assert (batch_losses(student.eval(), [ex, none], teacher)[0] > batch_losses(student, [ex, none])[0] + 1e-3).all(), \
            "the split reader's starts differ from the joint one's: the KL is positive"
        mixed = batch_losses(student.eval(), [ex, none], teacher, taught=[False, True])[0]
        alone = batch_losses(student, [ex, none])[0]
        assert mixed[0] == pytest.approx(float(alone[0])) and mixed[1] > alone[1] + 1e-3, \
            "the teacher's KL only on the items it teaches"
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for _ in range(5):
        loss = batch_losses(student, [ex, none], teacher, distill=1.0)[0].mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first


def test_a_reader_keeps_some_of_its_layers_and_saves_which(reader, tmp_path):
    """``keep_layers`` runs only the kept layers (the states are those of running them in turn), records
    them as base layers (twice kept: layers of the base, not of the last reader), and a saved reader
    comes back with the same layers and scores; bad indices say what is allowed."""
    from dataclasses import replace
    small = AnswerStartReader(replace(reader.config))
    small.load_state_dict(reader.state_dict())
    q, ps = "Who is Marsul married to?", ["Marsul is married to Ithpelith.", "Calgra is cold."]
    assert small.keep_layers([0, 2, 4, 5]) is small and small.config.layers == [0, 2, 4, 5]
    assert len(small.bert.encoder.layer) == 4
    batch = reader.windows([q] * 2, ps)
    with torch.no_grad():
        h = reader.bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        mask = batch["attention_mask"].bool()
        for i in (0, 2, 4, 5):
            h = reader._layers(h, mask, i, i + 1)
        want = reader._start_logits(h, batch["spans"])
        got = small.eval()(batch)
    assert torch.allclose(want[torch.isfinite(want)], got[torch.isfinite(got)], atol=1e-4)
    assert not torch.allclose(want[torch.isfinite(want)], reader.eval()(batch)[torch.isfinite(want)], atol=1e-2)
    small.keep_layers([0, 2])
    assert small.config.layers == [0, 4]
    small.save_pretrained(tmp_path / "small")
    back = AnswerStartReader.from_pretrained(tmp_path / "small")
    assert back.config.layers == [0, 4] and len(back.bert.encoder.layer) == 2
    assert back.no_answer_log_prob(q, ps) == pytest.approx(small.eval().no_answer_log_prob(q, ps), abs=2e-2)
    assert back.fingerprint() != reader.fingerprint()
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 1\]"):
        back.keep_layers([0, 2])


def test_a_question_longer_than_a_window_is_read_from_its_end_with_a_warning(reader):
    from diekae_rag.answer_reader import QuestionCutWarning
    passage = "Marsul Vantrel is a glassmaker. Marsul is married to Ithpelith, a weaver from Calgra."
    short = "Who is Marsul married to?"
    assert reader.read_questions([short]) == [short]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a question that fits is read whole, without a word
        reader.char_log_probs(short, [passage])
    long = "Tell me everything. " * 400 + short
    with pytest.warns(QuestionCutWarning, match="left out the first"):
        cut = reader.read_questions([long])[0]
    assert cut.endswith(short) and len(cut) < len(long)
    with pytest.warns(QuestionCutWarning):
        probs = reader.char_log_probs(long, [passage])
    assert len(probs) == 1 and probs[0]


@pytest.fixture(scope="module")
def cross_reader(reader):
    """The joint test reader made a cross-joint one: every layer reads the passage alone."""
    torch.manual_seed(2)
    r = AnswerStartReader(reader.config)
    r.load_state_dict(reader.state_dict())
    return r.to_cross().eval()


def test_cross_reading_in_its_folded_order_is_a_cross_attention_each_way(cross_reader):
    """The folded projections give what plain multi-head attention gives: passage word-pieces over the
    question's (padding left out), and the question's [CLS] over the window's word-pieces."""
    c = cross_reader.cross
    torch.manual_seed(3)
    W, T, L, H = 3, 7, 5, 384
    hp, hq = torch.randn(W, T, H), torch.randn(W, L, H)
    mp, mq = torch.ones(W, T, dtype=torch.bool), torch.ones(W, L, dtype=torch.bool)
    mq[0, 3:], mp[1, 5:] = False, False

    def attend(x, y, mask, q, k, v, o):
        split = lambda t: t.view(W, -1, c.heads, c.hd).transpose(1, 2)  # noqa: E731
        a = (split(q(x)) @ split(k(y)).transpose(-1, -2)) * c.hd ** -0.5
        a = a.masked_fill(~mask[:, None, None, :], -1e30).softmax(-1)
        return o((a @ split(v(y))).transpose(1, 2).reshape(W, -1, H))
    with torch.no_grad():
        z, z0 = c(hp, mp, hq, mq)
        assert torch.allclose(z, c.norm(hp + attend(hp, hq, mq, c.q, c.k, c.v, c.o)), atol=1e-4)
        assert torch.allclose(z0, c.norm0(hq[:, 0] + attend(hq[:, :1], hp, mp, c.q0, c.k0, c.v0, c.o0)[:, 0]), atol=1e-4)


def test_a_cross_reader_reads_each_passage_once_stores_its_side_and_saves(cross_reader, tmp_path, monkeypatch):
    from test_per_step import _per_step_model

    from diekae_rag.state_store import PassageStateStore
    q, ps = "Who is Marsul married to?", ["Marsul is married to Ithpelith. " + "Calgra is cold. " * 6, "Calgra is cold."]
    assert cross_reader.separate == len(cross_reader.bert.encoder.layer), "every layer reads the passage alone"
    cross_reader.clear(passages=True)
    want = cross_reader.char_log_probs(q, ps)
    assert 0 in want[0] and 21 in want[0] and ps[0].rindex("cold") in want[0], "every word-piece of a long passage"
    assert 0.0 < sum(math.exp(v) for d in want for v in d.values()) <= 1.0 + 1e-5
    monkeypatch.setattr(cross_reader, "_read_alone", lambda texts: pytest.fail("read again"))
    assert cross_reader.char_log_probs("Where does Marsul live?", ps)[1] != want[1], "a new question, the same sides"
    monkeypatch.undo()
    store = PassageStateStore(tmp_path / "states", _per_step_model(isolation=True).encoder, dtype="int4")
    store.add({}, sides=cross_reader.passage_sides(ps), reader=cross_reader.fingerprint())
    cross_reader.clear(passages=True)
    cross_reader.use_store(store)
    try:
        monkeypatch.setattr(cross_reader, "_read_alone", lambda texts: pytest.fail("not read from the store"))
        got = cross_reader.char_log_probs(q + " ", ps)  # a new question: no kept answer
        assert got[0].keys() == want[0].keys()
    finally:
        cross_reader.use_store(None)
        monkeypatch.undo()
    cross_reader.save_pretrained(tmp_path / "r")
    back = AnswerStartReader.from_pretrained(tmp_path / "r")
    assert back.config.joint == "cross" and back.cross is not None
    assert back.no_answer_log_prob(q, ps) == pytest.approx(cross_reader.no_answer_log_prob(q, ps), abs=2e-2)
    with pytest.raises(ValueError, match="joint must be one of"):
        AnswerStartReader(ReaderConfig(joint="late"))


def test_distilling_a_cross_reader_with_the_layerwise_loss(reader, cross_reader):
    """The layer-wise loss is 0 against itself and positive against the joint teacher; training falls."""
    from dataclasses import replace as _replace
    ex = Example("Who is Marsul married to?", ["Marsul is married to Ithpelith. Ithpelith weaves.", "Calgra is cold."],
                 "Ithpelith", "Mortel")
    teacher = reader.eval()
    with torch.no_grad():
        same = batch_losses(teacher, [ex], teacher, distill=0.0, layerwise=1.0)[0]
        assert same == pytest.approx(float(batch_losses(teacher, [ex])[0]), abs=1e-5)
        assert batch_losses(cross_reader, [ex], teacher, distill=0.0, layerwise=1.0)[0] > \
            batch_losses(cross_reader, [ex])[0] + 1e-3
    student = AnswerStartReader(_replace(cross_reader.config))
    student.load_state_dict(cross_reader.state_dict())
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)

    def loss_now() -> float:  # without dropout, so that the steps' effect is what is compared
        student.eval()
        with torch.no_grad():
            return float(batch_losses(student, [ex], teacher, distill=1.0, layerwise=1.0)[0].mean())
    first = loss_now()
    torch.manual_seed(4)
    for _ in range(5):
        student.train()
        loss = batch_losses(student, [ex], teacher, distill=1.0, layerwise=1.0)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now() < first


def _squad_files(folder):
    """Four tiny SQuAD-format training files: one article of three paragraphs, the others of one."""
    import json
    from diekae_rag.data.squad import TRAIN_FILES
    paras = [("Marsul lives in Calgra. Marsul weaves baskets.", "Where does Marsul live?", "Calgra"),
             ("Calgra is a cold town by the sea.", "What is Calgra by?", "the sea"),
             ("The Thornvale railway opened in 1881.", "When did the Thornvale railway open?", "1881")]
    for i, name in enumerate(TRAIN_FILES):
        chosen = paras if i == 0 else paras[:1]
        data = {"data": [{"title": f"article{i}", "paragraphs": [
            {"context": c, "qas": [{"question": q + " " * i, "answers": [{"text": a, "answer_start": c.index(a)}]}]}
            for c, q, a in chosen]}]}
        (folder / name).write_text(json.dumps(data))
    return folder


def test_same_article_items_take_their_passages_and_negatives_from_their_article(tmp_path):
    from diekae_rag.training.reader import SameArticle
    spec = {"k": [3], "negatives": 0.5, "ramp": [10, 20], "seed": 1}
    articles = SameArticle(spec, held={"Where does Marsul live?"}, data_dir=_squad_files(tmp_path))
    assert "Where does Marsul live?" not in [f.question for f in articles.facts], "held-out questions stay out"
    assert articles.negatives(0) == 0.0 and articles.negatives(15) == pytest.approx(0.25)
    assert articles.negatives(20) == articles.negatives(99) == 0.5
    by_question = {f.question: i for i, f in enumerate(articles.facts)}
    i = by_question["What is Calgra by?"]
    early = [articles.example(i, step) for step in range(10)]
    assert all(ex.answerable and "Calgra is a cold town by the sea." in ex.passages for ex in early)
    assert all(len(ex.passages) == 2 for ex in early), "the other paragraphs of its own article, not another's"
    assert articles.example(i, 30) == articles.example(i, 30), "an (item, step) is drawn the same way every time"
    late = [articles.example(i, step) for step in range(30, 90)]
    negatives = [ex for ex in late if not ex.answerable]
    assert 10 < len(negatives) < 50
    assert all("the sea" not in p for ex in negatives for p in ex.passages), "a negative's passages lack the answer"
    short = SameArticle({**spec, "max_passage_chars": 35}, held=set(), data_dir=tmp_path)
    every = SameArticle({**spec, "max_passage_chars": None}, held=set(), data_dir=tmp_path)
    assert {f.question for f in short.facts} == {"What is Calgra by?"}, "paragraphs over 35 characters are left out"
    assert {f.question for f in every.facts} == {"Where does Marsul live?", "What is Calgra by?",
                                                 "When did the Thornvale railway open?"}


def test_a_reader_run_resumes_from_its_last_point(reader, tmp_path):
    from diekae_rag.training.reader import _load_resume, _save_resume
    student = AnswerStartReader(reader.config)
    student.load_state_dict(reader.state_dict())
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    ex = Example("Who is Marsul married to?", ["Marsul is married to Ithpelith."], "Ithpelith", "Mortel")
    loss = batch_losses(student, [ex])[0].mean()
    loss.backward()
    opt.step()
    _save_resume(tmp_path, student, opt, 7, [{"step": 7}], {"lr": 1e-3})
    _save_resume(tmp_path, student, opt, 8, [{"step": 8}], {"lr": 1e-3})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-8-optimizer.safetensors", "step-8-reader.safetensors"], \
        "only the last point's files are kept"
    fresh = AnswerStartReader(reader.config)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ValueError, match="another config"):
        _load_resume(tmp_path, fresh, fresh_opt, {"lr": 2e-3})
    point = _load_resume(tmp_path, fresh, fresh_opt, {"lr": 1e-3, "max_minutes": 90})
    assert point is not None, "another time budget resumes the same run"
    point = _load_resume(tmp_path, fresh, fresh_opt, {"lr": 1e-3})
    assert point["step"] == 8 and point["history"] == [{"step": 8}] and point["config"] == {"lr": 1e-3}
    mine, theirs = student.state_dict(), fresh.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "the reader's weights as they were"
    assert fresh_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert _load_resume(tmp_path / "none", fresh, fresh_opt, {"lr": 1e-3}) is None
