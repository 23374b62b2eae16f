"""The shipped encoders' recipe: a committed chain of training configs, rebuilt by one command."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import byte_tokenizer, tiny_decoder

from diekae_rag.checkpoint import read_config, read_copy_config
from diekae_rag.config import EncoderConfig
from diekae_rag.model import SHIPPED_WEIGHTS
from diekae_rag.training.chain import chain_steps, rebuild

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_chain_uses_committed_inputs_and_ends_in_the_shipped_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    steps, readers, copy, followups = chain_steps("configs/shipped.json", tmp_path)
    assert len(steps) == 6 and steps[0].init_from is None and readers and readers[0].init == ""
    for prev, reader in zip(readers, readers[1:]):
        assert reader.init == prev.out, "each reader step continues the one before it"
    assert len(followups) == 2 and followups[0].init == readers[-1].out and followups[0].teacher == "init", \
        "the follow-up reader continues the shipped reader, and is distilled from it"
    assert followups[1].init == followups[0].out and followups[1].teacher == readers[-1].out, \
        "its second step continues the first, distilled from the shipped reader on single questions"
    assert all(f.conversations for f in followups), "it is trained with conversations"
    for prev, step in zip(steps, steps[1:]):
        assert step.init_from == str(Path(prev.out) / "best"), "each step continues the one before it"
    shape = {}
    for step in steps:  # a later step changes what it names (layers move, the match is switched on)
        shape.update(step.encoder)
    fields = {k: v for k, v in read_config(SHIPPED_WEIGHTS).to_dict().items() if k in EncoderConfig.__dataclass_fields__}
    built = {**EncoderConfig().to_dict(), **shape}
    for key in ("layers", "per_step", "pointer_layer", "pointer_heads", "pointer_match", "passage_isolation", "d_enc",
                "n_blocks", "n_heads"):
        assert built[key] == fields[key], key
    assert copy == read_copy_config(SHIPPED_WEIGHTS)


def test_rebuild_trains_each_step_from_the_last_and_ships_the_result(tmp_path):
    """A two-step chain on a tiny decoder: the second step starts from the first's best checkpoint,
    and the result carries the chain's copy settings."""
    dec_dir = tmp_path / "decoder"
    tiny_decoder().save_pretrained(dec_dir)
    byte_tokenizer().save_pretrained(dec_dir)
    common = {"decoder": str(dec_dir), "data": {"fictional": 24, "k": 2}, "batch_size": 8, "epochs": 0.5, "dev_size": 8,
              "eval_every": 1, "warmup_steps": 1}
    (tmp_path / "1_first.json").write_text(json.dumps({**common, "encoder": {
        "layers": [1], "d_enc": 32, "n_blocks": 1, "n_heads": 2, "per_step": True, "pointer_layer": 3,
        "passage_isolation": True, "system_prompt": ""}}))
    (tmp_path / "2_match.json").write_text(json.dumps({**common, "encoder": {"pointer_match": True}}))
    chain = tmp_path / "chain.json"
    chain.write_text(json.dumps({"steps": [str(tmp_path / "1_first.json"), str(tmp_path / "2_match.json")],
                                 "copy": {"sharpness": 2.0, "bigram_bonus": 3.0}}))
    out = rebuild(chain, tmp_path / "runs")
    assert out == tmp_path / "runs" / "final"
    cfg = read_config(out)
    assert cfg.pointer_match and cfg.layers == [1] and read_copy_config(out).bigram_bonus == 3.0
    first = json.loads((tmp_path / "runs" / "2_match" / "train_config.json").read_text())
    assert first["init_from"] == str(tmp_path / "runs" / "1_first" / "best")


def test_a_reader_step_can_name_an_earlier_reader_step_as_its_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "joint.json").write_text(json.dumps({"max_steps": 1}))
    (tmp_path / "split.json").write_text(json.dumps({"separate_layers": 4, "teacher": "joint"}))
    (tmp_path / "other.json").write_text(json.dumps({"teacher": "some/reader/dir"}))
    chain = tmp_path / "chain.json"
    chain.write_text(json.dumps({"steps": ["configs/shipped/1_perstep_pointer.json"],
                                 "reader": [str(tmp_path / n) for n in ("joint.json", "split.json", "other.json")]}))
    readers = chain_steps(chain, tmp_path / "runs").readers
    assert readers[1].teacher == readers[0].out == str(tmp_path / "runs" / "joint")
    assert readers[1].init == readers[0].out and readers[1].separate_layers == 4
    assert readers[2].teacher == "some/reader/dir", "a path that names no step stays a path"
