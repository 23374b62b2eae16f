"""Knowledge for one call: the encoders read the passages and the question, the copy readout reads
its memory, and their rows are aligned with the decoder's positions.

    passages -> segment states (passage_cache, cached) -> trunk over the question (encoder)
             -> copy memory + score providers (copy) -> rows on decoder positions (injection)
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from .answer_reader import AnswerStartReader, serving_dtype
from .copy import CopyConfig, CopyMemory, CopyReadout, KnowledgeLayout, PassagePrior, ReaderScores, ScoreProvider
from .copy.providers import FollowupsRead, GivenAnswersSkipped, NearPassagesRead
from .copy.gate import gate_strengths
from .copy.pieces import PassageTokens, add_answer_pieces, first_piece_ids
from .copy.values import ValueRows
from .encoder import DiekaeEncoder, EncoderOutput
from .injection import EncoderSession, align_rows, layer_rows_from
from .keys import reader_key, segment_key, text_key, tokens_key
from .passage_cache import PassageCache, assemble, weights_version
from .prompts import Prompter, clean_passages, match_classes

FOLLOWUP_READER = "followups"  # the checkpoint's subfolder holding the reader of questions with earlier turns


@dataclass
class Encoded:
    """One encoder's reading of a call: its trunk output, the copy rows and readout (with a pointer),
    the token ids at its output positions, per item the output position of the prompt's first
    token, the number of rows, and the position that predicts the answer's first token, and the
    encoders that continue from ``out.cache`` (the decode steps')."""

    out: EncoderOutput
    ids: torch.Tensor
    pointer: Optional[torch.Tensor]
    readout: Optional[CopyReadout]
    offsets: torch.Tensor
    n_rows: torch.Tensor
    first: torch.Tensor
    stepper: DiekaeEncoder


class KnowledgeEncoding:
    """What the encoders of one decoder share across calls: passage states, passage token facts,
    match classes, value rows, a prompter per encoder layout, and the copy's score providers (the
    passage prior, and the answer-start readers saved in ``reader_dir``, loaded on first use: the one
    for every question, and the one for questions read with earlier turns in ``reader_dir/followups``)."""

    def __init__(self, decoder: torch.nn.Module, tokenizer, main: DiekaeEncoder,
                 reader_dir: Optional[Path] = None) -> None:
        self.device = decoder.device
        self.passage_cache = PassageCache()
        self.passage_tokens = PassageTokens(tokenizer)
        self.classes = match_classes(tokenizer).to(self.device)
        self.values = ValueRows(decoder)
        self.tokenizer = tokenizer
        self.main = main
        self.prompter = Prompter(tokenizer, main.config, getattr(decoder.config, "max_position_embeddings", None))
        self._prompters: dict[int, Prompter] = {}
        self.passage_prior: Optional[ScoreProvider] = PassagePrior()
        self.reader_dir = reader_dir
        self._reader: Optional[AnswerStartReader] = None
        self._reader_set = False
        self._followup_reader: Optional[AnswerStartReader] = None
        self._followup_reader_set = False
        self.reader_dtype: Optional[torch.dtype] = None  # the loaded reader's dtype (None: serving_dtype)
        self.encoder_dtype: Optional[torch.dtype] = None  # the encoders' dtype over the question (None: their own)
        self._served: tuple = (None, None)  # (key, the encoder as it serves), see served()
        self._served_lock = threading.Lock()
        self.state_store = None  # the PassageStateStore attached (attach_store)

    @property
    def answer_reader(self) -> Optional[AnswerStartReader]:
        if not self._reader_set and self._reader is None:
            if self.reader_dir is None or not (self.reader_dir / "reader.json").exists():
                return None
            self._reader = self._load_reader(self.reader_dir)
        return self._reader

    @answer_reader.setter
    def answer_reader(self, reader: Optional[AnswerStartReader]) -> None:
        self._reader, self._reader_set = self._with_store(reader), True

    @property
    def followup_reader(self) -> Optional[AnswerStartReader]:
        if not self._followup_reader_set and self._followup_reader is None:
            folder = None if self.reader_dir is None else self.reader_dir / FOLLOWUP_READER
            if folder is None or not (folder / "reader.json").exists():
                return None
            self._followup_reader = self._load_reader(folder)
        return self._followup_reader

    @followup_reader.setter
    def followup_reader(self, reader: Optional[AnswerStartReader]) -> None:
        self._followup_reader, self._followup_reader_set = self._with_store(reader), True

    def _load_reader(self, folder: Path) -> AnswerStartReader:
        reader = AnswerStartReader.from_pretrained(folder, self.device)
        return self._with_store(reader.serve_in(self.reader_dtype or serving_dtype(self.device)))

    def attach_store(self, store, encoder: DiekaeEncoder) -> None:
        """Read what ``store`` holds before computing it: passage states (behind the memory cache),
        the passage prior's vectors and, for a reader with separate layers, its passage sides.
        ``None`` detaches the store."""
        self.state_store = store
        self.passage_cache.attach(store, encoder)
        if hasattr(self.passage_prior, "stored"):
            self.passage_prior.stored = None if store is None else store.vectors
        self.passage_tokens.stored = None if store is None else store.passage_tokens
        self._with_store(self._reader)  # a reader not loaded yet gets the store when it is
        self._with_store(self._followup_reader)

    def _with_store(self, reader: Optional[AnswerStartReader]) -> Optional[AnswerStartReader]:
        if getattr(reader, "separate", 0):  # any reader with char_log_probs works; only a split one reads sides
            reader.use_store(self.state_store)
        return reader

    def providers(self, copy: CopyConfig) -> list[ScoreProvider]:
        """The question-aware slot scores ``copy`` switches on (see :mod:`diekae_rag.copy.providers`)."""
        out: list[ScoreProvider] = []
        if copy.passage_prior and self.passage_prior is not None:
            out.append(self.passage_prior)
        if copy.reader_weight:
            if self.answer_reader is None:
                raise ValueError("copy.reader_weight is set but these encoders have no answer-start reader: "
                                 "assign model.answer_reader, or pass copy={'reader_weight': 0}.")
            out.append(ReaderScores(self.reader_for(copy)))
        return out

    def reader_for(self, copy: CopyConfig, reader: Optional[AnswerStartReader] = None):
        """The answer-start reader (default: :attr:`answer_reader`) as ``copy`` reads with it: every
        passage, or with ``reader_margin`` only those near the question
        (:class:`~diekae_rag.copy.providers.NearPassagesRead`; it needs the passage embedder's cosines,
        so without one it reads every passage)."""
        reader, prior = self.answer_reader if reader is None else reader, self._embedding_prior()
        if reader is None or not copy.reader_margin or prior is None:
            return reader
        return NearPassagesRead(reader, lambda q, ps: prior.cosines([q], [list(ps)])[0], copy.reader_margin)

    def turns_reader(self, reader, given: dict[str, list[str]], copy: CopyConfig):
        """``reader`` (as :meth:`reader_for` gives it) for questions read with earlier turns (``given``,
        from :meth:`questions`): those go to :attr:`followup_reader` where there is one, and the starts
        of the answers already given are taken out
        (:class:`~diekae_rag.copy.providers.GivenAnswersSkipped`)."""
        if reader is None or not given:
            return reader
        if self.followup_reader is not None:
            reader = FollowupsRead(reader, self.reader_for(copy, self.followup_reader), given)
        return GivenAnswersSkipped(reader, given)

    def served(self, encoder: DiekaeEncoder) -> DiekaeEncoder:
        """``encoder`` as it reads the question and takes the decode steps: cast to :attr:`encoder_dtype`
        where that is set and differs (a copy, made again when the weights change). The passages' states
        are ``encoder``'s own either way, so stored states serve both; training uses ``encoder``."""
        dtype = self.encoder_dtype
        if dtype is None or dtype == encoder.dtype or encoder.training or torch.is_grad_enabled():
            return encoder
        key = (id(encoder), weights_version(encoder), dtype)
        with self._served_lock:
            if self._served[0] != key:
                self._served = (key, encoder.served_in(dtype))
            return self._served[1]

    def prompter_for(self, encoder: DiekaeEncoder) -> Prompter:
        """The prompter for an encoder's layout, built once per encoder (its token cache is kept)."""
        if encoder.config is self.main.config:  # the main encoders, or their copy in another dtype
            return self.prompter
        p = self._prompters.get(id(encoder))
        if p is None or p.config is not encoder.config:
            p = self._prompters[id(encoder)] = Prompter(self.tokenizer, encoder.config)
        return p

    def gate(self, prompts: Sequence[list[int]], passages: Sequence[list[str]], copy: CopyConfig) -> list[float]:
        """How far each item's passages get through the copy gate, 1.0 open to 0.0 closed
        (:mod:`diekae_rag.copy.gate`)."""
        if not copy.gated:
            return [1.0] * len(prompts)
        held = [self.prompter.held(ps) for ps in passages]
        questions, given = self.questions(prompts, copy, held)
        reader = self.turns_reader(self.reader_for(copy), given, copy) if copy.reader_gated else None
        return gate_strengths(questions, held, copy, self._embedding_prior(), reader)

    def questions(self, prompts: Sequence[list[int]], copy: CopyConfig,
                  held: Optional[Sequence[list[str]]] = None) -> tuple[list[str], dict[str, list[str]]]:
        """Each prompt's question as the prior, the reader and the gate read it (``copy.question_turns``;
        with ``copy.alone_first``, the last user turn alone where the reader finds its answer in the
        ``held`` passages), and for those read with earlier turns, the answers those turns gave."""
        alone = self.reader_for(copy) if copy.alone_first and held is not None else None
        questions, given = [], {}
        for i, x in enumerate(prompts):
            turns = self.prompter.question_turns(x, copy.question_turns)
            if len(turns) > 1 and alone is not None and held[i] and \
                    math.exp(alone.no_answer_log_prob(turns[-1], held[i], copy.gate_nulls)) <= copy.alone_first:
                turns = turns[-1:]
            questions.append(" ".join(turns))
            if len(turns) > 1:
                given[questions[-1]] = turns[-2::-2]
        return questions, given

    def separate_reader(self, copy: CopyConfig) -> Optional[AnswerStartReader]:
        """The answer-start reader when ``copy`` uses it and its passage side can be kept apart."""
        if not (copy.reader_weight or copy.reader_gated):
            return None
        reader = self.answer_reader
        return reader if getattr(reader, "separate", 0) else None

    def _embedding_prior(self) -> Optional[PassagePrior]:
        """The passage prior when it is the sentence-embedding one (whose vectors can be cached)."""
        return self.passage_prior if isinstance(self.passage_prior, PassagePrior) else None

    def session(self, encoder: DiekaeEncoder, prompts, passages, decoder_mask: torch.Tensor, answers,
                active: Sequence[float], copy: CopyConfig, providers: Sequence[ScoreProvider] = ()) -> EncoderSession:
        """The encoder's session for one call: its rows on the decoder's positions, and what its
        decode steps need. Each item's rows are scaled by its ``active`` (True/1: as written,
        False/0: none, in between: the copy gate's half-open strength)."""
        enc = self.encode(encoder, prompts, passages, answers, copy, providers)
        scale = torch.tensor([float(a) for a in active], device=self.device)
        rows = layer_rows_from(encoder.config, enc.out.rows, enc.pointer)
        rows = align_rows(rows, enc.offsets, enc.n_rows * (scale > 0), decoder_mask)
        if bool((scale < 1).any()):
            rows = {layer: r * scale[:, None, None].to(r.dtype) for layer, r in rows.items()}
        return EncoderSession(enc.stepper, enc.out.cache, rows, encoder.config.per_step, scale, enc.readout)

    def encode(self, encoder: DiekaeEncoder, prompts: Sequence[list[int]], passages: Sequence[list[str]],
               answers: Optional[Sequence[list[int]]] = None, copy: Optional[CopyConfig] = None,
               providers: Sequence[ScoreProvider] = ()) -> Encoded:
        """Run ``encoder`` over passages + prompts (+ answers, per-step) and its copy readout over them."""
        copy = copy or CopyConfig.plain()
        if encoder.config.passage_isolation:
            return self._encode_isolated(encoder, prompts, passages, answers, copy, providers)
        return self._encode_joint(encoder, prompts, passages, answers, copy)

    def _readout(self, encoder: DiekaeEncoder, memory: CopyMemory, copy: CopyConfig) -> CopyReadout:
        return CopyReadout(encoder.copy_head, memory, copy, self.classes, self.values, encoder.config.pointer_match_scale)

    def _value_rows(self, ids: torch.Tensor, copy: CopyConfig, encoder: DiekaeEncoder) -> torch.Tensor:
        return self.values.rows(ids, copy.whitened_values, encoder.dtype)

    def _encode_joint(self, encoder, prompts, passages, answers, copy) -> Encoded:
        """Passages and prompt in one sequence (the paper's layout)."""
        prompter = self.prompter_for(encoder)
        items = [prompter.encoder_item(p, x, None if answers is None else answers[i])
                 for i, (x, p) in enumerate(zip(prompts, passages))]
        batch = prompter.encoder_batch(items, self.device)
        start = int(batch.x_offset.min())  # rows are only ever read from the decoder's positions on
        offsets, n_rows = batch.x_offset - start, batch.n_rows
        first = offsets + torch.tensor([len(x) for x in prompts], device=self.device) - 1
        out = encoder(batch.input_ids, batch.attention_mask, use_cache=encoder.config.per_step, output_start=start)
        pointer = readout = None
        if encoder.copy_head is not None:
            ids = batch.input_ids
            valid = batch.knowledge_mask & batch.attention_mask
            memory = CopyMemory.build(encoder.copy_head.keys(out.states), ids, valid, self.classes,
                                      self._value_rows(ids, copy, encoder), encoder.config.pointer_match)
            valid = valid.clone()
            valid[:, 0] = False
            readout = self._readout(encoder, replace(memory, valid=valid), copy)
            pointer = readout(out.states[:, start:], ids[:, start:], ids[:, start - 1] if start > 0 else None, first)
        return Encoded(out, batch.input_ids[:, start:], pointer, readout, offsets, n_rows, first, encoder)

    def _encode_isolated(self, encoder, prompts, passages, answers, copy, providers) -> Encoded:
        """Each passage encoded on its own (cached), then only the tail runs through the encoders."""
        prompter = self.prompter_for(encoder)
        items = [prompter.isolated_item(p, x, None if answers is None else answers[i])
                 for i, (x, p) in enumerate(zip(prompts, passages))]
        tails = [it.tail for it in items]
        ids, mask = prompter.pad(tails, self.device, side="left")
        wholes = [prompter.whole_segments(p) for p in passages]  # passages the budget cuts: heads of stored states
        served = self.served(encoder)  # reads the question; the passages' states are encoder's
        past = assemble(self.segment_states(encoder, items, wholes), room=ids.shape[1] + 64,  # the tail and decode steps
                        dtype=served.dtype)
        T = ids.shape[1]
        offsets = torch.tensor([T - len(t) + it.x_offset for t, it in zip(tails, items)], device=self.device)
        n_rows = torch.tensor([it.rows for it in items], device=self.device)
        first = offsets + torch.tensor([len(x) for x in prompts], device=self.device) - 1
        out = served(ids, mask.bool(), cache=past.cache, use_cache=encoder.config.per_step)
        pointer = readout = None
        if encoder.copy_head is not None:
            memory = self.memory(served, items, prompts, passages, past, copy, providers)
            readout = self._readout(served, memory, copy)
            pointer = readout(out.states, ids, None, first)
        return Encoded(out, ids, pointer, readout, offsets, n_rows, first, served)

    def memory(self, encoder, items, prompts, passages, past, copy: CopyConfig,
               providers: Sequence[ScoreProvider]) -> CopyMemory:
        """The copy memory of isolated passages: a slot per knowledge token, the providers' scores,
        first pieces and answer pieces as ``copy`` asks."""
        memory = CopyMemory.build(past.keys, past.ids, past.knowledge, self.classes,
                                  self._value_rows(past.ids, copy, encoder), encoder.config.pointer_match)
        self.passage_tokens.fetch([p for ps in passages for p in ps], self.classes)  # indexed texts: not tokenised again
        layout = KnowledgeLayout.of([it.segments for it in items], [it.knowledge_masks for it in items], self.passage_tokens.spans,
                                    passages, memory.width)
        held = [self.prompter_for(encoder).held(ps) for ps in passages]
        questions, given = self.questions(prompts, copy, held)
        for provider in providers:
            if given and isinstance(provider, ReaderScores):
                provider = ReaderScores(self.turns_reader(provider.reader, given, copy))
            scores = provider.slot_scores(questions, held, layout, copy, self.device)
            if scores is not None:
                field = "first_bias" if provider.at_first else "prior"
                memory = replace(memory, **{field: scores})
        if copy.first_unspaced:
            memory = replace(memory, first_ids=first_piece_ids(self.passage_tokens, passages, layout, self.device))
        if copy.answer_pieces:
            memory = add_answer_pieces(memory, self.passage_tokens, self.classes,
                                       lambda ids: self._value_rows(ids, copy, encoder), passages, layout)
        return memory

    def segment_states(self, encoder: DiekaeEncoder, items, wholes: Optional[Sequence[list]] = None) -> list[list]:
        """Each isolated item's segment states, from the passage cache (one batched encode for misses);
        ``wholes``: per item, :meth:`Prompter.whole_segments` (a cut passage's states are then the head
        of its whole segment's, where those are kept or stored)."""
        states = self.passage_cache.states(encoder, [s for it in items for s in it.segments],
                                           [k for it in items for k in it.knowledge_masks], self.device,
                                           None if wholes is None else [w for ws in wholes for w in ws])
        per_item, i = [], 0
        for it in items:
            per_item.append(states[i: i + len(it.segments)])
            i += len(it.segments)
        return per_item

    def store_states(self, passages: Sequence[str], store, copy: CopyConfig, batch_size: int = 32,
                     shard_segments: int = 1024, progress: bool = True, vectors: Optional[dict] = None) -> int:
        """Encode the passages whose segments ``store`` lacks and write their states to it (a shard
        per ``shard_segments``), with the passage prior's vectors of the passages (taken from
        ``vectors`` where given), the answer reader's passage sides and what the copy needs of their
        tokens (:class:`~diekae_rag.copy.pieces.TokenRecord`); returns how many segments were added."""
        from tqdm import tqdm

        from .passage_cache import encode_segments
        segs: dict[str, tuple] = {}
        passages = clean_passages(list(passages))
        missing = [p for p in dict.fromkeys(passages) if tokens_key(p) not in store]
        tokens = {p: self.passage_tokens.record(p, self.classes)  # written with the first states below
                  for p in tqdm(missing, desc="passage tokens", disable=not progress or len(missing) < 256)}
        prior = self._embedding_prior()
        if prior is not None and (copy.passage_prior or copy.gate_cosine):
            missing = [p for p in passages if text_key(p) not in store]
            known = vectors or {}
            for i in range(0, len(missing), 256):
                part = missing[i: i + 256]
                store.add({}, {**prior.passage_vectors([p for p in part if p not in known]),
                               **{p: known[p] for p in part if p in known}})
        reader = self.separate_reader(copy)
        if reader is not None:
            fingerprint = reader.fingerprint()
            missing = [p for p in passages if reader_key(p, fingerprint) not in store]
            with torch.inference_mode():
                for i in tqdm(range(0, len(missing), 64), desc="reader passage sides", disable=not progress or not missing):
                    part = missing[i: i + 64]
                    store.add({}, sides=reader.passage_sides(part), reader=fingerprint)
        for p in passages:
            segments, kmasks, *_ = self.prompter.isolated_item([p], [])
            for s, k in zip(segments, kmasks):
                key = segment_key(s, k)
                if key not in store and key not in segs:
                    segs[key] = (s, k)
        todo, added, pending = list(segs.items()), 0, {}
        with torch.inference_mode():
            for i in tqdm(range(0, len(todo), batch_size), desc="passage states", disable=not progress or not todo):
                part = todo[i: i + batch_size]
                states = encode_segments(self.main, [s for _, (s, _) in part], [k for _, (_, k) in part], self.device)
                pending.update(zip([key for key, _ in part], states))
                if len(pending) >= shard_segments:
                    added += store.add(pending, tokens=tokens)
                    pending, tokens = {}, {}
        return added + store.add(pending, tokens=tokens)

    def precompute(self, passages: Sequence[str], copy: CopyConfig) -> int:
        """Encode passages ahead of queries (e.g. at index time), with what the copy needs of them."""
        passages = clean_passages(list(passages))
        prior = self._embedding_prior()
        if prior is not None and (copy.passage_prior or copy.gate_cosine):
            prior.passage_vectors(passages)
        for p in passages:
            if copy.first_unspaced:
                self.passage_tokens.first_pieces(p)
            if copy.answer_pieces:
                self.passage_tokens.word_pieces(p, self.classes)
        with torch.inference_mode():
            reader = self.separate_reader(copy)
            if reader is not None:
                reader.passage_sides(passages)
            for i in range(0, len(passages), 32):
                self.segment_states(self.main, [self.prompter.isolated_item([p], []) for p in passages[i: i + 32]])
        return len(passages)


class CopyPart:
    """A part of the copy readout that :class:`KnowledgeEncoding` holds, read and assigned on the model:
    the passage prior (which passage the question is about, strength ``copy.passage_prior``; the
    retriever's MiniLM by default), the answer-start reader (where the first copy starts, weight
    ``copy.reader_weight``) and the follow-up reader (questions read with earlier turns). Readers load
    once from the checkpoint folder unless one is assigned. Assigning one to encoders without an
    isolated copy readout is refused, as it would do nothing."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model: Optional[object], owner: type):
        return self if model is None else getattr(model.knowledge, self.name)

    def __set__(self, model, part) -> None:
        cfg = model.config
        if part is not None and not (cfg.pointer_layer is not None and cfg.passage_isolation):
            raise ValueError(f"{self.what} biases the copy readout of isolated passages; these encoders have no "
                             "pointer_layer or no passage_isolation, so it would do nothing.")
        setattr(model.knowledge, self.name, part)


def call_gate(knowledge: KnowledgeEncoding, prompts, passages, mode: str, copy: CopyConfig
              ) -> tuple[Optional[list[float]], list[bool]]:
    """The copy gate's strengths in a diekae call (None when it cannot close), and which items get
    ``copy.no_answer_text`` instead of an answer: knowledge given, the gate closed, abstention on."""
    if mode != "diekae" or not copy.gated or not any(passages):
        return None, [False] * len(prompts)
    gate = knowledge.gate(prompts, passages, copy)
    abstain = copy.on_no_answer == "abstain"
    return gate, [abstain and bool(p) and g <= 0 for p, g in zip(passages, gate)]


def encoder_sessions(knowledge: KnowledgeEncoding, encoder: DiekaeEncoder, prompts, passages, decoder_mask,
                     answers, copy: CopyConfig, gate: Optional[Sequence[float]], edits: Sequence[tuple]) -> list:
    """The sessions of one call: the encoders' over the passages the gate lets through (each item's
    rows scaled by its gate strength; computed when ``gate`` is None), then each edit encoder's over
    the items in its scope (``edits``: (encoder, in scope per item))."""
    if gate is None and any(passages):
        gate = knowledge.gate(prompts, passages, copy)
    if gate is not None:  # the gate: where it closes, the item gets no knowledge (exactly mode="none")
        passages = [p if g > 0 else [] for p, g in zip(passages, gate)]
    strength = gate if gate is not None else [1.0] * len(passages)
    has_k = [float(g) if p else 0.0 for p, g in zip(passages, strength)]  # each item's scale
    sessions = []
    if any(has_k):
        sessions.append(knowledge.session(encoder, prompts, passages, decoder_mask, answers, has_k, copy,
                                          knowledge.providers(copy)))
    for enc, in_scope in edits:
        sessions.append(knowledge.session(enc, prompts, [[] for _ in prompts], decoder_mask, answers, in_scope, copy))
    return sessions
