"""The real embedded SmolLM2-135M-Instruct (from the safetensors cache) with the shipped encoders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diekae_rag.answer_reader import serving_dtype
from diekae_rag.copy import KnowledgeLayout
from diekae_rag.copy.pieces import first_piece_ids

ROOT = Path(__file__).resolve().parents[1]
FACTS = [("Who is Marsul married to?", "Ithpelith", "Marsul is married to Ithpelith."),
         ("Where was Quorvane born?", "Stelmarth", "Quorvane was born in Stelmarth."),
         ("What is the capital of Zellira?", "Brindlemoor", "The capital of Zellira is Brindlemoor.")]


def test_embedded_default_loads_from_the_cache(real_model):
    from diekae_rag.defaults import cache_dir, default_decoder_path
    path = default_decoder_path()
    assert path.is_relative_to(cache_dir()) and (path / "model.safetensors").exists()
    dec = real_model.decoder
    assert type(dec).__name__ == "LlamaForCausalLM"
    assert dec.config.num_hidden_layers == 30 and dec.config.hidden_size == 576


def test_generate_and_score_in_all_modes(real_model):
    q, a, k = FACTS[0]
    scores = {m: real_model.score(q, a, [k], mode=m) for m in ("none", "in_context", "diekae")}
    texts = {m: real_model.generate(q, [k], mode=m, max_new_tokens=12) for m in ("none", "in_context", "diekae")}
    assert all(isinstance(t, str) and t for t in texts.values())
    assert scores["in_context"] < scores["none"] - 2, scores  # reading the passage helps a lot
    assert a in texts["in_context"]
    assert "".join(real_model.stream(q, [k], max_new_tokens=12)).strip() == texts["diekae"]
    assert real_model.generate_batch([q, q], [[k], None], max_new_tokens=12) == [texts["diekae"], texts["none"]]


def test_shipped_encoders_carry_the_passage(real_model):
    """The shipped encoders must lower the answer's NLL well below the no-knowledge decoder's."""
    from diekae_rag.model import SHIPPED_WEIGHTS
    if not (SHIPPED_WEIGHTS / "model.safetensors").exists():
        pytest.fail("no shipped encoders in diekae_rag/weights")
    qs, ans, ks = zip(*FACTS)
    none = real_model.score_batch(list(qs), list(ans), [[k] for k in ks], mode="none")
    diekae = real_model.score_batch(list(qs), list(ans), [[k] for k in ks], mode="diekae")
    assert sum(diekae) / 3 < sum(none) / 3 - 2.0, (none, diekae)


def test_passage_prior_picks_the_asked_passage_with_real_minilm(real_model):
    """With all three passages given, MiniLM's prior points the copy-attention at the asked one:
    it puts 0 on the right passage, a clear penalty on the others, and lowers the answers' NLL
    (measured with the answer-start reader off, which also picks the passage for the first copy)."""
    qs, ans, ks = zip(*FACTS)
    strength = real_model.copy.passage_prior
    assert strength > 0, "the shipped copy settings switch the prior on"
    priors = real_model.passage_prior(list(qs), [list(ks)] * 3, strength)
    for i, pr in enumerate(priors):
        assert pr[i] == 0 and max(p for j, p in enumerate(pr) if j != i) < -3, priors
    with_prior = real_model.score_batch(list(qs), list(ans), [list(ks)] * 3, copy={"reader_weight": 0.0})
    without = real_model.score_batch(list(qs), list(ans), [list(ks)] * 3,
                                     copy={"reader_weight": 0.0, "passage_prior": 0.0})
    assert sum(with_prior) < sum(without) - 0.3, (with_prior, without)


def test_qa_example_answers_with_sources(tmp_path):
    env = {**os.environ, "DIEKAE_RAG_CACHE": os.environ.get("DIEKAE_RAG_CACHE", str(Path.home() / ".cache" / "diekae_rag"))}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "qa.py"), "--store", str(tmp_path / "store"),
                          "--max-new-tokens", "12", "Who is Marsul Vantrel married to?"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "A (DIEKÆ):" in out.stdout and "Sources:" in out.stdout
    assert "marsul_vantrel.md" in out.stdout.split("Sources:")[1].splitlines()[1]
    assert (tmp_path / "store" / "manifest.json").exists()


def test_non_editable_install_imports_from_outside_the_repo(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (target / "retrievers").exists() and not (target / "integrations").exists()
    code = ("import diekae_rag, diekae_rag.retrievers, diekae_rag.integrations, diekae_rag.integrations.langchain;"
            "from diekae_rag.model import SHIPPED_WEIGHTS; print(diekae_rag.__file__);"
            "print((SHIPPED_WEIGHTS / 'model.safetensors').exists(), (SHIPPED_WEIGHTS / 'followups' / 'reader.safetensors').exists())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(target)}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.split()
    assert lines[0].startswith(str(target))
    assert lines[1] == "True", "the shipped encoders are installed with the package"
    assert lines[2] == "True", "and the follow-up reader"


def test_a_follow_up_that_names_no_one_is_answered_from_the_passage(real_model):
    """The README's conversation: the shipped follow-up reader reads "Where was she born?" with its turns
    and DIEKÆ copies the passage's answer; the question alone is gated; a follow-up that names its
    subject is read as the single question it is."""
    passages = ["Marsul Vantrel is married to Ithpelith Quorne. Ithpelith Quorne was born in Davrenholt."]
    turns = [{"role": "user", "content": "Who is Marsul Vantrel married to?"},
             {"role": "assistant", "content": "Ithpelith Quorne."},
             {"role": "user", "content": "Where was she born?"}]
    assert real_model.followup_reader is not None and real_model.followup_reader is not real_model.answer_reader
    assert "Davrenholt" in real_model.generate(turns, passages, max_new_tokens=8)
    alone = "Where was she born?"
    assert real_model.generate(alone, passages, max_new_tokens=8) == \
        real_model.generate(alone, passages, mode="none", max_new_tokens=8), "alone it names no one: gated"
    named = turns[:2] + [{"role": "user", "content": "Where was Ithpelith Quorne born?"}]
    questions, given = real_model.knowledge.questions([real_model.prompter.prompt_ids(named)], real_model.copy, [passages])
    assert questions == ["Where was Ithpelith Quorne born?"] and not given


def test_edit_set_neighbours_are_facts_the_decoder_keeps_apart(real_model, monkeypatch):
    """Edits come from facts SmolLM2 states; neighbourhood prompts share the relation and pass
    CounterFact's test on the unedited decoder (true object preferred to the new one)."""
    from diekae_rag.data import edits as E
    capitals = dict(list(E.CAPITALS.items())[:40])
    monkeypatch.setattr(E, "RELATIONS", {"capital": (capitals, *E.RELATIONS["capital"][1:])})
    rows = E.build_edit_set(real_model, n=3, seed=1)
    assert rows, "SmolLM2 states some capitals"
    for e in rows:
        assert capitals[e["subject"]] == e["target_old"] != e["target_new"]
        assert e["neighborhood"] and all(n["prompt"].startswith("What is the capital of") for n in e["neighborhood"])
        assert e["subject"] not in " ".join(n["prompt"] for n in e["neighborhood"] + e["retain"])
        for n in e["neighborhood"]:
            assert capitals[n["prompt"][len("What is the capital of "):-1]] == n["target"]
        truth = real_model.score_batch([n["prompt"] for n in e["neighborhood"]],
                                       [n["target"] for n in e["neighborhood"]], mode="none")
        new = real_model.score_batch([n["prompt"] for n in e["neighborhood"]],
                                     [e["target_new"]] * len(e["neighborhood"]), mode="none")
        assert all(t < w for t, w in zip(truth, new))
        assert e["neighborhood_dropped"] >= 0 and len(e["retain"]) == 3


