"""Training mechanics on a tiny decoder: phase 1 (cached Δ), phase 2, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny_model

from diekae_rag.checkpoint import read_config
from diekae_rag.data.fictional import HELD_OUT, make_facts
from diekae_rag.data.mixture import DataSpec, Example
from diekae_rag.training.phase1 import DeltaCache, difference_loss, teacher_deltas
from diekae_rag.training.phase2 import lm_loss
from diekae_rag.training.trainer import TrainConfig, build_model, lr_at, train


def _examples(n=8):
    return [Example(f.question, [f.passage], f.answer, f.distractor) for f in make_facts(n, seed=5)]


def test_fictional_facts_hold_out_relations_and_vary():
    train_facts = make_facts(300, relations="train", other_facts=(1, 3))
    held = make_facts(100, relations="held_out")
    assert not {f.relation for f in train_facts} & set(HELD_OUT)
    assert {f.relation for f in held} <= set(HELD_OUT)
    assert all(f.answer in f.passage and f.answer != f.distractor for f in train_facts)
    assert len({f.question.split(" ")[0] for f in train_facts}) > 3, "several question phrasings"
    with pytest.raises(ValueError, match="evaluation only"):
        DataSpec(squad=1, squad_files=["squad_v1.1_dev_part_a.json"]).build()


def test_retrieval_style_mixes_k_from_a_list():
    ex = DataSpec(fictional=400, k=[1, 3, 5], seed=1).build()
    sizes = {len(e.passages) for e in ex}
    assert sizes == {1, 3, 5}
    assert all(len(set(e.passages)) == len(e.passages) for e in ex), "no passage twice"
    with pytest.raises(ValueError, match="positive"):
        DataSpec(fictional=10, k=[0]).build()


def test_learning_rate_reaches_zero_by_the_time_budget():
    assert lr_at(0, 1000, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(10, 1000, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 1000, 1.0, 10, time_fraction=0.5) == pytest.approx(0.5)
    assert lr_at(100, 1000, 1.0, 10, time_fraction=1.0) == pytest.approx(0.0)
    assert lr_at(999, 1000, 1.0, 10, time_fraction=0.1) < 1e-4, "the step count still ends the schedule"


def test_teacher_delta_is_zero_without_knowledge_effect_and_cached(tmp_path):
    model = tiny_model(nonzero=False)
    ex = _examples(6)
    deltas = teacher_deltas(model, ex)
    assert len(deltas) == 6 and deltas[0].shape[0] == len(model.config.layers)
    assert all(float(d.float().abs().sum()) > 0 for d in deltas), "the knowledge changes the MLP outputs"
    cache = DeltaCache(tmp_path / "d", shard_size=4)
    cache.build(model, ex)
    shards = sorted(p.name for p in (tmp_path / "d").glob("*.safetensors"))
    assert shards == ["delta-00000.safetensors", "delta-00001.safetensors"]
    mtime = (tmp_path / "d" / shards[0]).stat().st_mtime_ns
    cache.build(model, ex)  # resumable: finished shards are not recomputed
    assert (tmp_path / "d" / shards[0]).stat().st_mtime_ns == mtime
    loaded = cache.load(6)
    for a, b in zip(loaded, deltas):
        torch.testing.assert_close(a, b)


def test_phase1_and_phase2_losses_fall():
    for loss_fn, lr, factor in (("phase1", 1e-4, 0.8), ("phase2", 3e-3, 0.95)):
        model = tiny_model(nonzero=False)
        model.encoder.train()
        ex = _examples(8)
        deltas = teacher_deltas(model, ex)
        opt = torch.optim.Adam(model.encoder.parameters(), lr=lr)
        losses = []
        for _ in range(30):
            loss = difference_loss(model, ex, deltas) if loss_fn == "phase1" else lm_loss(model, ex)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < factor * losses[0], (loss_fn, losses[0], losses[-1])
        assert all(p.grad is None for p in model.decoder.parameters()), "the decoder gets no gradients"


def test_first_token_weight_is_a_weighted_mean_over_answer_tokens():
    model = tiny_model()
    ex = _examples(4)
    prompts, passages = model.prepare([e.question for e in ex], [e.passages for e in ex], "diekae")
    answers = [model.prompter.answer_ids(e.answer, True) for e in ex]
    with torch.no_grad():
        logits, targets = model.answer_logits(prompts, passages, answers)
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        first = torch.tensor([j == 0 for a in answers for j in range(len(a))])
        expected = (3 * nll[first].sum() + nll[~first].sum()) / (3 * first.sum() + (~first).sum())
        torch.testing.assert_close(lm_loss(model, ex, first_token_weight=3.0), expected)
        torch.testing.assert_close(lm_loss(model, ex), nll.mean())
    assert not torch.isclose(nll[first].mean(), nll[~first].mean()), "the weighting is visible here"
    with pytest.raises(ValueError, match="first_token_weight"):
        TrainConfig(first_token_weight=0)


def test_negative_items_are_trained_toward_the_bare_decoder():
    model = tiny_model()
    ex = _examples(4)
    neg = [dataclasses.replace(e, answerable=False) for e in ex[:2]] + ex[2:]
    prompts, passages = model.prepare([e.question for e in ex], [e.passages for e in ex], "diekae")
    answers = [model.prompter.answer_ids(e.answer, True) for e in ex]
    with torch.no_grad():
        logits, targets = model.answer_logits(prompts, passages, answers)
        bare, _ = model.answer_logits(prompts, passages, answers, mode="none")
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        kl = (bare.softmax(-1) * (bare.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)
        on_neg = torch.tensor([i < 2 for i, a in enumerate(answers) for _ in a])
        expected = torch.where(on_neg, kl, nll)
        weights = torch.where(on_neg, 2.0, 1.0)
        torch.testing.assert_close(lm_loss(model, neg, negative_weight=2.0), (expected * weights).sum() / weights.sum())
        assert float(kl[on_neg].min()) > 0, "the injection moves the distribution, so the KL is not zero"
        first = torch.tensor([j == 0 for a in answers for j in range(len(a))])
        kept = torch.where(on_neg & ~first, 0.0, weights)
        torch.testing.assert_close(lm_loss(model, neg, negative_weight=2.0, negative_first_only=True),
                                   (expected * kept).sum() / kept.sum())
    assert not torch.isclose(kl[on_neg].mean(), nll[on_neg].mean()), "the two targets differ here"
    with pytest.raises(ValueError, match="negative_weight"):
        TrainConfig(negative_weight=0)


def test_train_writes_checkpoints_and_resumes(tmp_path):
    model = tiny_model(nonzero=False)
    cfg = TrainConfig(out=str(tmp_path / "run"), data={"fictional": 40, "k": 2}, batch_size=8, epochs=0.5,
                      dev_size=8, eval_every=1, warmup_steps=1, lr=3e-3)
    first = train(cfg, model=model)
    assert first["steps"] == 2
    assert read_config(tmp_path / "run" / "best").layers == model.config.layers
    state = json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["optimizer"]["state"], "optimiser state is saved"
    cfg.epochs = 1.0
    second = train(cfg, model=model)
    assert second["steps"] == 4, "resumed at step 2 and ran to the new total"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4]


def test_trainable_prefixes_train_only_the_named_parameters(tmp_path):
    """trainable ["copy_head."]: only the copy readout's learned head changes; every other encoder
    weight stays as it was. A prefix that names nothing is refused before training."""
    model = tiny_model("llama", layers=[1, 2], per_step=True, pointer_layer=3, pointer_heads=2,
                       passage_isolation=True, pointer_match=True)
    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    cfg = TrainConfig(out=str(tmp_path / "run"), data={"fictional": 24, "k": 2}, batch_size=8, epochs=1,
                      dev_size=8, eval_every=50, warmup_steps=1, lr=1e-2, trainable=["copy_head."])
    train(cfg, model=model)
    for name, p in model.encoder.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == name.startswith("copy_head."), name
    with pytest.raises(ValueError, match="names no encoder parameter"):
        train(TrainConfig(out=str(tmp_path / "bad"), data={"fictional": 24}, dev_size=8, trainable=["nope"]), model=model)


def test_training_copy_settings_are_checked_and_saved(tmp_path):
    """``copy`` sets the readout trained with, and is saved as the checkpoint's copy.json; a config
    written for format-1 checkpoints (copy settings among the encoder fields) is read the same way."""
    from diekae_rag.checkpoint import read_copy_config
    old = TrainConfig(encoder={"pointer_layer": 3, "pointer_bigram_bonus": 3.0, "layers": [1]})
    assert old.copy == {"bigram_bonus": 3.0} and old.encoder == {"pointer_layer": 3, "layers": [1]}
    with pytest.raises(ValueError, match="Unknown copy settings"):
        TrainConfig(copy={"bonus": 1})
    model = tiny_model("llama", layers=[1, 2], per_step=True, pointer_layer=3, passage_isolation=True,
                       pointer_match=True)
    cfg = TrainConfig(out=str(tmp_path / "run"), data={"fictional": 40, "k": 2}, batch_size=8, epochs=0.5,
                      dev_size=8, eval_every=50, warmup_steps=1, copy={"sharpness": 2.0, "continue_bonus": 8.0})
    train(cfg, model=model)
    saved = read_copy_config(tmp_path / "run" / "last")
    assert saved.sharpness == 2.0 and saved.continue_bonus == 8.0
    plain = tiny_model("llama", layers=[1], pointer_layer=3)
    with pytest.raises(ValueError, match="needs the token match"):
        train(TrainConfig(out=str(tmp_path / "bad"), data={"fictional": 16}, copy={"bigram_bonus": 3.0}), model=plain)


DIST_SCRIPT = """
import hashlib, json, os, sys
sys.path.insert(0, {tests!r})
import torch
from conftest import tiny_model
from diekae_rag.training.trainer import TrainConfig, train
torch.set_num_threads(1)
model = tiny_model(nonzero=False)
cfg = TrainConfig(out={out!r}, data={{"fictional": 48, "k": 2}}, batch_size=8, epochs=1.0, dev_size=8,
                  eval_every=2, warmup_steps=1, lr=3e-3)
