"""The recurrent step as a graph with plain tensors in and out, for ``torch.export`` and ONNX.

``model.step(token, state)`` reads Python integers from its state (positions, counts), branches on
them and keeps statistics: right for training and serving, but a tracer cannot follow it. A
:class:`StepGraph` computes the same step from the same parameters with fixed shapes and no
data-dependent control flow::

    forward(token [B] int64, *state) -> (logits [B, vocab], *new_state)

Every state tensor has a fixed size: S4D's complex state is carried as real and imaginary parts,
Hyena's long convolution is a dot product of its filter with the last ``max_len - 1`` inputs, and
the episodic output memory is its ring buffer of ``memory_size`` keys and next-token ids with a
count (a slot is written at ``count % memory_size``; slots at or past ``count`` are masked out of
the read). The loop over tokens stays outside, in the caller (onnxruntime, a C++ runtime, ...).
``names`` and :meth:`init_state` give the state's layout; the tests check the graph against
``model.step`` over 256 steps.

Covered: S3CMN with the output memory (``memory_fusion='output'``) or no memory, the Text-Native
SSMN (window ring of rotated keys, fast weights of every plasticity rule) and the LSTM. The
membrane fusion's store (top-k over a growing per-stream index with pending writes) and the
Transformer (no fixed-size state) are not: :func:`step_graph` says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnnn.layers.rotary import rotate
from mnnn.ops.ssm import discretize

_TINY = 1e-30  # as in mnnn.memory.output_cache: log(p_mem) where no candidate holds the token


class StepGraph(nn.Module):
    """Base: ``names`` of the state tensors (in order), ``init_state(batch_size)``, ``forward``."""

    names: tuple[str, ...] = ()
    vocab_size: int

    def init_state(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def run(self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...] | None = None):
        """Reference loop in PyTorch: tokens ``[B, T]`` -> (logits ``[B, T, vocab]``, state)."""
        state = self.init_state(tokens.shape[0]) if state is None else state
        outs = []
        for t in range(tokens.shape[1]):
            logits, *state = self(tokens[:, t], *state)
            outs.append(logits)
        return torch.stack(outs, 1), tuple(state)


class S3CMNStep(StepGraph):
    """One S3CMN step (output memory or none); ``memory=False`` is the memory-off switch (the
    same weights; the ring is carried unchanged)."""

    def __init__(self, model, memory: bool = True):
        super().__init__()
        cfg = model.config
        if any(b.memory is not None for b in model.blocks):
            raise ValueError("step export covers S3CMN with memory_fusion='output' (the default) or no memory; "
                             f"this model has memory_fusion={cfg.memory_fusion!r}, whose per-stream store has no "
                             "fixed-size graph form yet")
        self.m, self.vocab_size = model, cfg.vocab_size
        self.memory = bool(memory) and model.output_memory is not None and model.memory_enabled
        hy = model.hyena
        with torch.no_grad():
            self.register_buffer("long_filter", hy.long_filter().flip(0).clone(), persistent=False)  # [L, E]: h_{L-1..0}
            self.register_buffer("short_w", hy.short.weight[:, 0, :].T.clone(), persistent=False)  # [K, 3E]
            ab_re, ab_im, bb_re, bb_im, c_re, c_im = [], [], [], [], [], []
            for block in model.blocks:
                s = block.ssm
                Abar, Bbar, C = discretize(s.log_dt, s.A_re, s.A_im, torch.ones_like(s.C_re), torch.complex(s.C_re, s.C_im))
                for lst, z in ((ab_re, Abar.real), (ab_im, Abar.imag), (bb_re, Bbar.real), (bb_im, Bbar.imag),
                               (c_re, C.real), (c_im, C.imag)):
                    lst.append(z.float())
            for name, lst in (("ab_re", ab_re), ("ab_im", ab_im), ("bb_re", bb_re), ("bb_im", bb_im),
                              ("c_re", c_re), ("c_im", c_im)):
                self.register_buffer(name, torch.stack(lst).clone(), persistent=False)  # [layers, H, N]
        self.names = ("hyena_short", "hyena_long", "ssm_re", "ssm_im", "membrane", "mem_keys", "mem_values",
                      "mem_count", "mem_last_key", "mem_has_last")

    def init_state(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        st = self.m.init_state(batch_size)
        c = st.cache
        return (st.hyena.short, st.hyena.long, st.ssm.real.contiguous(), st.ssm.imag.contiguous(), st.membrane,
                c.keys, c.values, c.count, c.last_key, c.has_last)

    def forward(self, token, hyena_short, hyena_long, ssm_re, ssm_im, membrane, mem_keys, mem_values, mem_count,
                mem_last_key, mem_has_last):
        m = self.m
        x = m.embed(token)  # [B, E]
        # Hyena: short causal convolution over the last K projected inputs, long one over the last max_len
        hy = m.hyena
        p = torch.cat([hyena_short, hy.in_proj(m.ln_in(x))[:, None]], dim=1)  # [B, K, 3E]
        u = (p * self.short_w).sum(1) + hy.short.bias
        q, k, v = u.chunk(3, dim=-1)
        z = k * v
        hist = torch.cat([hyena_long, z[:, None]], dim=1)  # [B, L, E], oldest first
        x = m.up(x + hy.out_proj(q * (hist * self.long_filter).sum(1)))
        new_re, new_im, new_u = [], [], []
        for i, block in enumerate(m.blocks):
            # S4D on real pairs: h = Abar h + Bbar u, y = 2 Re(C h) + D u
            s_in = block.ln_ssm(x)
            hr, hi = ssm_re[i], ssm_im[i]  # [B, H, N]
            ar, ai = self.ab_re[i], self.ab_im[i]
            hr, hi = ar * hr - ai * hi + self.bb_re[i] * s_in[..., None], ar * hi + ai * hr + self.bb_im[i] * s_in[..., None]
            y = 2.0 * (self.c_re[i] * hr - self.c_im[i] * hi).sum(-1) + block.ssm.D * s_in
            new_re.append(hr)
            new_im.append(hi)
            x = x + block.ssm_out(F.gelu(y))
            # LIF (subtract reset): u = beta u + I - H(u_prev - thr) thr; s = H(u - thr)
            sp = block.spiking
            current = sp.fc(block.ln_spk(x))
            fired = (membrane[i] > sp.threshold).to(current.dtype)
            if sp.reset == "subtract":
                u_new = sp.beta * membrane[i] + current - fired * sp.threshold
            else:
                u_new = sp.beta * (1.0 - fired) * membrane[i] + current
            new_u.append(u_new)
            x = x + block.spk_out((u_new > sp.threshold).to(current.dtype))
        feats = m.down(m.ln_out(x))
        logits = m.head(feats)
        core = (p[:, 1:], hist[:, 1:], torch.stack(new_re), torch.stack(new_im), torch.stack(new_u))
        if m.output_memory is None:
            return (logits, *core, mem_keys, mem_values, mem_count, mem_last_key, mem_has_last)
        lp_lm = F.log_softmax(logits, dim=-1)
        if not self.memory:
            return (lp_lm, *core, mem_keys, mem_values, mem_count, mem_last_key, mem_has_last)
        om = m.output_memory
        M = om.memory_size
        qn = F.normalize(feats, dim=-1)
        # the previous position's entry (its key, this token) goes into slot count % M
        slots = torch.arange(M, device=token.device)
        write = (slots == mem_count % M) & (mem_has_last > 0)  # [M]
        keys = torch.where(write[None, :, None], mem_last_key[:, None, :], mem_keys)
        values = torch.where(write[None, :], token[:, None], mem_values)
        count = mem_count + mem_has_last
        scores = (keys @ qn[:, :, None])[..., 0].masked_fill((slots >= count)[None], float("-inf"))  # [B, M]
        top, idx = scores.topk(min(om.top_k, M), dim=-1)
        valid = torch.isfinite(top)
        ids = values.gather(1, idx)
        theta = om.log_theta.exp()
        w = torch.softmax((theta * top.masked_fill(~valid, 0.0)).masked_fill(~valid, -1e4), dim=-1) * valid
        p_mem = torch.zeros_like(lp_lm).scatter_add(1, ids, w)
        a = om.gate(feats)[:, 0]
        lhs, rhs = F.logsigmoid(-a)[:, None] + lp_lm, F.logsigmoid(a)[:, None] + p_mem.clamp_min(_TINY).log()
        hi_, lo_ = torch.maximum(lhs, rhs), torch.minimum(lhs, rhs)
        mixed = hi_ + torch.log1p(torch.exp(lo_ - hi_))  # logaddexp, spelled out for exporters
        out = torch.where(valid[:, :1], mixed, lp_lm)
        return (out, *core, keys, values, count, qn, torch.ones_like(mem_has_last))


class LSTMStep(StepGraph):
    def __init__(self, model):
        super().__init__()
        self.m, self.vocab_size = model, model.embed.num_embeddings
        self.names = ("h", "c")

    def init_state(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        st = self.m.init_state(batch_size)
        return st.h, st.c

    def forward(self, token, h, c):
        m = self.m
        y, (h, c) = m.lstm(m.embed(token)[:, None], (h, c))
        return m.head(m.down(y[:, 0])), h, c


class TextNativeSSMNStep(StepGraph):
    """One Text-Native SSMN step: sliding-window attention over a ring of the last ``window``
    rotated keys and values (slot ``count % window``; slots past ``count`` masked), then the
    plastic blocks' fast weights (Hebbian with re-reads, delta or gated delta with the short
    convolution's last inputs). ``memory=False`` is refused: the model has no memory switch."""

    def __init__(self, model):
        super().__init__()
        core = model.core
        self.m, self.vocab_size = model, model.vocab_size
        self.rule, self.conv_size = core.plasticity_rule, core.conv_size
        self.has_syn = core.n_plastic > 0
        self.names = ("attn_k", "attn_v", "count") + (("synaptic",) if self.has_syn else ()) + \
            (("syn_conv",) if self.has_syn and self.conv_size > 1 else ())

    def init_state(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        st = self.m.init_state(batch_size)
        return tuple(getattr(st, n) for n in self.names)

    def forward(self, token, attn_k, attn_v, count, synaptic=None, syn_conv=None):
        m, core = self.m, self.m.core
        x = m.encoder(m.embed(token))  # [B, d]
        B = x.shape[0]
        H, K, W = core.num_heads, core.head_dim, core.window
        slots = torch.arange(W, device=token.device)
        write = (slots == count % W)[None, :, None, None]  # [1, W, 1, 1]
        valid = slots <= count  # after the write: slots 0..min(count, W-1)
        ks, vs, syns, convs, p = [], [], [], [], 0
        for i, block in enumerate(core.blocks):
            at = block.attn
            q, k, v = at.qkv(block.ln_attn(x)).view(B, 3, H, K).unbind(1)
            q, k = (rotate(t[:, None], count.view(1))[:, 0] for t in (q, k))  # the layer's RoPE at this position
            kc = torch.where(write, k[:, None], attn_k[i])
            vc = torch.where(write, v[:, None], attn_v[i])
            scores = torch.einsum("bhk,bjhk->bhj", q, kc) / K**0.5
            attn = torch.softmax(scores.masked_fill(~valid[None, None], float("-inf")), dim=-1)
            x = x + at.out(torch.einsum("bhj,bjhv->bhv", attn, vc).flatten(1))
            ks.append(kc)
            vs.append(vc)
            if block.plastic:
                syn, xs = block.syn, block.ln_syn(x)
                S = synaptic[p]
                if self.rule == "hebbian":
                    qh, kh, vh = syn.qkv(xs).view(B, 3, H, K).unbind(1)
                    qh, kh = F.normalize(qh, dim=-1), F.normalize(kh, dim=-1)
                    vh = torch.tanh(vh) / K**0.5
                    g = torch.sigmoid(syn.gate(xs)) if syn.gated else xs.new_ones(B, H)
                    r = torch.einsum("bhk,bhkv->bhv", qh, S)  # read W_{t-1}, then write
                    for _ in range(syn.reread_iterations):
                        r = torch.einsum("bhk,bhkv->bhv", F.normalize(syn.reread(r), dim=-1), S)
                    S = (1.0 - g * syn.lam)[..., None, None] * S + \
                        (g * syn.eta)[..., None, None] * kh[..., :, None] * vh[..., None, :]
                else:
                    raw = torch.cat([syn_conv[p], syn.qkv(xs)[:, None]], dim=1)  # [B, c, 3d]
                    mixed = F.silu((raw * syn.conv.T[None]).sum(1))
                    convs.append(raw[:, 1:])
                    qh, kh, vh = mixed.view(B, 3, H, K).unbind(1)
                    qh, kh = F.normalize(qh, dim=-1), F.normalize(kh, dim=-1)
                    if syn.eta != 0:  # eta 0 is the memory switch: no writes
                        beta, alpha = syn.gates(xs)
                        if alpha is not None:
                            S = alpha[..., None, None] * S
                        retrieved = torch.einsum("bhk,bhkv->bhv", kh, S)
                        S = S + beta[..., None, None] * kh[..., :, None] * (vh - retrieved)[..., None, :]
                    r = torch.einsum("bhk,bhkv->bhv", qh, S)  # write, then read
                syns.append(S)
                x = x + syn.out(r.flatten(1))
                p += 1
            x = x + block.mlp(block.ln_mlp(x))
        out = (m.head(x), torch.stack(ks), torch.stack(vs), count + 1)
        if self.has_syn:
            out += (torch.stack(syns),)
            if self.conv_size > 1:
                out += (torch.stack(convs),)
        return out


def step_graph(model, memory: bool = True) -> StepGraph:
    """The :class:`StepGraph` of ``model`` (eval mode, no gradients needed)."""
    from mnnn.models.lm_baselines import LSTMLM
    from mnnn.models.s3cmn import S3CMN
    from mnnn.models.ssmn import TextNativeSSMNNetwork

    if isinstance(model, S3CMN):
        graph = S3CMNStep(model, memory=memory)
    elif isinstance(model, LSTMLM):
        graph = LSTMStep(model)
    elif isinstance(model, TextNativeSSMNNetwork):
        if not memory:
            raise ValueError("the Text-Native SSMN has no memory switch: its fast weights are part of the network")
        graph = TextNativeSSMNStep(model)
    else:
        raise ValueError(f"step export covers S3CMN, the Text-Native SSMN and the LSTM; got {type(model).__name__} "
                         "(the Transformer has no fixed-size recurrent state)")
    return graph.eval()


def batch_axes(graph: StepGraph) -> dict[str, int]:
    """The batch axis of the token and of each state tensor (None: no batch axis, e.g. counts)."""
    B = 2
    probe = graph.init_state(B)
    other = graph.init_state(B + 1)
    axes: dict[str, int] = {"token": 0}
    for name, a, b in zip(graph.names, probe, other):
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        axes[name] = diff[0] if diff else None
    return axes


def manifest(graph: StepGraph, model_config: dict, batch_size: int) -> dict:
    """What a runtime needs beside the graph: input/output names, state shapes and dtypes (for
    ``batch_size``), what the first output is, and the model's configuration."""
    state = graph.init_state(batch_size)
    kind = ("log-probabilities of the LM + episodic memory mixture"
            if getattr(graph, "memory", False) else
            "log-probabilities of the LM (memory off)" if getattr(graph.m, "output_memory", None) is not None
            else "logits")
    return {"format": "mnnn-step", "version": 1, "model": type(graph.m).__name__, "vocab_size": graph.vocab_size,
            "memory": bool(getattr(graph, "memory", False)), "first_output": kind,
            "inputs": ["token", *graph.names], "outputs": ["logits", *[f"{n}_out" for n in graph.names]],
            "batch_axes": batch_axes(graph),
            "state": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                      for n, t in zip(graph.names, state)},
            "config": model_config,
            "usage": "feed token [B] int64 and the state (zeros of the listed shapes to start); "
                     "each call returns logits [B, vocab] and the next state, in the listed order"}