def test_shipped_reader_finds_where_each_answer_starts(real_model):
    """The shipped answer-start reader (the real MiniLM, fine-tuned) puts its best start on each answer
    among all three passages, and the first copy uses the name's first token as an answer writes it."""
    copy = real_model.copy
    assert copy.reader_weight > 0 and copy.first_unspaced, "the shipped copy settings switch the reader on"
    assert real_model.answer_reader.head.weight.dtype == serving_dtype(real_model.device)
    qs, ans, ks = zip(*FACTS)
    for q, a in zip(qs, ans):
        lps = real_model.answer_reader.char_log_probs(q, list(ks))
        i, c, _ = max(((i, c, v) for i, d in enumerate(lps) for c, v in d.items()), key=lambda x: x[2])
        assert ks[i][c:].startswith(a), (q, ks[i][c:])
    prompts, passages = real_model.prepare([qs[0]], [[ks[0]]], "diekae")
    items = [real_model.prompter.isolated_item(passages[0], prompts[0])]
    p_ids = real_model.prompter.ids(ks[0])
    width = sum(len(s) for s in items[0][0])
    tokens = real_model.knowledge.passage_tokens
    layout = KnowledgeLayout.of([items[0][0]], [items[0][1]], tokens.spans, passages, width)
    pieces = first_piece_ids(tokens, passages, layout, real_model.device)[0, -len(p_ids):]
    at = [real_model.tokenizer.decode([t]) for t in p_ids].index(" Ith")
    assert int(pieces[at]) == real_model.tokenizer("Ithpelith", add_special_tokens=False)["input_ids"][0]


