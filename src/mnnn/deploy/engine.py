"""Inference over a trained token LM: prompt read in bounded chunks, token-by-token sampling from the
recurrent state, and sessions that keep a conversation's state between requests.

A memory-native model's whole history lives in its fixed-size state (S3CMN: Hyena and S4D states,
membranes and the output memory's ring buffer; Text-Native SSMN: window caches and fast weights),
so a follow-up turn in a session costs only its own tokens. Models without a recurrent state
(the Transformer baseline) keep their token history instead and re-read up to ``max_context``
tokens per step, which is what a stateless server does.

Because stream == chunks == steps for every mnnn model, a session that read ``P1``, generated
``G1`` and then reads ``P2`` is in the same state as a fresh session given ``P1 + G1 + P2``; the
``serve`` benchmark checks exactly that before it times anything.

An S3CMN (output memory or none, no datastore attached) generates through its lean decoder
(:class:`mnnn.models.s3cmn_decode.S3CMNDecoder`, which records its spike counts as ``step`` does):
the prompt is read by the parallel forward, the session's state converted once into the
decoder's form for the generated tokens and back when the next prompt arrives.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from mnnn.models.lm_baselines import NoState
from mnnn.models.s3cmn_decode import DecodeState, S3CMNDecoder
from mnnn.sampling import check_sampling, sample_token

PREFILL_CHUNK = 256  # prompt positions per forward: bounds the [T, vocab] logits of a long prompt


@dataclasses.dataclass
class Session:
    """What a conversation keeps between requests. ``state``: the model's recurrent state after
    every token seen (None before the first); ``context``: the token history (stateless models
    only, at most ``max_context`` ids); ``logits``: next-token logits after the last token seen."""

    state: Any = None
    context: list[int] = dataclasses.field(default_factory=list)
    logits: torch.Tensor | None = None
    tokens_seen: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)


class InferenceEngine:
    """Runs one model for many callers. Every forward holds ``self.lock`` (one model, shared
    threads), one token at a time, so concurrent generations interleave token by token.

    ``model``: an mnnn token LM (``forward(tokens [B, T], state) -> (logits, state)``,
    ``init_state``); ``tokenizer``: a ``tokenizers`` tokenizer (None: ids only);
    ``max_context``: history a stateless model re-reads (default: its ``max_len``)."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, max_context: int | None = None):
        if not hasattr(model, "init_state"):
            raise TypeError(f"expected an mnnn token language model with init_state, got {type(model).__name__}")
        if hasattr(model, "cmr"):
            raise ValueError("serving a CMR model is not supported: its memory holds the segments a stream has "
                             "read, and the engine re-reads a session's context window instead of keeping its "
                             "segments, so the memory would never be read. Serve its base checkpoint "
                             "(model.base) instead")
        stores = [b for b in getattr(model, "blocks", []) if getattr(b, "memory", None) is not None]
        if stores and getattr(model, "memory_enabled", True):
            raise ValueError("this model keeps its episodic stores in module buffers (memory_fusion 'membrane' or "
                             "'both'), shared by every caller: sessions could read each other's memory. Serve a "
                             "model with memory_fusion='output' (its memory lives in the per-session state)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.lock = threading.RLock()
        self.stateful = not isinstance(model.init_state(1), NoState)
        # (built even while a datastore is attached: _advance steps the model while one is)
        self.decoder = S3CMNDecoder(model, record_stats=True) if S3CMNDecoder.covers(model) else None
        self.max_context = int(max_context or getattr(model, "max_len", 512))
        from mnnn.lm import vocab_size  # the model's vocab_size, else its token embedding's rows

        self.vocab_size = vocab_size(model)
        self._scores_targets = hasattr(model, "token_nll")
        self.prompt_nll = 0.0  # NLL of every prompt token after the first, since start (monitoring)
        self.prompt_tokens = 0
        if hasattr(model, "reset_stats"):
            model.reset_stats()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- text ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: send prompt_ids instead of a text prompt")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def check_ids(self, ids, name: str = "prompt_ids") -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TypeError(f"{name} must be a list of ints, got {type(ids).__name__}")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{name} must be token ids in [0, {self.vocab_size}), got {bad[0]}")
        return list(ids)

    # ---- reading -------------------------------------------------------------------------------
    @torch.no_grad()
    def read(self, session: Session, ids: list[int]) -> Session:
        """Advance ``session`` over ``ids`` (at least one): prompt positions in chunks of
        ``PREFILL_CHUNK``; the NLL of each token that had a prediction is added to the monitor."""
        if not ids:
            return session
        if not self.stateful:
            return self._read_stateless(session, ids)
        state = session.state if session.state is not None else self.model.init_state(1)
        if isinstance(state, DecodeState):  # left by a generation: back to the model's form
            state = self.decoder.to_state(state)
        nll, scored, logits = 0.0, 0, session.logits
        with self.lock:
            for start in range(0, len(ids), PREFILL_CHUNK):
                chunk = torch.tensor([ids[start:start + PREFILL_CHUNK]], device=self.device)
                if logits is not None:  # the previous position's prediction of this chunk's first token
                    nll -= float(F.log_softmax(logits.double(), -1)[chunk[0, 0]])
                    scored += 1
                if self._scores_targets and chunk.shape[1] > 1:
                    # targets path: the model's own statistics (memory hit rate) see these positions
                    out = self.model.token_nll(chunk[:, :-1], chunk[:, 1:], state)
                    nll += float(out[0].double().sum())
                    scored += chunk.shape[1] - 1
                    state = out[-1]
                    step_logits, state = self.model(chunk[:, -1:], state)
                    logits = step_logits[0, -1]
                else:
                    out_logits, state = self.model(chunk, state)
                    lp = F.log_softmax(out_logits[0, :-1].double(), -1)
                    nll -= float(lp.gather(-1, chunk[0, 1:, None]).sum())
                    scored += chunk.shape[1] - 1
                    logits = out_logits[0, -1]
            self.prompt_nll += nll
            self.prompt_tokens += scored
        session.state, session.logits = state, logits
        session.tokens_seen += len(ids)
        return session

    def _read_stateless(self, session: Session, ids: list[int]) -> Session:
        context = (session.context + list(ids))[-self.max_context:]
        with self.lock:
            logits, _ = self.model(torch.tensor([context], device=self.device), self.model.init_state(1))
            new = min(len(ids), len(context))
            lp = F.log_softmax(logits[0, -new:-1].double(), -1) if new > 1 else None
            if lp is not None:
                targets = torch.tensor(context[-new + 1:], device=self.device)
                self.prompt_nll -= float(lp.gather(-1, targets[:, None]).sum())
                self.prompt_tokens += new - 1
        session.context, session.logits = context, logits[0, -1]
        session.tokens_seen += len(ids)
        return session

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, session: Session, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, keep_state: bool = False) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` sampled ids after what ``session`` has read. With
        ``keep_state`` every generated token is read into the session too (a follow-up turn
        continues after it); otherwise the last one is not fed back (one step saved)."""
        check_sampling(temperature, top_k, top_p)
        if session.logits is None:
            raise ValueError("nothing to continue: the prompt is empty and the session has read nothing")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(2**31, (1,))))
        for i in range(max_new_tokens):
            token = sample_token(session.logits.cpu(), temperature, top_k, top_p, gen)
            if keep_state or i < max_new_tokens - 1:
                self._advance(session, token)
            yield token

    @torch.no_grad()
    def _advance(self, session: Session, token: int) -> None:
        if not self.stateful:
            self._read_stateless(session, [token])
            return
        with self.lock:
            state = session.state
            if self.decoder is not None and self.decoder.usable:
                if not isinstance(state, DecodeState):
                    state = self.decoder.from_state(state)
                logits, session.state = self.decoder.step(torch.tensor([token], device=self.device), state)
                session.logits = logits[0]
            else:
                if isinstance(state, DecodeState):  # (a datastore attached since the last token)
                    state = self.decoder.to_state(state)
                logits, session.state = self.model(torch.tensor([[token]], device=self.device), state)
                session.logits = logits[0, -1]
        session.tokens_seen += 1

    # ---- monitoring ----------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Since start: prompt perplexity (tokens the model had a prediction for), and the model's
        own statistics where it has them (spike rate, memory hit rate beside its chance level)."""
        out = {"prompt_tokens_scored": float(self.prompt_tokens),
               "prompt_perplexity": math.exp(self.prompt_nll / self.prompt_tokens) if self.prompt_tokens else float("nan")}
        if hasattr(self.model, "get_stats"):
            with self.lock:
                s = self.model.get_stats()
            for key in ("spike_rate", "memory_hit_rate", "memory_hit_rate_chance"):
                if isinstance(s.get(key), (int, float)):
                    out[key] = float(s[key])
        return out


class SessionStore:
    """Sessions by id, least recently used evicted past ``max_sessions``. Thread-safe."""

    def __init__(self, max_sessions: int = 64):
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"max_sessions must be a positive int, got {max_sessions!r}")
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def get_or_create(self, session_id: str) -> tuple[Session, bool]:
        with self._lock:
            if session_id in self._sessions:
                self._sessions.move_to_end(session_id)
                return self._sessions[session_id], False
            session = Session()
            self._sessions[session_id] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
                self.evictions += 1
            return session, True

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                self._sessions.move_to_end(session_id)
            return session

    def delete(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions
