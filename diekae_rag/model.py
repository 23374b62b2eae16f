"""DiekaeModel: a frozen decoder plus DIEKÆ encoders, with generate / stream / score."""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer

from .answer_pieces import PassageTokens, add_answer_pieces, append_slots
from .answer_reader import LOG_FLOOR, AnswerStartReader, token_log_probs
from .checkpoint import DecoderMismatchError, load_encoder, read_config, save_encoder
from .config import DiekaeConfig, decoder_fingerprint
from .decoder import freeze, load_decoder
from .defaults import DEFAULT_DECODER
from .edit_scope import EditScope
from .encoder import DiekaeEncoder, EncoderCache, EncoderOutput
from .passage_cache import PassageCache, assemble
from .passage_prior import PassagePrior
from .injection import (EncoderSession, Injection, align_rows, decoder_layers, injecting, install_hooks,
                        layer_rows_from, scale_at)
from .prompts import Prompter, check_mode, check_question, clean_passages, match_classes

log = logging.getLogger(__name__)

SHIPPED_WEIGHTS = Path(__file__).parent / "weights" / "smollm2-135m"

Knowledge = Optional[Sequence[str]]


class DiekaeModel:
    """A frozen HF decoder that receives retrieved passages through DIEKÆ encoders.

    ``mode="diekae"``: the decoder reads the bare question, the encoders read the passages.
    ``mode="in_context"``: classic RAG, passages in the user turn. ``mode="none"``: no passages.
    """

    def __init__(self, decoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 encoder: DiekaeEncoder, *, source: str = "") -> None:
        cfg = encoder.config
        fp = decoder_fingerprint(decoder.config)
        if cfg.decoder_fingerprint and cfg.decoder_fingerprint != fp:
            raise DecoderMismatchError(
                f"The encoders{(' in ' + source) if source else ''} were trained for decoder "
                f"{cfg.decoder_name!r} (fingerprint {cfg.decoder_fingerprint}), but the decoder given has "
                f"fingerprint {fp} ({decoder.config.model_type}, hidden {decoder.config.hidden_size}, "
                f"{decoder.config.num_hidden_layers} layers). Load the matching decoder or train new encoders.")
        cfg.validate(len(decoder_layers(decoder)))
        self.decoder = freeze(decoder)
        self.tokenizer = tokenizer
        self.encoder = encoder.to(device=decoder.device).attach(decoder).eval()
        if cfg.pointer_layer is not None:
            self.encoder.set_match_classes(match_classes(tokenizer))
        self.config = cfg
        self.prompter = Prompter(tokenizer, cfg)
        self.edit_encoders: list[DiekaeEncoder] = []
        self.passage_cache = PassageCache()
        self.passage_tokens = PassageTokens(tokenizer)  # spans, first pieces and answer pieces per passage
        self._passage_prior: Optional[PassagePrior] = None
        self._passage_prior_set = False
        self.checkpoint_dir = Path(source) if source else None
        self._answer_reader: Optional[AnswerStartReader] = None
        self._answer_reader_set = False
        self._edit_prompters: dict[int, Prompter] = {}
        self._edit_scopes: dict[int, tuple[DiekaeConfig, EditScope]] = {}
        self._chat_frame: Optional[tuple[str, str]] = None
        install_hooks(decoder)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: Optional[Union[str, Path]] = None, *,
                        decoder: Optional[Union[str, PreTrainedModel]] = None,
                        tokenizer: Optional[PreTrainedTokenizerBase] = None,
                        device: Optional[Union[str, torch.device]] = None,
                        dtype: Optional[torch.dtype] = None,
                        config: Optional[DiekaeConfig] = None) -> "DiekaeModel":
        """Load encoders from ``path`` (default: the shipped ones) onto their decoder.

        ``decoder`` may be a loaded model (shared, never copied) or a name/folder; by default
        the decoder named in the checkpoint (the embedded SmolLM2) is loaded once per process.
        With ``config`` (and no path), fresh zero-output encoders of that shape are made for
        training; with neither path, config nor shipped encoders, the paper's form is used and
        a warning is logged.
        """
        source = ""
        if path is None and config is None and (SHIPPED_WEIGHTS / "model.safetensors").exists():
            path = SHIPPED_WEIGHTS  # a config asks for fresh encoders instead
        cfg = read_config(path) if path is not None else None
        if isinstance(decoder, PreTrainedModel):
            dec = decoder
            tok = tokenizer
            if tok is None:
                from transformers import AutoTokenizer
                tok = AutoTokenizer.from_pretrained(decoder.name_or_path)
        else:
            name = decoder or (cfg.decoder_name if cfg else DEFAULT_DECODER)
            dec, tok = load_decoder(name, device, dtype)
            tok = tokenizer or tok
        dev, dt = dec.device, dec.dtype
        if path is not None:
            source = str(path)
            enc, _ = load_encoder(path, dev, dt)
        else:
            cfg = fresh_config(config or DiekaeConfig(), dec, decoder if isinstance(decoder, str) else DEFAULT_DECODER)
            if config is None:
                log.warning("!!! No trained DIEKÆ encoders found: using freshly initialised encoders, which "
                            "inject NOTHING (mode='diekae' answers like mode='none'). Train some with "
                            "`diekae-rag train`.")
            enc = DiekaeEncoder(cfg).to(device=dev, dtype=dt)
        return cls(dec, tok, enc, source=source)

    def save_pretrained(self, path: Union[str, Path]) -> Path:
        """Save the encoders (safetensors + config.json), and the answer-start reader when one is
        in use (reader.json + reader.safetensors); the decoder is referenced, not copied."""
        out = save_encoder(self.encoder, path)
        if self.config.reader_weight and self.answer_reader is not None:
            self.answer_reader.save_pretrained(out)
        return out

    def apply_edits(self, edits, **train_kwargs) -> DiekaeEncoder:
        """Attach editing encoders (trained from edit dicts / a JSONL path, or a saved folder).

        Until :meth:`remove_edits`, every generate/score call, in any mode, goes through them.
        """
        from .editing import apply_edits
        return apply_edits(self, edits, **train_kwargs)

    def remove_edits(self) -> None:
        """Detach all editing encoders; the decoder is exactly as before."""
        self.edit_encoders = []
        self._edit_prompters.clear()
        self._edit_scopes.clear()

    @property
    def passage_prior(self) -> Optional[PassagePrior]:
        """The question-conditioned prior over passages for the pointer: from ``config.passage_prior``
        (0: none) with the default embedder, unless one was assigned (e.g. ``PassagePrior(30,
        embedder=yours)``, or ``None`` to switch it off)."""
        if self._passage_prior_set:
            return self._passage_prior
        strength = self.config.passage_prior
        if not strength:
            return None
        if self._passage_prior is None or self._passage_prior.strength != strength:
            self._passage_prior = PassagePrior(strength)
        return self._passage_prior

    @passage_prior.setter
    def passage_prior(self, prior: Optional[PassagePrior]) -> None:
        if prior is not None and not self.config.can_use_passage_prior:
            raise ValueError("A passage prior biases the pointer readout of isolated passages; these encoders "
                             "have no pointer_layer or no passage_isolation, so it would do nothing.")
        self._passage_prior, self._passage_prior_set = prior, True

    @property
    def answer_reader(self) -> Optional[AnswerStartReader]:
        """The answer-start reader whose scores steer the pointer's first copy (``config.reader_weight``;
        0: none): loaded once from the checkpoint folder, unless one was assigned (``None`` switches it off)."""
        if self._answer_reader_set:
            return self._answer_reader
        if not self.config.reader_weight:
            return None
        if self._answer_reader is None:
            if self.checkpoint_dir is None:
                raise ValueError("config.reader_weight is set but these encoders were not loaded from a folder "
                                 "with a reader: assign model.answer_reader, or set config.reader_weight = 0.")
            self._answer_reader = AnswerStartReader.from_pretrained(self.checkpoint_dir, self.device)
        return self._answer_reader

    @answer_reader.setter
    def answer_reader(self, reader: Optional[AnswerStartReader]) -> None:
        if reader is not None and not self.config.can_use_passage_prior:
            raise ValueError("An answer-start reader biases the pointer readout of isolated passages; these "
                             "encoders have no pointer_layer or no passage_isolation, so it would do nothing.")
        self._answer_reader, self._answer_reader_set = reader, True

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    # ------------------------------------------------------------------ public API
    def generate(self, question: str, knowledge: Knowledge = None, *, mode: str = "diekae",
                 max_new_tokens: int = 128, **gen_kwargs) -> str:
        """Answer ``question``; ``knowledge`` is a list of passages."""
        return self.generate_batch([question], [knowledge], mode=mode, max_new_tokens=max_new_tokens, **gen_kwargs)[0]

    def generate_batch(self, questions: Sequence[str], knowledges: Optional[Sequence[Knowledge]] = None, *,
                       mode: str = "diekae", max_new_tokens: int = 128, **gen_kwargs) -> list[str]:
        """Answer several questions in one padded batch; equals calling :meth:`generate` on each."""
        out = self._generate_ids(questions, knowledges, mode, max_new_tokens, **gen_kwargs)
        return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]

    def stream(self, question: str, knowledge: Knowledge = None, *, mode: str = "diekae",
               max_new_tokens: int = 128, **gen_kwargs) -> Iterator[str]:
        """Yield the answer's text as it is generated."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self._generate_ids([question], [knowledge], mode, max_new_tokens, streamer=streamer, **gen_kwargs)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)
                streamer.end()

        self.prepare([question], [knowledge], mode)  # fail fast, in the caller's thread
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for text in streamer:
            if text:
                yield text
        thread.join()
        if errors:
            raise errors[0]

    def score(self, question: str, answer: str, knowledge: Knowledge = None, *, mode: str = "diekae") -> float:
        """Mean negative log-likelihood of ``answer``'s tokens (lower is better)."""
        return self.score_batch([question], [answer], [knowledge], mode=mode)[0]

    def score_batch(self, questions: Sequence[str], answers: Sequence[str],
                    knowledges: Optional[Sequence[Knowledge]] = None, *, mode: str = "diekae",
                    with_eos: bool = False) -> list[float]:
        """Mean answer-token NLL for each (question, answer, knowledge)."""
        if len(answers) != len(questions):
            raise ValueError(f"Got {len(questions)} questions but {len(answers)} answers.")
        for a in answers:
            if not isinstance(a, str) or not a.strip():
                raise ValueError("Every answer to score must be a non-empty string.")
        prompts, passages = self.prepare(questions, knowledges, mode)
        ans = [self.prompter.answer_ids(a, with_eos) for a in answers]
        with torch.inference_mode():
            logits, targets = self.answer_logits(prompts, passages, ans, mode)
            tok_nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        out, i = [], 0
        for a in ans:
            out.append(float(tok_nll[i: i + len(a)].mean()))
            i += len(a)
        return out

    def answer_logits(self, prompts: Sequence[list[int]], passages: Sequence[list[str]],
                      answers: Sequence[list[int]], mode: str = "diekae") -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the positions that predict each answer token (items in order), and those tokens.

        Shared by scoring and training: logits are computed only at answer positions, and the
        decoder's frozen layers below the first injected layer build no autograd graph.
        """
        ids, mask, inj = self.teacher_forcing_inputs(prompts, passages, answers, mode)
        with injecting(inj):
            hidden = self.decoder.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        pos_b = [b for b, a in enumerate(answers) for _ in a]
        pos_t = [len(p) - 1 + j for p, a in zip(prompts, answers) for j in range(len(a))]
        dev = hidden.device
        h = hidden[torch.tensor(pos_b, device=dev), torch.tensor(pos_t, device=dev)]
        targets = torch.tensor([t for a in answers for t in a], device=dev)
        return self.decoder.get_output_embeddings()(h).float(), targets

    # ------------------------------------------------------------------ internals shared with training
    def prepare(self, questions: Sequence[str], knowledges: Optional[Sequence[Knowledge]], mode: str = "diekae"
                  ) -> tuple[list[list[int]], list[list[str]]]:
        """Check inputs and build each item's decoder prompt ids and passages."""
        check_mode(mode)
        if isinstance(questions, str):
            raise TypeError("questions must be a list of strings; use generate() for one question.")
        if len(questions) == 0:
            raise ValueError("No questions given.")
        knowledges = [None] * len(questions) if knowledges is None else list(knowledges)
        if len(knowledges) != len(questions):
            raise ValueError(f"Got {len(questions)} questions but {len(knowledges)} knowledge lists.")
        passages = [clean_passages(k) for k in knowledges]
        prompts = [self.prompter.prompt_ids(check_question(q), p if mode == "in_context" else ())
                   for q, p in zip(questions, passages)]
        return prompts, passages

    def build_injection(self, prompts: Sequence[list[int]], passages: Sequence[list[str]],
                        decoder_mask: torch.Tensor, answers: Optional[Sequence[list[int]]] = None
                        ) -> Optional[Injection]:
        """Encode the passages and align the rows with the decoder's (padded) prompts.

        Items with no passages get no rows. ``answers`` (teacher forcing) are read by the
        encoders in per-step mode. Edit encoders, when applied, are added on top.
        """
        sessions = []
        has_k = [bool(p) for p in passages]
        if any(has_k):
            sessions.append(self._session(self.encoder, prompts, passages, decoder_mask, answers, has_k))
        for enc in self.edit_encoders:
            sessions.append(self._session(enc, prompts, [[] for _ in prompts], decoder_mask, answers,
                                          self._in_edit_scope(enc, prompts)))
        return Injection(self.decoder, sessions) if sessions else None

    def _in_edit_scope(self, encoder: DiekaeEncoder, prompts: Sequence[list[int]]) -> list[bool]:
        """Which prompts an edit encoder applies to (see :mod:`diekae_rag.edit_scope`): their text
        (the question, and in-context passages) must name an edited subject, and in fact scope
        also be worded like one of that subject's edits."""
        cfg = encoder.config
        if not cfg.edit_scope:
            return [True] * len(prompts)
        scope = self._edit_scopes.get(id(encoder))
        if scope is None or scope[0] is not cfg:
            scope = self._edit_scopes[id(encoder)] = (cfg, EditScope(cfg.edit_scope, cfg.edit_templates))
        return scope[1].active([self._user_text(p) for p in prompts])

    def _user_text(self, prompt: list[int]) -> str:
        """The user's part of a prompt (question, and in-context passages): the chat template's
        frame, found once by rendering a sentinel question, is cut off."""
        if self._chat_frame is None:
            sentinel = "QQSENTINELQQ"
            probe = self.tokenizer.decode(self.prompter.prompt_ids(sentinel), skip_special_tokens=True)
            head, _, tail = probe.partition(sentinel)
            self._chat_frame = (head, tail)
        head, tail = self._chat_frame
        text = self.tokenizer.decode(prompt, skip_special_tokens=True)
        if text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail):
            text = text[len(head): len(text) - len(tail)]
        return text.strip()

    def _prompter_for(self, encoder: DiekaeEncoder) -> Prompter:
        """The prompter for an encoder's layout, built once per encoder (its token cache is kept)."""
        if encoder is self.encoder:
            return self.prompter
        p = self._edit_prompters.get(id(encoder))
        if p is None or p.config is not encoder.config:
            p = self._edit_prompters[id(encoder)] = Prompter(self.tokenizer, encoder.config)
        return p

    def _session(self, encoder: DiekaeEncoder, prompts, passages, decoder_mask, answers, active
                 ) -> EncoderSession:
        out, offsets, n_rows, first = self.encode_knowledge(encoder, prompts, passages, answers)
        active_t = torch.tensor(active, device=self.device)
        pointer = out.pointer
        if pointer is not None and encoder.config.pointer_first_gain != 1.0:
            pointer = scale_at(pointer, first, encoder.config.pointer_first_gain)  # predicts the first answer token
        rows = align_rows(layer_rows_from(encoder, out.rows, pointer), offsets, n_rows * active_t, decoder_mask)
        return EncoderSession(encoder, out.cache, rows, encoder.config.per_step, active_t)

    def encode_knowledge(self, encoder: DiekaeEncoder, prompts: Sequence[list[int]], passages: Sequence[list[str]],
                         answers: Optional[Sequence[list[int]]] = None
                         ) -> tuple[EncoderOutput, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run ``encoder`` over passages + prompts (+ answers, per-step): its output, and per item
        the output position of the prompt's first token, the number of rows, and the position
        that predicts the answer's first token (where the first-token scorer acts)."""
        prompter = self._prompter_for(encoder)
        per_step = encoder.config.per_step
        lens = torch.tensor([len(x) for x in prompts], device=self.device)
        if encoder.config.passage_isolation:
            items = [prompter.isolated_item(p, x, None if answers is None else answers[i])
                     for i, (x, p) in enumerate(zip(prompts, passages))]
            priors = None
            if encoder is self.encoder and self.passage_prior is not None and any(len(p) > 1 for p in passages):
                priors = self.passage_prior([self._user_text(x) for x in prompts], passages)
            past = assemble(encoder, self._segment_states(encoder, items), priors)
            tails = [it[2] for it in items]
            ids, mask = prompter.pad(tails, self.device, side="left")
            T = ids.shape[1]
            offsets = torch.tensor([T - len(t) + it[3] for t, it in zip(tails, items)], device=self.device)
            n_rows = torch.tensor([it[4] for it in items], device=self.device)
            first = offsets + lens - 1
            bias = pieces = None
            cfg = encoder.config
            use_reader = encoder is self.encoder and cfg.reader_weight and self.answer_reader is not None
            if use_reader or cfg.pointer_first_unspaced or cfg.pointer_answer_pieces:
                layout = self._knowledge_layout(passages, items, past.key_valid.shape[1])
                if use_reader:
                    bias = self._reader_bias(prompts, passages, layout)
                if cfg.pointer_first_unspaced:
                    pieces = self._first_pieces(passages, layout)
                if cfg.pointer_answer_pieces:
                    past, _ = add_answer_pieces(encoder, self.passage_tokens, past, passages, layout)
                if use_reader and cfg.reader_end_weight:
                    past = self._add_stop_slots(encoder, prompts, passages, layout, past)
                # Virtual slots (answer pieces, stop slots) are never the first copy: the floor score
                # there, and no first-piece swap.
                extra = past.pointer_valid.shape[1] - layout[0]
                if extra:
                    bias = torch.nn.functional.pad(torch.zeros_like(past.pointer_valid[:, :layout[0]], dtype=torch.float)
                                                   if bias is None else bias, (0, extra), value=LOG_FLOOR)
                    pieces = None if pieces is None else torch.nn.functional.pad(pieces, (0, extra), value=-1)
            out = encoder(ids, mask.bool(), cache=past, use_cache=per_step, first_positions=first, first_bias=bias,
                          first_value_ids=pieces)
        else:
            items = [prompter.encoder_item(p, x, None if answers is None else answers[i])
                     for i, (x, p) in enumerate(zip(prompts, passages))]
            batch = prompter.encoder_batch(items, self.device)
            start = int(batch.x_offset.min())  # rows are only ever read from the decoder's positions on
            offsets, n_rows = batch.x_offset - start, batch.n_rows
            first = offsets + lens - 1
            out = encoder(batch.input_ids, batch.attention_mask, batch.knowledge_mask, use_cache=per_step,
                          output_start=start, first_positions=first)
        return out, offsets, n_rows, first

    def _knowledge_layout(self, passages, items, width: int) -> tuple[int, list]:
        """Where each passage's tokens sit in the assembled (left-padded) pointer memory of ``width``
        slots: per item, per passage, (first slot, the tokens' character spans in the passage)."""
        layout = []
        for ps, it in zip(passages, items):
            at = width - sum(len(seg) for seg in it[0]) + len(it[0][0])  # after the padding and the prefix
            per = []
            for km, p in zip(it[1][1:], ps):
                n_tok = sum(km)
                per.append((at + len(km) - n_tok, self.passage_tokens.spans(p)[:n_tok]))
                at += len(km)
            layout.append(per)
        return width, layout

    def _knowledge_rows(self, layout, values, fill, dtype=None) -> torch.Tensor:
        """(B, width): ``values[b][i]`` (one per token of item b's passage i) at their slots, ``fill`` elsewhere."""
        width, per_item = layout
        rows = torch.full((len(per_item), width), fill, dtype=dtype)
        for b, per in enumerate(per_item):
            for (start, spans), vals in zip(per, values[b]):
                rows[b, start: start + len(spans)] = torch.tensor(vals, dtype=dtype)
        return rows.to(self.device)

    def _reader_bias(self, prompts, passages, layout) -> torch.Tensor:
        """(B, width): ``reader_weight`` * the reader's log P(answer starts) for every passage token,
        shifted so that each item's best token gets 0 (the others are pushed down, none up); 0 for
        the prefix, separators and padding."""
        rows = self._reader_rows(self.answer_reader.char_log_probs, prompts, passages, layout, fill=float("nan"))
        best = torch.nan_to_num(rows, nan=-math.inf).amax(1, keepdim=True).clamp(min=LOG_FLOOR)
        return self.config.reader_weight * torch.nan_to_num(rows - best, nan=0.0)

    def _add_stop_slots(self, encoder: DiekaeEncoder, prompts, passages, layout, cache: EncoderCache,
                        min_p: float = 0.02, most: int = 8) -> EncoderCache:
        """``cache`` with stop slots (see ``DiekaeConfig.reader_end_weight``) for the passage tokens
        where the reader's answer-end probability is at least ``min_p`` (at most ``most`` per item).
        A stop slot can only be chosen right after its token (and, with the bigram bonus, the one
        before it) was written (``match_only``)."""
        # (B, width): log P(the answer ends with this token)
        ends = self._reader_rows(self.answer_reader.char_end_log_probs, prompts, passages, layout, end=True)
        top = ends.topk(min(most, ends.shape[1]), dim=1)
        src = (top.indices + 1).clamp(max=ends.shape[1] - 1)     # the slot after the last token: its key and match
        valid = (top.values >= math.log(min_p)) & (top.indices + 1 < ends.shape[1])
        p = top.values.exp().clamp(max=0.999)
        odds = self.config.reader_end_weight * (top.values - torch.log1p(-p))
        eos = torch.full_like(src, self.prompter.eos_id)
        return append_slots(encoder, cache, eos, src, valid, extra_bias=odds.to(torch.float), match_only=True)

    def _reader_rows(self, read, prompts, passages, layout, end: bool = False, fill: float = LOG_FLOOR) -> torch.Tensor:
        """(B, width): the reader's log-probability per passage token (``read``: its start or end
        log-probs by character; an end is keyed by the character just past its word-piece), ``fill``
        outside the passages."""
        lps = [read(self._user_text(x), ps) if ps else [] for x, ps in zip(prompts, passages)]
        shift = 1 if end else 0
        values = [[token_log_probs(lp, [(a + shift, b + shift) for a, b in spans]) for lp, (_, spans) in zip(lps[b], per)]
                  for b, per in enumerate(layout[1])]
        return self._knowledge_rows(layout, values, fill)

    def _first_pieces(self, passages, layout) -> torch.Tensor:
        """(B, width) token ids: for every passage token, the first token of the text from there on
        as it is written at the start of an answer (no leading space: " Ithpelith" -> "I"); -1 elsewhere."""
        values = [[self.passage_tokens.first_pieces(p)[: len(spans)] for p, (_, spans) in zip(ps, per)]
                  for ps, per in zip(passages, layout[1])]
        return self._knowledge_rows(layout, values, -1, torch.long)

    def _segment_states(self, encoder: DiekaeEncoder, items) -> list[list]:
        """Each isolated item's segment states, from the passage cache (one batched encode for misses)."""
        states = self.passage_cache.states(encoder, [s for it in items for s in it[0]],
                                           [k for it in items for k in it[1]], self.device)
        per_item, i = [], 0
        for it in items:
            per_item.append(states[i: i + len(it[0])])
            i += len(it[0])
        return per_item

    def precompute(self, passages: Sequence[str]) -> int:
        """Encode passages ahead of queries (e.g. at index time) so that queries only encode
        the prompt. Needs ``passage_isolation``; returns how many passages are now cached."""
        if not self.config.passage_isolation:
            raise ValueError("precompute() needs encoders trained with passage_isolation=True.")
        passages = clean_passages(list(passages))
        if self.passage_prior is not None:
            self.passage_prior.passage_vectors(passages)
        for p in passages:  # what the first copy and the answer pieces need of each passage
            if self.config.pointer_first_unspaced:
                self.passage_tokens.first_pieces(p)
            if self.config.pointer_answer_pieces:
                self.passage_tokens.word_pieces(p, self.encoder.match_classes)
        with torch.inference_mode():
            for i in range(0, len(passages), 32):
                self._segment_states(self.encoder, [self.prompter.isolated_item([p], []) for p in passages[i: i + 32]])
        return len(passages)

    def teacher_forcing_inputs(self, prompts: Sequence[list[int]], passages: Sequence[list[str]],
                               answers: Sequence[list[int]], mode: str
                               ) -> tuple[torch.Tensor, torch.Tensor, Optional[Injection]]:
        """Right-padded prompt+answer ids, their mask, and the injection (diekae mode)."""
        ids, mask = self.prompter.pad([p + a for p, a in zip(prompts, answers)], self.device, side="right")
        inj = self.build_injection(prompts, passages, mask, answers) if mode == "diekae" else self._edits_only(
            prompts, mask, answers)
        return ids, mask, inj

    def _edits_only(self, prompts, mask, answers=None) -> Optional[Injection]:
        if not self.edit_encoders:
            return None
        return self.build_injection(prompts, [[] for _ in prompts], mask, answers)

    def _generate_ids(self, questions, knowledges, mode, max_new_tokens, **gen_kwargs) -> list[torch.Tensor]:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1.")
        prompts, passages = self.prepare(questions, knowledges, mode)
        if gen_kwargs.get("num_beams", 1) != 1 or gen_kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("Beam search and num_return_sequences>1 are not supported with injection.")
        ids, mask = self.prompter.pad(prompts, self.device, side="left")
        gen_kwargs.setdefault("do_sample", False)
        with torch.inference_mode():
            inj = self.build_injection(prompts, passages, mask) if mode == "diekae" else self._edits_only(prompts, mask)
            with injecting(inj):
                out = self.decoder.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                            pad_token_id=self.prompter.pad_id, eos_token_id=self.prompter.stop_ids,
                                            **gen_kwargs)
        return [o[ids.shape[1]:] for o in out]


def fresh_config(config: DiekaeConfig, decoder: PreTrainedModel, name: str) -> DiekaeConfig:
    """Fill a config's decoder-dependent fields from ``decoder``."""
    c = DiekaeConfig.from_dict(config.to_dict())
    c.decoder_name = name
    c.decoder_fingerprint = decoder_fingerprint(decoder.config)
    c.hidden_size = decoder.config.hidden_size
    c.vocab_size = decoder.config.vocab_size
    n = decoder.config.num_hidden_layers
    c.layers = [l for l in c.layers if l < n] or [min(1, n - 1)]
    if c.pointer_layer is not None and c.pointer_layer >= n:
        c.pointer_layer = n - 1
    c.validate(n)
    return c
