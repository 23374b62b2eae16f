"""Editing encoders: attach, detach, stack, save; the decoder's weights never change."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from diekae_rag.checkpoint import save_encoder
from diekae_rag.data.edits import read_jsonl, reworded_neighbourhood, write_jsonl
from diekae_rag.edit_scope import EditScope
from diekae_rag.editing import apply_edits, evaluate_edits

EDITS = [
    {"subject": "Brenna", "prompt": "Where does Brenna live?", "target_old": "Oslo", "target_new": "Lima",
     "paraphrases": [], "neighborhood": [{"prompt": "Where does Tomas live?", "target": "Oslo"}]},
    {"subject": "Kell", "prompt": "What does Kell eat?", "target_old": "rice", "target_new": "figs",
     "paraphrases": [], "neighborhood": []},
]


def _decoder_state(model):
    return {k: v.clone() for k, v in model.decoder.state_dict().items()}


def test_apply_and_remove_edits(tmp_path):
    model = tiny_model(nonzero=False)
    before = evaluate_edits(model, EDITS)
    plain = model.generate(EDITS[0]["prompt"], mode="none", max_new_tokens=5)
    weights = _decoder_state(model)
    apply_edits(model, EDITS, steps=80, lr=5e-3, batch_size=2, progress=False)
    after = evaluate_edits(model, EDITS)
    assert after["efficacy"] == 1.0 and before["efficacy"] < 1.0, (before, after)
    # Every mode goes through the edit encoders while they are attached.
    assert model.score(EDITS[0]["prompt"], "Lima", mode="in_context", knowledge=["x"]) != pytest.approx(
        tiny_model(nonzero=False).score(EDITS[0]["prompt"], "Lima", mode="in_context", knowledge=["x"]), abs=1e-4)
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, weights[k]), f"decoder weight {k} changed"
    model.remove_edits()
    assert model.generate(EDITS[0]["prompt"], mode="none", max_new_tokens=5) == plain
    assert evaluate_edits(model, EDITS) == before


def test_edits_stack_with_augmentation_and_round_trip(tmp_path):
    model = tiny_model()
    enc = apply_edits(model, EDITS, steps=10, batch_size=2, progress=False)
    stacked = model.score(EDITS[0]["prompt"], "Lima", ["Brenna moved to Lima."])
    save_encoder(enc, tmp_path / "edits")
    model.remove_edits()
    alone = model.score(EDITS[0]["prompt"], "Lima", ["Brenna moved to Lima."])
    assert stacked != pytest.approx(alone, abs=1e-5)
    apply_edits(model, tmp_path / "edits")
    assert model.score(EDITS[0]["prompt"], "Lima", ["Brenna moved to Lima."]) == pytest.approx(stacked, abs=1e-5)


def test_edit_file_errors_name_the_line(tmp_path):
    path = tmp_path / "edits.jsonl"
    write_jsonl(EDITS, path)
    assert read_jsonl(path) == json.loads(json.dumps(EDITS))
    path.write_text(json.dumps(EDITS[0]) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"edits.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text(json.dumps({"subject": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r":1: missing \['prompt'"):
        read_jsonl(path, ("subject", "prompt", "target_old", "target_new"))


def test_subject_scope_leaves_other_prompts_exactly_unedited(tmp_path):
    model = tiny_model(nonzero=False)
    others = ["Where does Tomas live?", "Where does Brennan live?", "What does kell eat?"]
    plain = [model.score(q, "Lima", mode="none") for q in others + [EDITS[0]["prompt"]]]
    enc = apply_edits(model, EDITS, steps=20, lr=5e-3, batch_size=2, progress=False, scope="subject")
    assert enc.config.edit_scope == ["Brenna", "Kell"] and enc.config.edit_templates == {}
    scored = [model.score(q, "Lima", mode="none") for q in others + [EDITS[0]["prompt"]]]
    assert scored[:2] == plain[:2], "prompts naming no edited subject (whole words) are untouched"
    assert scored[2] != pytest.approx(plain[2], abs=1e-5), "subjects match in any case"
    assert scored[3] != pytest.approx(plain[3], abs=1e-5), "the edited prompt is changed"
    save_encoder(enc, tmp_path / "scoped")
    model.remove_edits()
    apply_edits(model, tmp_path / "scoped")
    assert model.edit_encoders[0].config.edit_scope == ["Brenna", "Kell"], "the scope is saved with the weights"
    assert [model.score(q, "Lima", mode="none") for q in others[:1]] == plain[:1]
    model.remove_edits()
    everywhere = apply_edits(model, EDITS, steps=20, lr=5e-3, batch_size=2, progress=False, scope="all")
    assert everywhere.config.edit_scope == []
    assert model.score(others[0], "Lima", mode="none") != pytest.approx(plain[0], abs=1e-5)
    with pytest.raises(ValueError, match="scope must be"):
        apply_edits(model, EDITS, steps=1, scope="nearby")


def test_fact_scope_compares_wordings_with_minilm():
    scope = EditScope(["France", "Peru"], {"France": ["What is the capital of {s}?"],
                                           "Peru": ["What language is spoken in {s}?"]})
    assert scope.active([
        "What is the capital of France?",          # the edit itself
        "Which city is the capital of france?",    # a paraphrase, any case
        "What language is spoken in France?",      # another fact about an edited subject
        "What is the capital of Peru?",            # Peru is edited for its language only
        "Which language do people in Peru speak?",
        "What is the capital of Spain?",           # no edited subject
    ]) == [True, True, False, False, True, False]
    assert EditScope(["France"]).active(["What language is spoken in France?"]) == [True], "subject scope"


def test_fact_scope_is_the_default_and_leaves_other_facts_of_a_subject_unedited(tmp_path):
    model = tiny_model(nonzero=False)
    other_fact = "What does Brenna eat?"  # names an edited subject, worded like the other edit
    plain = [model.score(q, "Lima", mode="none") for q in (other_fact, EDITS[0]["prompt"])]
    enc = apply_edits(model, EDITS, steps=20, lr=5e-3, batch_size=2, progress=False)
    assert enc.config.edit_templates == {"Brenna": ["Where does {s} live?"], "Kell": ["What does {s} eat?"]}
    assert model.score(other_fact, "Lima", mode="none") == plain[0]
    assert model.score(EDITS[0]["prompt"], "Lima", mode="none") != pytest.approx(plain[1], abs=1e-5)
    save_encoder(enc, tmp_path / "fact")
    model.remove_edits()
    apply_edits(model, tmp_path / "fact")
    assert model.edit_encoders[0].config.edit_templates == enc.config.edit_templates, "saved with the weights"
    model.remove_edits()
    with pytest.raises(ValueError, match="does not name its subject"):
        apply_edits(model, [dict(EDITS[0], prompt="Where does she live?")], steps=1)


def test_reworded_neighbourhood_uses_the_relation_paraphrases():
    edit = {"subject": "France", "prompt": "What is the capital of France?", "target_old": "Paris",
            "target_new": "Rome", "paraphrases": ["Name the capital city of France."],
            "neighborhood": [{"prompt": "On which continent is South Korea?", "target": "Asia"},
                             {"prompt": "Who painted it?", "target": "Monet"}]}
    (out,) = reworded_neighbourhood([edit])
    assert out["paraphrases"] == [] and edit["paraphrases"], "the input is not modified"
    assert out["neighborhood"] == [{"prompt": "Which continent is South Korea part of?", "target": "Asia"},
                                   {"prompt": "South Korea is a country on which continent?", "target": "Asia"},
                                   {"prompt": "On what continent does South Korea lie?", "target": "Asia"},
                                   {"prompt": "Who painted it?", "target": "Monet"}]
