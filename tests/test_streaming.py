"""Streams that stop when nobody reads them, and processes that exit cleanly with a stream open."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import tiny_model
from test_engine import K, Q

from diekae_rag.streaming import live_streams

TESTS = Path(__file__).resolve().parent


def _slow(model, seconds: float = 0.02):
    """A decoder that takes ``seconds`` per forward, counting its forwards."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(1)
        time.sleep(seconds)
    model.decoder.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_breaking_out_of_a_stream_stops_generation():
    model = tiny_model("llama", per_step=True, pointer_layer=3)
    calls = _slow(model)
    for piece in model.stream(Q[0], K[0], max_new_tokens=300, min_new_tokens=300):
        assert piece
        break
    t0 = time.time()
    while live_streams() and time.time() - t0 < 1.0:
        time.sleep(0.01)
    assert live_streams() == 0, "no generation thread is left"
    stopped_at = len(calls)
    time.sleep(0.2)
    assert len(calls) == stopped_at < 20, "generation stopped within a step, far from its 300 tokens"


def test_a_process_with_an_abandoned_stream_exits_cleanly():
    script = f"""
import sys, time
sys.path.insert(0, {str(TESTS)!r})
from conftest import tiny_model
model = tiny_model("llama", per_step=True, pointer_layer=3)
model.decoder.get_decoder().register_forward_pre_hook(lambda m, a, k: time.sleep(0.02), with_kwargs=True)
s = model.stream("Who is Marsul married to?", ["Marsul is married to Ithpelith."], max_new_tokens=400,
                 min_new_tokens=400)
print(next(iter(s)) != "", flush=True)
"""
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True" and time.time() - t0 < 60


def test_stop_strings_end_generation_and_are_not_returned():
    from diekae_rag.integrations.langchain import DiekaeLLM
    model = tiny_model("llama", per_step=True, pointer_layer=3)
    calls = _slow(model, 0.0)
    full = model.generate(Q[0], K[0], max_new_tokens=40, min_new_tokens=40)
    full_steps = len(calls)
    stop = next(full[i: i + 3] for i in range(8, 30) if all(32 < ord(c) < 127 for c in full[i: i + 3]))
    want = full[: full.index(stop)].strip()
    calls.clear()
    got = model.generate(Q[0], K[0], max_new_tokens=40, min_new_tokens=40, stop=[stop])
    assert got == want and stop not in got
    assert len(calls) < full_steps - 5, "generation ended at the stop string, not at max_new_tokens"
    assert "".join(model.stream(Q[0], K[0], max_new_tokens=40, min_new_tokens=40, stop=[stop])).strip() == want
    assert model.generate_batch([Q[0]], [K[0]], max_new_tokens=40, min_new_tokens=40, stop_strings=stop) == [want]
    llm = DiekaeLLM(model=model, max_new_tokens=40)
    assert llm.invoke(Q[0], stop=[stop], passages=K[0], min_new_tokens=40) in (want, full[: full.index(stop)])


def test_held_back_text_never_shows_a_stop_string():
    from diekae_rag.streaming import held_back
    assert "".join(held_back(iter(["Ans", "wer: Ith", "pel", "ith\\nQ", "uestion: x"]), ["\\nQuestion:"])) == "Answer: Ithpelith"
    assert "".join(held_back(iter(["a", "b", "c"]), [])) == "abc"
    assert list(held_back(iter(["ab", "cd"]), ["zz"])) == ["a", "bc", "d"]
