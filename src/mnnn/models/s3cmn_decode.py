"""A lean one-token decoder for a trained S3CMN: ``S3CMN.step`` without its per-token copies.

``S3CMN.step`` runs the parallel forward at ``T = 1``: each token it rebuilds Hyena's
``max_len``-long history by concatenation, copies the output memory's whole ring buffer to write
one entry, and builds the masks and candidate lists a segment needs. :class:`S3CMNDecoder` reads
the same weights and keeps its state in place:

* Hyena's long-convolution history is a doubled ring ``[B, 2L, D]`` (each input written at slot
  ``s`` and ``s + L``), so the last ``L`` inputs are always one contiguous slice and a step writes
  two rows instead of copying ``L``;
* the output memory's keys and values are written into their ring slot in place; a step reads
  the filled slots directly (a single position has no segment candidates and no mask);
* S4D's discretisation, Hyena's long filter and the output memory's temperature are computed
  once per weight version (a change to any tensor they come from recomputes them).

``decoder.step(token, state)`` gives ``model.step``'s logits (the output memory's mixture
log-probabilities) to float rounding; ``from_state`` / ``to_state`` convert between the two state
forms, so a context read by the parallel forward (in chunks) continues here and back
(``tests/models/test_s3cmn_decode.py``). It covers the default configuration — output memory, or
no memory — with reads on or switched off (``set_memory_enabled``); a model with the membrane
memory (``memory_fusion='membrane'`` or ``'both'``) or an attached datastore is refused with the
reason. With ``record_stats=True`` the spike counts go into the model's spiking layers as
``model.step`` puts them (the serving engine's spike rate); otherwise it records nothing. A step
without targets records no memory statistics in either path. ``model.step`` stays the reference.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from mnnn.memory.output_cache import _TINY, CacheState
from mnnn.models.s3cmn import S3CMN, S3CMNState
from mnnn.ops.ssm import discretize
from mnnn.state import TensorState

_SQRT_HALF = math.sqrt(0.5)


def decoder_for(model, record_stats: bool = False) -> "S3CMNDecoder | None":
    """The lean decoder of ``model`` where it covers it (an S3CMN with output memory or none and no
    datastore attached), else None: the caller steps ``model`` itself."""
    if not S3CMNDecoder.covers(model):
        return None
    decoder = S3CMNDecoder(model, record_stats)
    return decoder if decoder.usable else None


@dataclasses.dataclass
class DecodeState(TensorState):
    """Updated in place by :meth:`S3CMNDecoder.step` (``clone()`` keeps a copy)."""
    pos: torch.Tensor  # [] tokens read so far
    short: torch.Tensor  # [B, K-1, 3E] Hyena's short-convolution inputs, oldest first
    ring: torch.Tensor  # [B, 2L, E] Hyena's long-convolution inputs, doubled (see the module docstring)
    head: torch.Tensor  # [] ring slot where the next window starts (0 <= head < L)
    ssm: torch.Tensor  # [layers, B, H, N] complex S4D states
    membrane: torch.Tensor  # [layers, B, H]
    keys: torch.Tensor  # [B, M, E] output memory ring (unit keys); [B, 0, E] without one
    values: torch.Tensor  # [B, M] next-token ids
    count: torch.Tensor  # [] entries written (next slot: count % M)
    last_key: torch.Tensor  # [B, E] key of the previous position, waiting for its next token
    has_last: torch.Tensor  # [] 1 once a previous position exists


class S3CMNDecoder:
    """``S3CMNDecoder(model, record_stats=False)``: see the module docstring. ``step(token [B],
    state) -> (logits [B, vocab], state)``; ``init_state(B)``, ``from_state(S3CMNState)``,
    ``to_state(DecodeState)``."""

    def __init__(self, model: S3CMN, record_stats: bool = False):
        if not isinstance(model, S3CMN):
            raise TypeError(f"S3CMNDecoder needs an S3CMN, got {type(model).__name__}")
        if not self.covers(model):
            raise ValueError(f"S3CMNDecoder covers memory_fusion='output' (or no memory); this model has "
                             f"memory_fusion={model.config.memory_fusion!r}: use model.step")
        self.model = model
        self.record_stats = bool(record_stats)
        self._key: tuple | None = None
        self._earlier: dict[int, torch.Tensor] = {}  # k -> [k, k] strictly lower triangle

    @staticmethod
    def covers(model) -> bool:
        """Whether the decoder can run ``model``: an S3CMN whose blocks keep no membrane memory."""
        return isinstance(model, S3CMN) and all(block.memory is None for block in model.blocks)

    @property
    def usable(self) -> bool:
        """False while a datastore is attached to the model's output memory (only ``model.step``
        reads one); attaching or detaching one flips it."""
        om = self.model.output_memory
        return om is None or om.datastore is None

    # ---- derived weights -----------------------------------------------------------------------------
    def _sources(self) -> tuple[torch.Tensor, ...]:
        """The tensors :meth:`_derived` is computed from, read by attribute each call (a replaced
        parameter is seen): S4D's parameters, Hyena's filter network, positions, decay rates and
        short taps, the output memory's temperature. (Walking all of ``model.parameters()`` and
        buffers for the key cost ~84 us a step, about 7 % of it; these ~30 us.)"""
        m = self.model
        hy, om = m.hyena, m.output_memory
        out = [t for block in m.blocks for t in (block.ssm.log_dt, block.ssm.A_re, block.ssm.A_im,
                                                 block.ssm.C_re, block.ssm.C_im)]
        out += [*hy.filter.parameters(), hy.pos, hy.alpha, hy.short.weight]
        if om is not None:
            out.append(om.log_theta)
        return tuple(out)

    def _derived(self) -> dict:
        """S4D's discretised (Abar, Bbar, C) per block, Hyena's reversed long filter and short taps,
        and the output memory's theta: recomputed when one of the tensors they come from changes
        (its version or storage)."""
        m = self.model
        key = tuple((t._version, t.data_ptr()) for t in self._sources())
        if key != self._key:
            with torch.no_grad():
                ssm = []
                for block in m.blocks:
                    s = block.ssm
                    C = torch.complex(s.C_re, s.C_im)
                    Abar, Bbar, C = discretize(s.log_dt, s.A_re, s.A_im, torch.ones_like(C), C)
                    # the input and readout terms in real arithmetic on (re, im) pairs: no complex
                    # promotion of the input, and y = 2 Re(sum_n C_n h_n) as one product and sum
                    ssm.append((Abar, torch.view_as_real(Bbar).contiguous(),
                                torch.stack([2.0 * C.real, -2.0 * C.imag], -1)))
                om = m.output_memory
                self._cache = {"ssm": ssm, "filter": m.hyena.long_filter(reversed_taps=True).clone(),
                               "taps": m.hyena.short.weight[:, 0].t().contiguous(),  # [K, 3E]
                               "theta": om.log_theta.exp() if om is not None else None}
            self._key = key
        return self._cache

    # ---- state ---------------------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> DecodeState:
        return self.from_state(self.model.init_state(batch_size))

    def from_state(self, state: S3CMNState) -> DecodeState:
        """The decoder's form of ``state`` (copies; ``state`` is left as it is)."""
        if not isinstance(state, S3CMNState):
            raise TypeError(f"from_state needs an S3CMNState, got {type(state).__name__}")
        long = state.hyena.long  # [B, L-1, E], oldest first
        B, L = long.shape[0], long.shape[1] + 1
        ring = long.new_zeros(B, 2 * L, long.shape[2])
        ring[:, : L - 1] = long
        ring[:, L: 2 * L - 1] = long
        c = state.cache
        return DecodeState(pos=state.pos.clone(), short=state.hyena.short.clone(), ring=ring,
                           head=torch.zeros((), dtype=torch.long, device=long.device), ssm=state.ssm.clone(),
                           membrane=state.membrane.clone(), keys=c.keys.clone(), values=c.values.clone(),
                           count=c.count.clone(), last_key=c.last_key.clone(), has_last=c.has_last.clone())

    def to_state(self, state: DecodeState) -> S3CMNState:
        """The model's form of ``state`` (copies), e.g. to read on with the parallel forward. The
        membrane memory's pending entries, which a decodable model never writes, come back empty."""
        from mnnn.layers.hyena import HyenaState

        L = state.ring.shape[1] // 2
        h = int(state.head)
        empty = self.model.init_state(state.short.shape[0])
        cache = CacheState(keys=state.keys.clone(), values=state.values.clone(), count=state.count.clone(),
                           last_key=state.last_key.clone(), has_last=state.has_last.clone())
        return S3CMNState(pos=state.pos.clone(),
                          hyena=HyenaState(short=state.short.clone(), long=state.ring[:, h: h + L - 1].clone()),
                          ssm=state.ssm.clone(), membrane=state.membrane.clone(),
                          pending_keys=empty.pending_keys, pending_values=empty.pending_values,
                          pending_count=empty.pending_count, last_keys=empty.last_keys, has_last=empty.has_last,
                          cache=cache)

    # ---- one token -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, token: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, DecodeState]:
        """token ``[B]`` (ids) -> (logits ``[B, vocab]``, state updated in place). The arithmetic
        runs under ``torch.inference_mode`` (~5 % of a step here); the logits come back as an
        ordinary tensor and the state's tensors stay ordinary ones."""
        m, cfg = self.model, self.model.config
        if not isinstance(state, DecodeState):
            raise TypeError(f"state must be a DecodeState (decoder.init_state / from_state), got {type(state).__name__}")
        if token.dim() != 1 or token.dtype not in (torch.long, torch.int32) or token.shape[0] != state.short.shape[0]:
            raise ValueError(f"token must be [{state.short.shape[0]}] integer ids, got {tuple(token.shape)} {token.dtype}")
        if not bool(((token >= 0) & (token < cfg.vocab_size)).all()):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got [{int(token.min())}, {int(token.max())}]")
        if not self.usable:
            raise ValueError("S3CMNDecoder does not read a datastore; detach it or use model.step")
        d = self._derived()
        with torch.inference_mode():
            logits = self._step(token.long(), state, d)
        return logits.clone(), state

    def _step(self, token: torch.Tensor, state: DecodeState, d: dict) -> torch.Tensor:
        m = self.model
        x = F.embedding(token, m.embed.weight)  # [B, E]
        x = self._hyena(F.layer_norm(x, x.shape[-1:], m.ln_in.weight, m.ln_in.bias, m.ln_in.eps), x, state, d)
        for i, block in enumerate(m.blocks):
            Abar, Bbar, C2 = d["ssm"][i]
            u = F.layer_norm(x, x.shape[-1:], block.ln_ssm.weight, block.ln_ssm.bias, block.ln_ssm.eps)
            h = state.ssm[i]
            h.mul_(Abar)
            pairs = torch.view_as_real(h)  # [B, H, N, 2], the same memory
            pairs.add_(Bbar * u[..., None, None])
            y = torch.addcmul((pairs * C2).sum((-2, -1)), block.ssm.D, u)
            # GELU (the exact erf form) written out: F.gelu on one row cost ~25 us of a ~1.2 ms step
            # in the profile, these four ops a few (same values to float rounding)
            g = torch.erf(y * _SQRT_HALF).add_(1.0).mul_(y).mul_(0.5)
            x = x + F.linear(g, block.ssm_out.weight, block.ssm_out.bias)
            q = F.layer_norm(x, x.shape[-1:], block.ln_spk.weight, block.ln_spk.bias, block.ln_spk.eps)
            sp, mem = block.spiking, state.membrane[i]
            current = F.linear(q, sp.fc.weight, sp.fc.bias)
            fired = (mem > sp.threshold).to(current.dtype)
            if sp.reset == "subtract":
                mem.mul_(sp.beta).add_(current).sub_(fired * sp.threshold)
            else:
                mem.mul_(fired.neg_().add_(1.0).mul_(sp.beta)).add_(current)
            spikes = (mem > sp.threshold).to(current.dtype)
            if self.record_stats:
                sp._accumulate(spikes[:, None])
            x = x + F.linear(spikes, block.spk_out.weight, block.spk_out.bias)
        feats = F.linear(F.layer_norm(x, x.shape[-1:], m.ln_out.weight, m.ln_out.bias, m.ln_out.eps),
                         m.down.weight, m.down.bias)
        logits = m._tied_logits(feats)
        state.pos += 1
        om = m.output_memory
        if om is None:
            return logits
        return self._mix(om, feats, token, logits, state, d["theta"])

    def _hyena(self, xn: torch.Tensor, x: torch.Tensor, state: DecodeState, d: dict) -> torch.Tensor:
        """Hyena for one position from its normalised input ``xn``; returns ``up(x + hyena)``."""
        m = self.model
        hy = m.hyena
        p = F.linear(xn, hy.in_proj.weight, hy.in_proj.bias)  # [B, 3E]
        taps = d["taps"]
        K = taps.shape[0]
        u = torch.addcmul(hy.short.bias, p, taps[K - 1])
        for j in range(K - 1):
            u.addcmul_(state.short[:, j], taps[j])
        if K > 1:
            if K > 2:  # (overlapping rows: copied through a temporary)
                state.short[:, :-1] = state.short[:, 1:].clone()
            state.short[:, -1] = p
        q, k, v = u.chunk(3, dim=-1)
        L = state.ring.shape[1] // 2
        h = int(state.head)
        slot = (h - 1) % L  # the window is ring[h : h + L]; its last row is the new input, at slot + L or slot
        z = k * v
        state.ring[:, slot] = z
        state.ring[:, slot + L] = z
        window = state.ring[:, h: h + L]  # [B, L, E], oldest first
        y = q * (window * d["filter"]).sum(1)
        state.head.fill_((h + 1) % L)
        return F.linear(x + F.linear(y, hy.out_proj.weight, hy.out_proj.bias), m.up.weight, m.up.bias)

    def _mix(self, om, feats, token, logits, state: DecodeState, theta) -> torch.Tensor:
        """The output memory's mixture at one position (see :mod:`mnnn.memory.output_cache`)."""
        dt = torch.promote_types(logits.dtype, torch.float32)
        lp = F.log_softmax(logits.to(dt), dim=-1)
        if not om.enabled:
            return lp
        M = om.memory_size
        q = F.normalize(feats.to(dt), dim=-1)
        if int(state.has_last):  # the previous position's key gets this token as its value
            slot = int(state.count) % M
            state.keys[:, slot] = state.last_key
            state.values[:, slot] = token
            state.count += 1
        filled = min(int(state.count), M)
        state.last_key.copy_(q)
        state.has_last.fill_(1)
        if filled == 0:
            return lp
        scores = torch.bmm(state.keys[:, :filled], q[:, :, None])[..., 0]  # [B, filled]
        top, idx = scores.topk(min(om.top_k, filled), dim=-1)
        ids = state.values.gather(1, idx)
        w = torch.softmax(theta * top, dim=-1)
        a = F.linear(feats, om.gate.weight, om.gate.bias).to(dt)  # [B, 1]
        lp.add_(F.logsigmoid(-a))  # (1 - lambda) p_LM
        k = ids.shape[1]
        earlier = self._earlier.get(k)
        if earlier is None or earlier.device != ids.device:
            earlier = self._earlier[k] = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)
        same = ids[:, :, None] == ids[:, None, :]  # an id retrieved twice carries both weights, once
        p_ids = (w[:, None, :] * same).sum(-1)
        first = ~(same & earlier).any(-1)
        b_ids = lp.gather(1, ids)
        at_ids = torch.logaddexp(b_ids, F.logsigmoid(a) + p_ids.clamp_min(_TINY).log())
        return lp.scatter_add_(1, ids, (at_ids - b_ids) * first)
