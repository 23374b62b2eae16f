"""Two configs: EncoderConfig (pinned to the weights) and CopyConfig (serving settings, per call)."""

from __future__ import annotations

import json

import pytest
from conftest import K, Q, tiny_model

from diekae_rag import CopyConfig, DiekaeModel
from diekae_rag.checkpoint import CheckpointError, read_config, read_copy_config
from diekae_rag.config import migrate


def _model():
    return tiny_model("llama", layers=[1, 2], per_step=True, pointer_layer=3, pointer_heads=2, passage_isolation=True,
                      pointer_match=True, bigram_bonus=3.0, sharpness=2.0)


def test_copy_config_defaults_are_the_shipped_settings_and_plain_is_the_trained_readout():
    shipped = json.loads((__import__("diekae_rag").model.SHIPPED_WEIGHTS / "copy.json").read_text())
    assert CopyConfig().to_dict() == pytest.approx(shipped)
    plain = CopyConfig.plain()
    assert (plain.gain_scale, plain.sharpness, plain.continue_bonus, plain.answer_pieces) == (100.0, 1.0, 0.0, False)
    with pytest.raises(ValueError, match="Unknown copy settings"):
        CopyConfig().replace(sharpnes=2)
    with pytest.raises(ValueError, match="must be true or false"):
        CopyConfig(answer_pieces="false")


def test_per_call_copy_overrides_change_that_call_only():
    model = _model()
    base = model.generate(Q[1], K[1], max_new_tokens=6)
    nll = model.score(Q[1], "north", K[1])
    other = model.score(Q[1], "north", K[1], copy={"sharpness": 1.0, "bigram_bonus": 0.0})
    assert other != pytest.approx(nll, abs=1e-6), "the override reaches the readout"
    assert model.score(Q[1], "north", K[1], copy=model.copy) == nll
    assert model.generate(Q[1], K[1], max_new_tokens=6) == base and model.copy.sharpness == 2.0, "nothing is kept"
    with pytest.raises(ValueError, match="reader_weight needs a pointer over isolated passages"):
        tiny_model("llama", per_step=True, pointer_layer=3).generate(Q[0], K[0], copy={"reader_weight": 1.0})
    with pytest.raises(TypeError, match="copy= takes a CopyConfig or a dict"):
        model.generate(Q[0], K[0], copy=["sharpness"])


def test_checkpoint_keeps_both_configs_and_copy_json_is_the_file_to_edit(tmp_path):
    model = _model()
    path = model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "config.json", "copy.json"}
    assert read_copy_config(path) == model.copy and read_config(path) == model.config
    copy = json.loads((path / "copy.json").read_text())
    (path / "copy.json").write_text(json.dumps({**copy, "sharpness": 5.0}))
    again = DiekaeModel.from_pretrained(path, decoder=model.decoder, tokenizer=model.tokenizer)
    assert again.copy.sharpness == 5.0, "editing copy.json changes the serving settings"
    assert DiekaeModel.from_pretrained(path, decoder=model.decoder, tokenizer=model.tokenizer,
                                       copy={"sharpness": 1.5}).copy.sharpness == 1.5
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "pointer_heads": 4}))
    with pytest.raises(CheckpointError, match="differs from the config saved with the weights.*pointer_heads"):
        read_config(path)


def test_format1_configs_migrate_and_retired_keys_load_only_off():
    old = {"format_version": 1, "layers": [1], "pointer_layer": 3, "pointer_match": True, "passage_isolation": True,
           "pointer_sharpness": 2.0, "pointer_continue_bonus": 8, "pointer_answer_pieces": True,
           "pointer_piece_keys": "both", "pointer_first_scorer": 0, "reader_end_weight": 0.0, "question_first": False}
    enc, copy = migrate(old)
    assert enc.format_version == 2 and enc.layers == [1] and enc.pointer_match
    assert copy == CopyConfig.plain().replace(sharpness=2.0, continue_bonus=8, answer_pieces=True)
    for key, on in (("pointer_first_scorer", 16), ("reader_end_weight", 1.0), ("question_first", True)):
        with pytest.raises(ValueError, match=f"sets {key}, but .* removed"):
            migrate({**old, key: on})
    with pytest.raises(ValueError, match="'covering' key"):
        migrate({**old, "pointer_piece_keys": "covering"})
    assert migrate({**old, "pointer_answer_pieces": False, "pointer_piece_keys": "covering"})[1].answer_pieces is False
    with pytest.raises(ValueError, match="copy settings belong in copy.json"):
        migrate({"format_version": 2, "layers": [1], "pointer_sharpness": 2.0})
    with pytest.raises(ValueError, match="newer than supported"):
        migrate({"format_version": 3})
