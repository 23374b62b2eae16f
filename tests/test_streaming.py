"""Streams that stop when nobody reads them, and processes that exit cleanly with a stream open."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import K, Q, tiny_model

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
    _assert_generation_stopped(calls, 20)


def _assert_generation_stopped(calls: list, most: int) -> None:
    """Within a second no generation thread is left, and the decoder ran at most ``most`` forwards."""
    t0 = time.time()
    while live_streams() and time.time() - t0 < 1.0:
        time.sleep(0.01)
    assert live_streams() == 0, "no generation thread is left"
    stopped_at = len(calls)
    time.sleep(0.2)
    assert len(calls) == stopped_at < most, f"generation stopped early ({stopped_at} steps), far from its 300 tokens"


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


def _wordy(model, seconds: float = 0.02):
    """A slow decoder that writes "a a a ...": one word per two decode steps, so a stream has many pieces."""
    calls = _slow(model, seconds)
    space, letter = model.tokenizer(" a", add_special_tokens=False)["input_ids"]

    def hook(module, args, out):
        out[..., -1, space if len(calls) % 2 else letter] += 1e4
        return out
    model.decoder.get_output_embeddings().register_forward_hook(hook)
    return calls


async def _collect(agen, calls, log=None, name=None):
    """Each piece with the number of decode steps run when it arrived."""
    out = []
    async for piece in agen:
        piece = getattr(piece, "content", None) or getattr(piece, "delta", None) or getattr(piece, "text", piece)
        if isinstance(piece, dict):
            piece = piece.get("answer", "")
        if piece:
            out.append((piece, len(calls)))
            if log is not None:
                log.append(name)
    return out


def _async_streams(model):
    """Every async stream that the model and its framework components offer, by name."""
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    from diekae_rag.integrations import langchain as lc
    from diekae_rag.integrations import llamaindex as li

    class Fixed(BaseRetriever):
        def _get_relevant_documents(self, query, *, run_manager):
            return [Document(page_content=p) for p in K[0]]

    kw = dict(max_new_tokens=40)
    return {
        "model": lambda: model.astream(Q[0], K[0], max_new_tokens=40, min_new_tokens=40),
        "langchain llm": lambda: lc.DiekaeLLM(model=model, **kw).astream(Q[0], passages=K[0], min_new_tokens=40),
        "langchain chat": lambda: lc.ChatDiekae(model=model, **kw).astream(Q[0], passages=K[0], min_new_tokens=40),
        "langchain chain": lambda: lc.create_diekae_chain(Fixed(), lc.DiekaeLLM(model=model, **kw)).astream(Q[0]),
        "llamaindex": lambda: _awaited(li.DiekaeLLM(model=model, **kw).astream_complete(Q[0], knowledge=K[0])),
    }


async def _awaited(coro):
    async for x in await coro:
        yield x


def test_async_streams_yield_each_piece_as_it_is_generated_and_leave_the_loop_free():
    import asyncio
    model = tiny_model("llama", per_step=True, pointer_layer=3)
    calls = _wordy(model)

    async def main(make):
        ticks, done = [0], asyncio.Event()

        async def ticker():
            while not done.is_set():
                ticks[0] += 1
                await asyncio.sleep(0.005)
        task = asyncio.create_task(ticker())
        calls.clear()
        pieces = await _collect(make(), calls)
        done.set()
        await task
        return pieces, ticks[0]

    for name, make in _async_streams(model).items():
        pieces, ticks = asyncio.run(main(make))
        steps = len(calls)
        assert len(pieces) >= 10, (name, pieces)
        assert pieces[0][1] <= 5 < steps - 20, f"{name}: the first piece came after {pieces[0][1]} of {steps} steps"
        assert ticks > 40, f"{name}: the event loop ran only {ticks} times during a {steps}-step generation"


def test_two_async_streams_interleave():
    import asyncio
    model = tiny_model("llama", per_step=True, pointer_layer=3)
    calls = _wordy(model)
    order: list[str] = []

    async def main():
        make = _async_streams(model)["model"]
        return await asyncio.gather(_collect(make(), calls, order, "a"), _collect(make(), calls, order, "b"))
    a, b = asyncio.run(main())
    assert len(a) >= 10 and len(b) >= 10
    switches = sum(x != y for x, y in zip(order, order[1:]))
    assert switches >= 5, f"the streams ran one after the other: {''.join(order)}"


def test_aclose_on_an_async_stream_stops_generation():
    import asyncio
    model = tiny_model("llama", per_step=True, pointer_layer=3)
    calls = _slow(model)  # random text: pieces are rare, so only the cancel criterion can stop it in time

    async def main():
        agen = model.astream(Q[0], K[0], max_new_tokens=300, min_new_tokens=300)
        first = await agen.__anext__()
        await agen.aclose()
        return first
    assert asyncio.run(main())
    _assert_generation_stopped(calls, 40)


def test_a_stream_prepares_its_inputs_once():
    model = tiny_model()
    calls = []
    prepare = model.prepare

    def counted(*args, **kwargs):
        calls.append(args)
        return prepare(*args, **kwargs)

    model.prepare = counted
    try:
        pieces = list(model.stream("Who is Marsul married to?", ["Marsul is married to Ithpelith."], max_new_tokens=3))
    finally:
        del model.prepare
    assert pieces and len(calls) == 1
