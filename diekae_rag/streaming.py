"""Streaming generation on a worker thread that stops when nobody reads it any more.

``generate`` runs on a thread and hands text to a ``TextIteratorStreamer``; the caller's generator
yields it. When that generator is closed or dropped (a ``break``, a client that disconnects) an
event flips a stopping criterion, so generation ends within one decode step and the thread exits.
Streams still open when the interpreter exits are stopped the same way, before Python tears its
threads down (a generation thread killed inside a torch op aborts the process).
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from contextvars import ContextVar
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence, TypeVar

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

T = TypeVar("T")


# Set by iterate_in_thread on its worker thread: closing the async iterator ends the generation
# that runs for it at the next decode step, not at the next piece of text.
_CLOSED: ContextVar[Optional[threading.Event]] = ContextVar("diekae_stream_closed", default=None)


class Cancel(StoppingCriteria):
    """Stops every sequence once :meth:`set` is called (or the ``also`` event is set)."""

    def __init__(self, also: Optional[threading.Event] = None) -> None:
        self.event = threading.Event()
        self.also = also

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set() or (self.also is not None and self.also.is_set())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.is_set(), dtype=torch.bool, device=input_ids.device)


_LIVE: dict[int, tuple[Cancel, threading.Thread]] = {}
_LOCK = threading.Lock()


@atexit.register
def _stop_open_streams() -> None:
    with _LOCK:
        live = list(_LIVE.values())
    for cancel, _ in live:
        cancel.set()
    for _, thread in live:
        thread.join(timeout=30)


def live_streams() -> int:
    """How many generation threads are running for streams."""
    with _LOCK:
        return sum(t.is_alive() for _, t in _LIVE.values())


def stop_list(stop, stop_strings=None) -> list[str]:
    """``stop`` and ``stop_strings`` (each a string or a list, as LangChain and transformers give them)
    as one list of non-empty strings."""
    out = []
    for x in (stop, stop_strings):
        out += [x] if isinstance(x, str) else list(x or [])
    return [x for x in out if x]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any ``stop`` string (the stop text itself is dropped)."""
    at = min((i for i in (text.find(x) for x in stop if x) if i >= 0), default=len(text))
    return text[:at]


def held_back(pieces: Iterator[str], stop: Sequence[str]) -> Iterator[str]:
    """``pieces`` with any stop string and what follows it left out: text that could still become the
    start of a stop string is held until the next piece says otherwise."""
    if not stop:
        yield from pieces
        return
    keep = max(len(x) for x in stop) - 1
    text, sent = "", 0
    for piece in pieces:
        text += piece
        cut = cut_at_stop(text, stop)
        if len(cut) < len(text):  # a stop string appeared: send what comes before it and end
            if cut[sent:]:
                yield cut[sent:]
            return
        safe = max(len(text) - keep, sent)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    if text[sent:]:
        yield text[sent:]


def stream_generation(run: Callable[[TextIteratorStreamer, StoppingCriteriaList], object], tokenizer,
                      stopping_criteria=None) -> Iterator[str]:
    """Yield the text that ``run(streamer, criteria)`` generates on a worker thread; ``criteria``
    holds the cancel criterion (and ``stopping_criteria``, when given) and must reach ``generate``."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancel = Cancel(_CLOSED.get())
    criteria = StoppingCriteriaList([cancel, *(stopping_criteria or [])])
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run(streamer, criteria)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=target, daemon=True)
    with _LOCK:
        _LIVE[id(thread)] = (cancel, thread)
    thread.start()
    try:
        for text in streamer:
            if text:
                yield text
    finally:  # also when the consumer stops early: generation ends within one decode step
        cancel.set()
        thread.join()
        with _LOCK:
            _LIVE.pop(id(thread), None)
    if errors:
        raise errors[0]


async def iterate_in_thread(make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Each item of the iterator that ``make()`` returns, as it comes, without blocking the event
    loop: a worker thread runs the iterator and hands items over through an ``asyncio.Queue``.

    Closing the async iterator (``aclose()``, a ``break`` in ``async for``, a cancelled task) closes
    the sync iterator at its next item; for :func:`stream_generation` that ends generation.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    closed = threading.Event()
    end = object()

    def put(item, error=None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop is gone: nobody is reading
            closed.set()

    def pump() -> None:
        _CLOSED.set(closed)
        try:
            it = make()
            try:
                for item in it:
                    if closed.is_set():
                        break
                    put(item)
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # re-raised in the event loop
            put(end, exc)
        else:
            put(end)

    threading.Thread(target=pump, daemon=True).start()
    try:
        while True:
            item, error = await queue.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        closed.set()