summary = train(cfg, model=model)
w = torch.cat([p.detach().reshape(-1) for p in model.encoder.parameters()])
with open(os.path.join({out!r}, "rank%s.json" % os.environ.get("RANK", "0")), "w") as fh:
    json.dump({{"sha": hashlib.sha256(w.numpy().tobytes()).hexdigest(), "summary": summary}}, fh)
"""


def test_two_processes_train_one_run_in_step(tmp_path):
    """Data-parallel training through Accelerate (launched with torchrun on the CPU): both
    processes end with the same weights, after the same steps, close to a one-process run."""
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    for name, cmd in (("one", [sys.executable]), ("two", [sys.executable, "-m", "torch.distributed.run",
                                                            "--nproc_per_node", "2"])):
        script = tmp_path / f"{name}.py"
        script.write_text(DIST_SCRIPT.format(tests=tests, out=str(tmp_path / name)))
        done = subprocess.run(cmd + [str(script)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    two = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert two[0]["sha"] == two[1]["sha"], "the processes' encoders stay identical"
    assert two[0]["summary"]["processes"] == 2 and one["summary"]["processes"] == 1
    assert two[0]["summary"]["steps"] == one["summary"]["steps"]
    assert two[0]["summary"]["best_dev"] == pytest.approx(one["summary"]["best_dev"], rel=0.01)
    assert (tmp_path / "two" / "best" / "model.safetensors").exists()


def _saved_per_step_model(tmp_path):
    """A tiny per-step + pointer model saved as decoder (tmp_path/decoder) and encoders (tmp_path/enc)."""
    model = tiny_model("llama", layers=[1, 2], per_step=True, pointer_layer=3)
    model.decoder.save_pretrained(tmp_path / "decoder")
    model.tokenizer.save_pretrained(tmp_path / "decoder")
    model.save_pretrained(tmp_path / "enc")
    return model


def test_init_from_can_move_the_rows_to_other_layers(tmp_path):
    model = _saved_per_step_model(tmp_path)
    cfg = TrainConfig(out=str(tmp_path / "run"), init_from=str(tmp_path / "enc"), decoder=str(tmp_path / "decoder"),
                      encoder={"layers": [0, 1]})
    moved = build_model(cfg)
    assert moved.config.layers == [0, 1]
    assert torch.count_nonzero(moved.encoder.up.weight) == 0, "rows restart from zero at their new layers"
    for name, p in moved.encoder.named_parameters():
        if not name.startswith("up."):
            torch.testing.assert_close(p, model.encoder.state_dict()[name].float(), msg=name)
    with pytest.raises(ValueError, match="not change in number"):
        build_model(TrainConfig(out=str(tmp_path / "run2"), init_from=str(tmp_path / "enc"),
                                decoder=str(tmp_path / "decoder"), encoder={"layers": [0]}))


def test_init_from_can_switch_the_token_match_on(tmp_path):
    """pointer_match added to trained encoders starts at zero weight: the outputs are unchanged."""
    model = _saved_per_step_model(tmp_path)
    cfg = TrainConfig(out=str(tmp_path / "run"), init_from=str(tmp_path / "enc"), decoder=str(tmp_path / "decoder"),
                      encoder={"pointer_match": True})
    matched = build_model(cfg)
    assert matched.config.pointer_match and float(matched.encoder.copy_head.match_weight.detach().abs().sum()) == 0
    q, k = "Who?", ["Ann met Bo. Bo met Cy."]
    want = model.score(q, "Bo", k)
    matched.encoder.eval()
    assert matched.score(q, "Bo", k) == pytest.approx(want, abs=1e-4)
    with torch.no_grad():
        matched.encoder.copy_head.match_weight.fill_(0.5)
    assert matched.score(q, "Bo", k) != pytest.approx(want, abs=1e-3), "the match weight is used"
    matched.save_pretrained(tmp_path / "matched")
    assert read_config(tmp_path / "matched").pointer_match



def test_negatives_leave_out_the_gold_passage_of_that_share_of_items():
    base = DataSpec(fictional=400, k=[1, 3], seed=1).build()
    assert DataSpec(fictional=400, k=[1, 3], seed=1, negatives=0.0).build() == base, "off changes nothing"
    mixed = DataSpec(fictional=400, k=[1, 3], seed=1, negatives=0.3).build()
    holds = [any(ex.answer in p for p in ex.passages) for ex in mixed]
    assert 0.2 < 1 - sum(holds) / len(holds) < 0.4
    assert [ex.question for ex in mixed] == [ex.question for ex in base]
    assert all(len(ex.passages) in (1, 3) for ex in mixed)
    with pytest.raises(ValueError, match="share"):
        DataSpec(fictional=10, negatives=1.5).build()


def test_cut_answer_negatives_keep_the_gold_paragraph_without_its_answer():
    from diekae_rag.data.mixture import without_answer
    p = "Marsul lives in Osk. He is married to Ithpelith Quorne! Calgra is cold."
    assert without_answer(p, "Ithpelith Quorne") == "Marsul lives in Osk. Calgra is cold."
    assert without_answer("Ithpelith Quorne weaves.", "Ithpelith Quorne") is None, "nothing else left"
    assert without_answer(p, "Davrenholt") is None, "no answer to cut"
    base = DataSpec(fictional=400, k=[1, 3], other_facts=(1, 3), seed=1, negatives=0.3).build()
    cut = DataSpec(fictional=400, k=[1, 3], other_facts=(1, 3), seed=1, negatives=0.3, cut_answer=0.5).build()
    assert [ex.question for ex in cut] == [ex.question for ex in base]
    assert not any(ex.answer in p for ex, b in zip(cut, base) for p in ex.passages
                   if not any(ex.answer in q for q in b.passages)), "negatives stay negatives"
    gold = {ex.question: p for ex in DataSpec(fictional=400, k=1, other_facts=(1, 3), seed=1).build() for p in ex.passages}
    trimmed = [ex for ex in cut if any(p == without_answer(gold[ex.question], ex.answer) for p in ex.passages)]
    negatives = [ex for ex in base if not any(ex.answer in p for p in ex.passages)]
    assert 0.3 * len(negatives) < len(trimmed) <= 0.5 * len(negatives) + 10, "about half the negatives keep a cut gold"
    assert all(len(ex.passages) in (1, 3) for ex in cut)


def test_squad_follow_ups_ask_a_second_question_the_passage_answers_or_lacks():
    from diekae_rag.data.fictional import Fact
    from diekae_rag.data.followups import conversation_question, squad_followups
    a = "Calgra was founded by Orvel Tann in 1432. It lies on the Vell."
    b = "The Merrow Guild trades wool. Its hall stands in Darnholt."
    facts = [Fact(a, "Who founded Calgra?", "Orvel Tann", "", "squad", "Calgra"),
             Fact(a, "Which river is Calgra on?", "the Vell", "", "squad", "Calgra"),
             Fact(b, "What does the Merrow Guild trade?", "wool", "", "squad", "Calgra"),
             Fact(b, "Where is the Merrow Guild's hall?", "Darnholt", "", "squad", "Calgra")]
    items = squad_followups(facts, 8, seed=0)
    assert {ex.answerable for ex in items} == {True, False}
    for ex in items:
        (passage,), (q1, a1, q2) = ex.passages, ex.question
        assert a1["content"].rstrip(".") in passage, "turn 1's answer is in the passage"
        assert (ex.answer in passage) == ex.answerable and q2["content"] != q1["content"]
        assert conversation_question(ex.question) == f"{q1['content']} {a1['content']} {q2['content']}"


def test_the_reader_reads_a_conversation_as_the_gate_does():
    """Training joins the turns as serving does (``Prompter.question_text`` with 3 turns)."""
    from diekae_rag.data.followups import conversation_question, make_followups
    model = tiny_model("llama")
    for ex in make_followups(3, seed=5):
        assert conversation_question(ex.question) == model.prompter.question_text(model.prompter.prompt_ids(ex.question), 3)
