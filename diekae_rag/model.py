"""DiekaeModel: a frozen decoder plus DIEKÆ encoders, with generate / stream / score."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Mapping, Optional, Sequence, Union

import torch
from transformers import CompileConfig, PreTrainedModel, PreTrainedTokenizerBase

from .checkpoint import check_decoder, fresh_encoder, load_encoder, read_checkpoint, save_encoder
from .config import EncoderConfig
from .copy import CopyConfig
from .decoder import decode_compile_config, decoder_and_tokenizer, freeze
from .defaults import DEFAULT_DECODER
from .edit_scope import EditScopes
from .encoder import DiekaeEncoder
from .injection import Injection, decode_steps, decoder_layers, injecting, install_hooks, thread_safe_kernel_funcs
from .knowledge import FOLLOWUP_READER, CopyPart, Encoded, KnowledgeEncoding, call_gate, encoder_sessions
from .prompts import (Question, Usage, check_answers, check_batch, check_mode, check_question,
                      clean_passages)
from .streaming import cut_at_stop, held_back, iterate_in_thread, stop_list, stream_generation


SHIPPED_WEIGHTS = Path(__file__).parent / "weights" / "smollm2-135m"

Knowledge = Optional[Sequence[str]]
CopyOverride = Union[CopyConfig, Mapping[str, Any], None]


class DiekaeModel:
    """A frozen HF decoder that receives retrieved passages through DIEKÆ encoders.

    ``mode="diekae"``: the decoder reads the bare question, the encoders read the passages.
    ``mode="in_context"``: classic RAG, passages in the user turn. ``mode="none"``: no passages.
    ``copy``: the copy readout's serving settings (``model.copy``; any call may pass ``copy=`` a
    CopyConfig or a dict of the fields to change).
    """

    def __init__(self, decoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 encoder: DiekaeEncoder, *, copy: Optional[CopyConfig] = None, source: str = "") -> None:
        cfg = encoder.config
        check_decoder(cfg, decoder.config, source)
        cfg.validate(len(decoder_layers(decoder)))
        self.decoder = freeze(decoder)
        self.tokenizer = tokenizer
        self.encoder = encoder.to(device=decoder.device).attach(decoder).eval()
        self.config = cfg
        self.copy = copy if copy is not None else CopyConfig.plain().for_encoder(cfg)
        self.copy.check_for(cfg)
        self.knowledge = KnowledgeEncoding(self.decoder, tokenizer, self.encoder, Path(source) if source else None)
        self.prompter = self.knowledge.prompter
        self.edit_encoders: list[DiekaeEncoder] = []
        self.edit_scopes = EditScopes()
        self.decode_compile: Optional[CompileConfig] = None  # see compile_decode()
        self.cache_block = 256
        install_hooks(decoder)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: Optional[Union[str, Path]] = None, *,
                        decoder: Optional[Union[str, PreTrainedModel]] = None,
                        tokenizer: Optional[PreTrainedTokenizerBase] = None,
                        device: Optional[Union[str, torch.device]] = None,
                        dtype: Optional[torch.dtype] = None,
                        config: Optional[EncoderConfig] = None, copy: CopyOverride = None,
                        reader_dtype: Optional[torch.dtype] = None,
                        encoder_dtype: Optional[torch.dtype] = None) -> "DiekaeModel":
        """Load encoders from ``path`` (default: the shipped ones) onto their decoder: a loaded model
        (shared, never copied) or a name/folder, by default the checkpoint's, loaded once per process.
        ``config`` (and no path): fresh zero-output encoders of that shape, for training. ``copy``
        overrides the checkpoint's copy settings. ``reader_dtype``: the answer-start reader's (default:
        :func:`diekae_rag.answer_reader.serving_dtype`); ``encoder_dtype``: the encoders' over the
        question and the decode steps (default: the decoder's; passage states keep the decoder's)."""
        if path is None and config is None and (SHIPPED_WEIGHTS / "model.safetensors").exists():
            path = SHIPPED_WEIGHTS  # a config asks for fresh encoders instead
        cfg, saved = read_checkpoint(path) if path is not None else (None, None)
        dec, tok = decoder_and_tokenizer(decoder, tokenizer, cfg.decoder_name if cfg else DEFAULT_DECODER, device, dtype)
        if path is not None:
            enc, _ = load_encoder(path, dec.device, dec.dtype, config=cfg)
            saved = saved or CopyConfig.plain().for_encoder(enc.config)
        else:
            enc = fresh_encoder(config, dec, decoder if isinstance(decoder, str) else DEFAULT_DECODER)
            saved = CopyConfig.plain().for_encoder(enc.config)
        model = cls(dec, tok, enc, copy=saved.with_overrides(copy), source=str(path or ""))
        model.knowledge.reader_dtype = reader_dtype
        model.knowledge.encoder_dtype = encoder_dtype
        return model

    def save_pretrained(self, path: Union[str, Path]) -> Path:
        """Save the encoders (model.safetensors + config.json), their copy settings (copy.json) and the
        answer-start readers when in use (reader.json + reader.safetensors; the follow-up reader's in
        followups/); the decoder is referenced, not copied."""
        out = save_encoder(self.encoder, path, copy=self.copy)
        if self.copy.reader_weight and self.answer_reader is not None:
            self.answer_reader.save_pretrained(out)
            if self.followup_reader is not None:
                self.followup_reader.save_pretrained(out / FOLLOWUP_READER)
        return out

    def remove_edits(self) -> None:
        """Detach the editing encoders that :func:`diekae_rag.editing.apply_edits` attached."""
        self.edit_encoders = []
        self.edit_scopes.clear()

    # The copy readout's parts (see :class:`~diekae_rag.knowledge.KnowledgeEncoding`); None switches one off.
    passage_prior = CopyPart("A passage prior")
    answer_reader = CopyPart("An answer-start reader")
    followup_reader = CopyPart("A follow-up reader")

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    # ------------------------------------------------------------------ public API
    def generate(self, question: Question, knowledge: Knowledge = None, *, mode: str = "diekae",
                 max_new_tokens: int = 128, copy: CopyOverride = None, stop: Optional[Sequence[str]] = None,
                 **gen_kwargs) -> str:
        """Answer ``question``; ``knowledge`` is a list of passages. Generation ends at any ``stop``
        string, which is not returned."""
        return self.generate_batch([question], [knowledge], mode=mode, max_new_tokens=max_new_tokens, copy=copy,
                                   stop=stop, **gen_kwargs)[0]

    def generate_batch(self, questions: Sequence[Question], knowledges: Optional[Sequence[Knowledge]] = None, *,
                       mode: str = "diekae", max_new_tokens: int = 128, copy: CopyOverride = None,
                       stop: Optional[Sequence[str]] = None, **gen_kwargs) -> list[str]:
        """Answer several questions in one padded batch; equals calling :meth:`generate` on each. Where
        the copy gate closes and ``copy.on_no_answer`` is ``"abstain"``, the answer is ``copy.no_answer_text``."""
        stop = stop_list(stop, gen_kwargs.pop("stop_strings", None))
        out = self._generate_ids(self.prepare(questions, knowledges, mode), mode, max_new_tokens, copy, stop=stop,
                                 **gen_kwargs)
        return [cut_at_stop(self.tokenizer.decode(o, skip_special_tokens=True), stop).strip() if o is not None
                else self.copy.with_overrides(copy).no_answer_text for o in out]

    def stream(self, question: Question, knowledge: Knowledge = None, *, mode: str = "diekae",
               max_new_tokens: int = 128, copy: CopyOverride = None, stop: Optional[Sequence[str]] = None,
               **gen_kwargs) -> Iterator[str]:
        """Yield the answer's text as it is generated, up to any ``stop`` string (not yielded).
        Closing the generator (or breaking out of the loop) stops generation within one decode step."""
        stop = stop_list(stop, gen_kwargs.pop("stop_strings", None))
        prompts, passages = self.prepare([question], [knowledge], mode)  # fail fast, in the caller's thread
        resolved = self._copy(copy)
        gate, abstain = call_gate(self.knowledge, prompts, passages, mode, resolved)
        if abstain[0]:
            yield resolved.no_answer_text
            return
        user = gen_kwargs.pop("stopping_criteria", None)
        yield from held_back(stream_generation(
            lambda streamer, criteria: self._generate_ids((prompts, passages), mode, max_new_tokens, resolved,
                                                          stop=stop, gate=gate, streamer=streamer,
                                                          stopping_criteria=criteria, **gen_kwargs),
            self.tokenizer, user), stop)

    async def astream(self, question: Question, knowledge: Knowledge = None, **kwargs) -> AsyncIterator[str]:
        """:meth:`stream` for asyncio: each piece as it is generated, the event loop free meanwhile.
        ``aclose()`` (or leaving the ``async for``) stops generation."""
        async for piece in iterate_in_thread(lambda: self.stream(question, knowledge, **kwargs)):
            yield piece

    def usage(self, question: Question, knowledge: Knowledge, answer: str, mode: str = "diekae") -> Usage:
        """Token counts of one call: the decoder's prompt, the answer, and the passage tokens that the
        encoders read (in-context passages count as input tokens instead)."""
        prompts, passages = self.prepare([question], [knowledge], mode)
        return self.prompter.usage(prompts[0], passages[0] if mode == "diekae" else [], answer)

    def score(self, question: str, answer: str, knowledge: Knowledge = None, *, mode: str = "diekae",
              copy: CopyOverride = None) -> float:
        """Mean negative log-likelihood of ``answer``'s tokens (lower is better)."""
        return self.score_batch([question], [answer], [knowledge], mode=mode, copy=copy)[0]

    def score_batch(self, questions: Sequence[str], answers: Sequence[str],
                    knowledges: Optional[Sequence[Knowledge]] = None, *, mode: str = "diekae",
                    with_eos: bool = False, copy: CopyOverride = None) -> list[float]:
        """Mean answer-token NLL for each (question, answer, knowledge)."""
        check_answers(questions, answers)
        prompts, passages = self.prepare(questions, knowledges, mode)
        ans = [self.prompter.answer_ids(a, with_eos) for a in answers]
        with torch.inference_mode():
            logits, targets = self.answer_logits(prompts, passages, ans, mode, copy)
            tok_nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        return [float(t.mean()) for t in tok_nll.split([len(a) for a in ans])]

    def answer_logits(self, prompts: Sequence[list[int]], passages: Sequence[list[str]],
                      answers: Sequence[list[int]], mode: str = "diekae", copy: CopyOverride = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the positions that predict each answer token (items in order), and those tokens.

        Shared by scoring and training: logits are computed only at answer positions.
        """
        ids, mask = self.prompter.pad([p + a for p, a in zip(prompts, answers)], self.device, side="right")
        inj = self.build_injection(prompts, passages if mode == "diekae" else [[] for _ in prompts], mask, answers,
                                   copy)
        with injecting(inj):
            hidden = self.decoder.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        pos_b = [b for b, a in enumerate(answers) for _ in a]
        pos_t = [len(p) - 1 + j for p, a in zip(prompts, answers) for j in range(len(a))]
        dev = hidden.device
        h = hidden[torch.tensor(pos_b, device=dev), torch.tensor(pos_t, device=dev)]
        targets = torch.tensor([t for a in answers for t in a], device=dev)
        return self.decoder.get_output_embeddings()(h).float(), targets

    def prepare(self, questions: Sequence[str], knowledges: Optional[Sequence[Knowledge]], mode: str = "diekae"
                ) -> tuple[list[list[int]], list[list[str]]]:
        """Check inputs and build each item's decoder prompt ids and passages."""
        check_mode(mode)
        passages = [clean_passages(k) for k in check_batch(questions, knowledges)]
        prompts = [self.prompter.prompt_ids(check_question(q), p if mode == "in_context" else ())
                   for q, p in zip(questions, passages)]
        return prompts, passages

    def build_injection(self, prompts: Sequence[list[int]], passages: Sequence[list[str]],
                        decoder_mask: torch.Tensor, answers: Optional[Sequence[list[int]]] = None,
                        copy: CopyOverride = None, gate: Optional[Sequence[float]] = None) -> Optional[Injection]:
        """Encode the passages and align the rows with the decoder's (padded) prompts.

        Items with no passages get no rows; ``answers`` (teacher forcing) are read in per-step mode;
        ``gate``: each item's copy-gate strength (computed when None); edit encoders add their own."""
        edits = [(enc, self.in_edit_scope(enc, prompts)) for enc in self.edit_encoders]
        sessions = encoder_sessions(self.knowledge, self.encoder, prompts, passages, decoder_mask, answers,
                                    self._copy(copy), gate, edits)
        return Injection(self.decoder, sessions) if sessions else None

    def gate(self, questions: Sequence[Question], knowledges: Sequence[Knowledge], copy: CopyOverride = None
             ) -> list[bool]:
        """Whether the copy gate lets each item's passages through (True where it cannot close: no
        passages, or the gate off). Where it is False, a diekae call answers as ``mode="none"`` does,
        or abstains."""
        return [s > 0 for s in self.gate_strength(questions, knowledges, copy)]

    def gate_strength(self, questions: Sequence[Question], knowledges: Sequence[Knowledge], copy: CopyOverride = None
                      ) -> list[float]:
        """How far the copy gate opens for each item: 1.0 open, 0.0 closed, in between where
        ``copy.gate_ramp`` half-opens it (what the encoders write is scaled by it)."""
        prompts, passages = self.prepare(questions, knowledges)
        gate, _ = call_gate(self.knowledge, prompts, passages, "diekae", self._copy(copy))
        return [1.0] * len(prompts) if gate is None else gate

    def _copy(self, copy: CopyOverride) -> CopyConfig:
        if copy is None:
            return self.copy
        copy = self.copy.with_overrides(copy)
        copy.check_for(self.config)
        return copy

    def in_edit_scope(self, encoder: DiekaeEncoder, prompts: Sequence[list[int]]) -> list[bool]:
        """Which prompts an edit encoder applies to (see :mod:`diekae_rag.edit_scope`)."""
        return self.edit_scopes.active(encoder.config, [self.prompter.user_text(p) for p in prompts])

    def inspect(self, question: str, knowledge: Knowledge, answer: Optional[str] = None, copy: CopyOverride = None
                ) -> Encoded:
        """What the encoders and the copy readout make of one item, teacher-forced on ``answer``
        (:class:`~diekae_rag.knowledge.Encoded`: the readout's attention and slots, the answer's start)."""
        copy = self.copy.with_overrides(copy)
        prompts, passages = self.prepare([question], [knowledge])
        answers = None if answer is None else [self.prompter.answer_ids(answer, with_eos=True)]
        with torch.inference_mode():
            return self.knowledge.encode(self.encoder, prompts, passages, answers, copy, self.knowledge.providers(copy))

    def compile_decode(self, mode: Optional[str] = None, backend: Optional[str] = "inductor", cache_block: int = 256
                       ) -> "DiekaeModel":
        """Run decode steps through ``torch.compile`` with a static KV cache (see
        :func:`diekae_rag.decoder.decode_compile_config`; the answers are the eager ones). Compiled
        calls on one decoder run one at a time; ``compile_decode(backend=None)`` turns it off."""
        self.decode_compile = decode_compile_config(self.device, mode, backend, cache_block)
        if self.decode_compile is not None:
            thread_safe_kernel_funcs()  # eager calls in other threads may run while this one compiles
            self.cache_block = cache_block
        return self

    def _decode_steps(self, ids: torch.Tensor, max_new_tokens: int, gen_kwargs: dict):
        return decode_steps(self.decoder, self.decode_compile, self.cache_block, ids, max_new_tokens, gen_kwargs)

    def _generate_ids(self, prepared, mode, max_new_tokens, copy=None, stop=(), gate=None, **gen_kwargs
                      ) -> list[Optional[torch.Tensor]]:
        """Each answer's new token ids (None where the gate closed and the model abstains); generation
        ends at a ``stop`` string through transformers' own ``stop_strings``."""
        if stop:
            gen_kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1.")
        prompts, passages = prepared  # from prepare(), once per call
        if gen_kwargs.get("num_beams", 1) != 1 or gen_kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("Beam search and num_return_sequences>1 are not supported with injection.")
        ids, mask = self.prompter.pad(prompts, self.device, side="left")
        gen_kwargs.setdefault("do_sample", False)
        copy = self._copy(copy)
        abstain = [False] * len(prompts)  # a caller that passes the gate has handled abstention
        if gate is None:  # None from call_gate costs nothing: the gate cannot close
            gate, abstain = call_gate(self.knowledge, prompts, passages, mode, copy)
        if all(abstain):
            return [None] * len(prompts)
        with torch.inference_mode():
            inj = self.build_injection(prompts, passages if mode == "diekae" else [[] for _ in prompts], mask,
                                       copy=copy, gate=gate)
            with injecting(inj), self._decode_steps(ids, max_new_tokens, gen_kwargs):
                out = self.decoder.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                            pad_token_id=self.prompter.pad_id, eos_token_id=self.prompter.stop_ids,
                                            **gen_kwargs)
        return [None if a else o[ids.shape[1]:] for o, a in zip(out, abstain)]

