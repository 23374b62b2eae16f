"""Mechanics of injection on tiny random decoders (Llama, Mistral, Qwen2)."""

from __future__ import annotations


import pytest
import torch
from conftest import _record_deltas, byte_tokenizer, in_threads, K, Q, tiny_decoder, tiny_model

from diekae_rag import DecoderMismatchError, EncoderConfig, DiekaeModel
from diekae_rag.injection import decoder_layers, injecting

ARCHS = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_encoders_reproduce_plain_logits(arch):
    model = tiny_model(arch, nonzero=False)
    prompts, passages = model.prepare(Q, K, "diekae")
    answers = [model.prompter.answer_ids("Ithpelith"), model.prompter.answer_ids("north")]
    ids, mask = model.prompter.pad([p + a for p, a in zip(prompts, answers)], model.device, side="right")
    inj = model.build_injection(prompts, passages, mask, answers)
    assert inj is not None
    with torch.no_grad():
        plain = model.decoder(input_ids=ids, attention_mask=mask).logits
        with injecting(inj):
            injected = model.decoder(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(injected, plain, atol=1e-5, rtol=0)
    assert model.score(Q[0], "Ithpelith", K[0]) == pytest.approx(model.score(Q[0], "Ithpelith", mode="none"), abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_land_at_chosen_layers_and_prompt_positions_only(arch):
    model = tiny_model(arch)
    calls, handles = _record_deltas(model)
    try:
        model.generate_batch(Q, K, max_new_tokens=3, min_new_tokens=3)
    finally:
        for h in handles:
            h.remove()
    prompts, _ = model.prepare(Q, K, "diekae")
    T = max(len(p) for p in prompts)
    prefill, steps = calls[0], calls[1:]
    assert len(steps) == 2
    for layer, d in prefill.items():
        per_pos = d.abs().sum(-1)  # (B, T)
        if layer in model.config.layers:
            for b, p in enumerate(prompts):
                assert (per_pos[b, T - len(p):] > 0).all(), "every prompt position gets a row"
                assert (per_pos[b, : T - len(p)] == 0).all(), "padding gets nothing"
        else:
            assert (per_pos == 0).all(), f"layer {layer} must get nothing"
    for step in steps:
        assert all((d == 0).all() for d in step.values()), "paper mode: decode steps get nothing"


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_one_by_one(arch):
    model = tiny_model(arch)
    batched = model.generate_batch(Q, K, max_new_tokens=6)
    single = [model.generate(q, k, max_new_tokens=6) for q, k in zip(Q, K)]
    assert batched == single
    scores = model.score_batch(Q, ["Ithpelith", "north"], K)
    alone = [model.score(q, a, k) for q, a, k in zip(Q, ["Ithpelith", "north"], K)]
    assert scores == pytest.approx(alone, abs=1e-4)


def test_injection_changes_outputs_and_modes_differ():
    model = tiny_model("llama")
    s_diekae = model.score(Q[0], "Ithpelith", K[0])
    s_none = model.score(Q[0], "Ithpelith", K[0], mode="none")
    s_ctx = model.score(Q[0], "Ithpelith", K[0], mode="in_context")
    assert s_diekae != pytest.approx(s_none, abs=1e-4)
    assert s_ctx != pytest.approx(s_none, abs=1e-4)


def test_padding_side_does_not_matter():
    model = tiny_model("llama")
    prompts, passages = model.prepare(Q, K, "diekae")
    outs = []
    for side in ("left", "right"):
        ids, mask = model.prompter.pad(prompts, model.device, side=side)
        inj = model.build_injection(prompts, passages, mask)
        with torch.no_grad(), injecting(inj):
            logits = model.decoder(input_ids=ids, attention_mask=mask).logits
        outs.append([logits[b][mask[b].bool()] for b in range(len(Q))])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "enc")
    again = DiekaeModel.from_pretrained(tmp_path / "enc", decoder=model.decoder, tokenizer=model.tokenizer)
    for (k, v), (k2, v2) in zip(model.encoder.state_dict().items(), again.encoder.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert again.config == model.config
    assert again.generate(Q[0], K[0], max_new_tokens=5) == model.generate(Q[0], K[0], max_new_tokens=5)


def test_mismatched_decoder_is_refused(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "enc")
    other = tiny_decoder("llama", layers=6)
    with pytest.raises(DecoderMismatchError, match="trained for decoder"):
        DiekaeModel.from_pretrained(tmp_path / "enc", decoder=other, tokenizer=byte_tokenizer())


def test_config_rejects_layers_the_decoder_lacks():
    with pytest.raises(ValueError, match="do not exist"):
        EncoderConfig(layers=[1, 9]).validate(4)


def test_threads_get_their_own_answers():
    model = tiny_model("llama")
    cases = [(Q[i % 2], K[i % 2] if i % 3 else None, ["diekae", "none", "in_context"][i % 3]) for i in range(8)]
    alone = [model.generate(q, k, mode=m, max_new_tokens=5) for q, k, m in cases]
    got = in_threads(lambda i: model.generate(cases[i][0], cases[i][1], mode=cases[i][2], max_new_tokens=5),
                     len(cases))
    assert got == alone


def test_stream_joins_to_generate():
    model = tiny_model("llama")
    full = model.generate(Q[0], K[0], max_new_tokens=8)
    assert "".join(model.stream(Q[0], K[0], max_new_tokens=8)).strip() == full


def test_exception_inside_call_leaves_no_injection():
    from diekae_rag.injection import _ACTIVE
    model = tiny_model("llama")
    prompts, passages = model.prepare(Q, K, "diekae")
    ids, mask = model.prompter.pad(prompts, model.device)
    with torch.no_grad():
        bare = model.decoder(input_ids=ids, attention_mask=mask).logits  # no injection active: the plain decoder
    with pytest.raises(ValueError):
        model.generate(Q[0], K[0], max_new_tokens=5, num_beams=2)
    inj = model.build_injection(prompts, passages, mask)
    with pytest.raises(RuntimeError, match="Injection rows cover"):
        with injecting(inj):
            model.decoder(input_ids=ids[:, :-1], attention_mask=mask[:, :-1])  # wrong length: refused
    # Checked directly, not through another generate() (which would set the injection itself):
    # nothing is active in this context and the decoder alone gives what it gave before.
    assert _ACTIVE.get() is None
    with torch.no_grad():
        after = model.decoder(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(after, bare)


def test_generation_stops_when_the_model_opens_a_new_chat_turn():
    model = tiny_model("llama")
    tok = model.tokenizer
    turn, h = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("H")
    assert model.prompter.stop_ids == [tok.eos_token_id, turn]
    calls = []

    def force(module, args, logits):  # first token "H", then a new turn instead of <|im_end|>
        logits = logits.clone()
        logits[..., h if not calls else turn] = 1e4
        calls.append(1)
        return logits

    handle = model.decoder.get_output_embeddings().register_forward_hook(force)
    try:
        ids = model._generate_ids(model.prepare([Q[0]], [K[0]], "diekae"), "diekae", 16)[0]
    finally:
        handle.remove()
    assert ids.tolist() == [h, turn], "the answer ends where the next turn would begin"