def test_the_reader_does_not_start_an_answer_at_a_markdown_heading(real_model):
    """Over a markdown document the shipped reader put 0.52 on the "#" of its heading for "Who founded
    the Thornvale Railway Company?"; read without the markup, its best start is the founder."""
    text = (ROOT / "examples" / "docs" / "thornvale_railway.md").read_text(encoding="utf-8")
    lps = real_model.answer_reader.char_log_probs("Who founded the Thornvale Railway Company?", [text])[0]
    best = max(lps, key=lps.get)
    assert text[best:].startswith("Brunhild Oster"), text[best: best + 30]


def test_answer_pieces_continue_a_name_written_as_an_answer_starts_it(real_model):
    """" Ithpelith" is ` Ith|pel|ith` in a passage but `I|th|pel|ith` in an answer: the answer pieces
    are th and pel (then the passage's own "ith" continues), each after the piece before it, keyed on the token that
    covers it; with them the answer's NLL falls."""
    from diekae_rag.copy.pieces import word_pieces
    tok, text = real_model.tokenizer, "Marsul is married to Ithpelith, a weaver."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = word_pieces(tok, text, enc["offset_mapping"], enc["input_ids"], real_model.knowledge.classes)
    names = [(tok.decode([x.id]), tok.decode([x.prev]), tok.decode([enc["input_ids"][x.cover]]),
              tok.decode([enc["input_ids"][x.after]])) for x in pieces]
    # then the passage's own "ith"; the last entry is the slot after the token where the previous piece ends
    assert names[:2] == [("th", "I", " Ith", "pel"), ("pel", "th", "pel", "pel")], names
    q, a, k = FACTS[0]
    assert real_model.copy.answer_pieces, "the shipped copy settings switch answer pieces on"
    without = real_model.score(q, a, [k], copy={"answer_pieces": False})
    assert real_model.score(q, a, [k]) < without - 0.2


def test_a_name_whose_answer_pieces_never_meet_the_passage_goes_on_to_its_next_word(real_model):
    """" Orsen Tharvik" is ` Or|sen Th|arv|ik` in a passage but "Orsen" starts an answer as `O|rs|en`, which
    never meets the passage's tokens: the passage's " Th" follows "sen", not "en". A piece for " Th" after
    "en" lets the copy go on to the surname, where it stopped at "Orsen"."""
    from diekae_rag.copy.pieces import word_pieces
    tok = real_model.tokenizer
    text = "Calgra is a town in Drisland. Calgra was founded in 1432 by Orsen Tharvik, a salt merchant."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    word = [tok.decode([t]) for t in enc["input_ids"]].index(" Or")
    pieces = [(tok.decode([x.id]), tok.decode([x.prev]), tok.decode([enc["input_ids"][x.cover]]))
              for x in word_pieces(tok, text, enc["offset_mapping"], enc["input_ids"], real_model.knowledge.classes)
              if x.word == word]
    assert pieces == [("rs", "O", " Or"), ("en", "rs", "sen"), (" Th", "en", " Th")], pieces
    assert "Orsen Tharvik" in real_model.generate("Who founded Calgra?", [text], max_new_tokens=12)


def test_whitened_values_make_the_copied_token_the_top_logit_on_smollm2(real_model):
    """On the real SmolLM2 (tied embeddings, a non-uniform final norm), a raw output-embedding row added
    alone makes another token the top logit for most tokens (" Sask" -> " tempfile"); its whitened row
    makes the token itself the top logit, with the same boost for it."""
    from diekae_rag.copy.values import whitened_values, whitener
    dec = real_model.decoder
    W, g = dec.get_output_embeddings().weight.detach().float(), dec.model.norm.weight.detach().float()
    ids = torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(0))[:1000]
    top = {"raw": (W[ids] @ (W * g).T).argmax(-1), "whitened": (whitened_values(W, g, whitener(W, g), ids) @ (W * g).T).argmax(-1)}
    assert (top["whitened"] == ids).float().mean() > 0.98
    assert (top["raw"] == ids).float().mean() < 0.4
