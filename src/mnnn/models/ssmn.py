"""Sparse-Stream Memory Networks (seeds/002): sliding-window attention + plastic synaptic memory.

Standard SSMN maps vectors to vectors; Text-Native SSMN is a causal language model over token ids.
Both stack ``num_layers`` blocks; the last ``round(num_layers * plastic_ratio)`` are plastic
(default 20 %, the seed's 80/20 split):

    x <- x + WindowAttention(LN x)               every block: O(T w)
    x <- x + SynapticMemory(LN x)                plastic blocks: fast weights, O(T d^2 / H)
    x <- x + MLP(LN x)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from mnnn.layers.synaptic import SynapticMemory
from mnnn.layers.window_attention import WindowAttention
from mnnn.models.token_lm import TokenLM
from mnnn.sampling import check_sampling, sample_token
from mnnn.ops.window_attention import WindowCache
from mnnn.state import TensorState
from mnnn.validation import check_int, check_real


@dataclasses.dataclass
class SSMNState(TensorState):
    attn_k: torch.Tensor  # [L, B, W, H, K] ring-buffer keys of every block
    attn_v: torch.Tensor  # [L, B, W, H, K]
    count: torch.Tensor  # [] positions seen
    synaptic: torch.Tensor  # [P, B, H, K, K] fast weights of the plastic blocks (W^T)
    syn_conv: torch.Tensor  # [P, B, conv_size - 1, 3 d] delta rules: the short convolution's inputs


class SSMNBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, window: int, plastic: bool, eta: float, lam: float,
                 gated: bool, reread_iterations: int, plasticity_rule: str = "delta"):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = WindowAttention(d_model, num_heads, window)
        self.plastic = plastic
        if plastic:
            self.ln_syn = nn.LayerNorm(d_model)
            self.syn = SynapticMemory(d_model, num_heads, eta, lam, gated=gated,
                                      reread_iterations=reread_iterations, plasticity_rule=plasticity_rule)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x, cache, syn_state, step: bool = False):
        a, cache = (self.attn.step if step else self.attn)(self.ln_attn(x), cache)
        x = x + a
        if self.plastic:
            s, syn_state = (self.syn.step if step else self.syn)(self.ln_syn(x), syn_state)
            x = x + s
        return x + self.mlp(self.ln_mlp(x)), cache, syn_state


class SSMNCore(nn.Module):
    """The stack of blocks, with the per-block states packed into one :class:`SSMNState`."""

    def __init__(self, d_model: int, num_layers: int, num_heads: int, window: int, eta: float, lam: float,
                 plastic_ratio: float, gated: bool = False, reread_iterations: int = 0,
                 plasticity_rule: str = "delta"):
        super().__init__()
        if plasticity_rule not in ("hebbian", "delta", "gated_delta"):
            raise ValueError(f"plasticity_rule must be 'hebbian', 'delta' or 'gated_delta', got {plasticity_rule!r}")
        self.plasticity_rule = plasticity_rule
        check_int("num_heads", num_heads)
        if d_model % num_heads:
            raise ValueError(f"hidden_dim must be divisible by num_heads, got hidden_dim={d_model}, "
                             f"num_heads={num_heads}")
        if not 0.0 <= plastic_ratio <= 1.0:
            raise ValueError(f"plastic_ratio must be in [0, 1], got {plastic_ratio!r}")
        n_plastic = round(num_layers * plastic_ratio)
        if plastic_ratio > 0 and n_plastic == 0:
            n_plastic = 1
        self.n_plastic = n_plastic
        self.window, self.num_heads, self.head_dim = window, num_heads, d_model // num_heads
        self.blocks = nn.ModuleList(
            SSMNBlock(d_model, num_heads, window, i >= num_layers - n_plastic, eta, lam, gated, reread_iterations,
                      plasticity_rule)
            for i in range(num_layers))
        self.conv_size = self.synaptic_layers()[0].conv_size if n_plastic else 1

    def synaptic_layers(self) -> list[SynapticMemory]:
        return [b.syn for b in self.blocks if b.plastic]

    def set_plasticity(self, eta: float, lam: float) -> None:
        for syn in self.synaptic_layers():
            syn.eta, syn.lam = float(eta), float(lam)

    def init_state(self, batch_size: int) -> SSMNState:
        w = self.blocks[0].attn.out.weight
        L, H, K = len(self.blocks), self.num_heads, self.head_dim
        return SSMNState(attn_k=w.new_zeros(L, batch_size, self.window, H, K),
                         attn_v=w.new_zeros(L, batch_size, self.window, H, K),
                         count=torch.zeros((), dtype=torch.long, device=w.device),
                         synaptic=w.new_zeros(self.n_plastic, batch_size, H, K, K),
                         syn_conv=w.new_zeros(self.n_plastic, batch_size, self.conv_size - 1, 3 * H * K))

    def forward(self, x: torch.Tensor, state: SSMNState | None = None, step: bool = False,
                inplace: bool = False):
        """x ``[B, T, d]`` (or ``[B, d]`` with ``step``) -> (same shape, state). The given state is
        never modified: the step path clones the stacked caches once and updates the copy —
        unless ``inplace`` (a step under no_grad whose caller owns ``state`` and drops it, as
        generation does): then the window caches are written where they are, saving a copy of
        every layer's window per token."""
        state = self.init_state(x.shape[0]) if state is None else state
        # step writes into its cache in place: under no_grad one clone of all blocks' caches
        # suffices (generation); with autograd each block gets its own copy so that saved
        # tensors are never modified
        shared = step and not torch.is_grad_enabled()
        if inplace and not shared:
            raise ValueError("inplace=True is for the step path under torch.no_grad()")
        if shared:
            all_k, all_v = (state.attn_k, state.attn_v) if inplace else (state.attn_k.clone(), state.attn_v.clone())
        ks, vs, syns, convs = [], [], [], []
        p = 0
        for i, block in enumerate(self.blocks):
            if shared:
                src_k, src_v = all_k[i], all_v[i]
            elif step:
                src_k, src_v = state.attn_k[i].clone(), state.attn_v[i].clone()
            else:
                src_k, src_v = state.attn_k[i], state.attn_v[i]
            cache = WindowCache(k=src_k, v=src_v, count=state.count)
            syn = (state.synaptic[p], state.syn_conv[p]) if block.plastic else None
            x, cache, syn = block(x, cache, syn, step=step)
            ks.append(cache.k)
            vs.append(cache.v)
            if block.plastic:
                syns.append(syn[0])
                convs.append(syn[1])
                p += 1
        new_k, new_v = (all_k, all_v) if shared else (torch.stack(ks), torch.stack(vs))
        synaptic = torch.stack(syns) if syns else state.synaptic
        syn_conv = torch.stack(convs) if convs else state.syn_conv
        return x, SSMNState(attn_k=new_k, attn_v=new_v, count=cache.count, synaptic=synaptic, syn_conv=syn_conv)

    def stats(self, state: SSMNState) -> dict[str, float]:
        layers = self.synaptic_layers()
        entropies = [b.attn.last_entropy for b in self.blocks]
        out = {"window_fill": min(int(state.count), self.window) / self.window,
               "attention_entropy": sum(entropies) / len(entropies)}
        if layers:
            for key in ("synaptic_energy", "synaptic_update_magnitude"):
                vals = [s.stats[key] for s in layers if key in s.stats]
                out[key] = sum(vals) / len(vals) if vals else 0.0
        return out


def analyze_synaptic_state(state: SSMNState, iterations: int = 50) -> dict[str, float]:
    """Statistics of the fast weights of the first batch element, averaged over plastic blocks
    and heads: energy mean(W^2); num_active_modes = singular values above 1 % of the largest;
    spectral_radius by power iteration (``iterations`` steps; W is not symmetric, so no eigvalsh);
    sparsity = fraction of |w| below 1e-3 max|w|; mean and std of the weights."""
    W = state.synaptic[:, 0].detach().double()  # [P, H, K, K]
    if W.numel() == 0:
        return {"energy": 0.0, "num_active_modes": 0, "spectral_radius": 0.0, "sparsity": 1.0,
                "mean_weight": 0.0, "std_weight": 0.0}
    M = W.transpose(-1, -2).reshape(-1, W.shape[-1], W.shape[-1])  # W = S^T, one matrix per head
    sv = torch.linalg.svdvals(M)
    active = (sv > 0.01 * sv[:, :1].clamp_min(1e-30)).sum(dim=1).double().mean()
    v = torch.randn(M.shape[0], M.shape[-1], dtype=M.dtype, generator=torch.Generator().manual_seed(0))
    radius = torch.zeros(M.shape[0], dtype=M.dtype)
    for _ in range(iterations):
        w = torch.einsum("nij,nj->ni", M, v)
        radius = w.norm(dim=1) / v.norm(dim=1).clamp_min(1e-30)
        v = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    mx = W.abs().max().clamp_min(1e-30)
    return {"energy": float(W.pow(2).mean()), "num_active_modes": float(active),
            "spectral_radius": float(radius.mean()), "sparsity": float((W.abs() < 1e-3 * mx).double().mean()),
            "mean_weight": float(W.mean()), "std_weight": float(W.std())}


class SSMNNetwork(nn.Module):
    """Standard SSMN: input projection -> :class:`SSMNCore` -> LayerNorm -> output projection.

    The default plasticity rule is the gated delta rule: it wins both of the Standard SSMN's
    measurements in ``mnnn bench ssmn`` (the noisy sine at the seed's sizes, delayed recall beyond
    the window). The Text-Native SSMN defaults to the plain delta rule (MQAR, the ``lm`` table)."""

    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int = 256, window_size: int = 512,
                 plasticity_eta: float = 0.01, decay_lambda: float = 0.001, num_layers: int = 5,
                 plastic_ratio: float = 0.2, num_heads: int = 4, importance_gating: bool = False,
                 plasticity_rule: str = "gated_delta"):
        super().__init__()
        self.inp = nn.Linear(input_dim, hidden_dim)
        self.core = SSMNCore(hidden_dim, num_layers, num_heads, window_size, plasticity_eta, decay_lambda,
                             plastic_ratio, gated=importance_gating, plasticity_rule=plasticity_rule)
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, output_dim)

    def init_state(self, batch_size: int) -> SSMNState:
        return self.core.init_state(batch_size)

    def forward(self, x: torch.Tensor, state: SSMNState | None = None):
        h, state = self.core(self.inp(x), state)
        return self.head(self.norm(h)), state

    def step(self, x_t: torch.Tensor, state: SSMNState):
        h, state = self.core(self.inp(x_t), state, step=True)
        return self.head(self.norm(h)), state

    def memory_vector(self, state: SSMNState) -> torch.Tensor:
        return state.synaptic.transpose(0, 1).reshape(state.synaptic.shape[1], -1)


class TextNativeSSMNNetwork(TokenLM):
    """Text-Native SSMN: token embedding -> semantic encoder (MLP, the "thought embedding") ->
    :class:`SSMNCore` with importance-gated plastic blocks and internal re-reads -> LM head tied
    to the embedding (through a projection when hidden_dim != embed_dim)."""

    def __init__(self, vocab_size: int, embed_dim: int = 128, hidden_dim: int = 256, window_size: int = 512,
                 plasticity_eta: float = 0.01, decay_lambda: float = 0.001, num_layers: int = 5,
                 plastic_ratio: float = 0.2, num_heads: int = 4, reread_iterations: int = 1,
                 plasticity_rule: str = "delta"):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.encoder = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
        self.core = SSMNCore(hidden_dim, num_layers, num_heads, window_size, plasticity_eta, decay_lambda,
                             plastic_ratio, gated=True, reread_iterations=reread_iterations,
                             plasticity_rule=plasticity_rule)
        self.norm = nn.LayerNorm(hidden_dim)
        self.to_embed = nn.Linear(hidden_dim, embed_dim, bias=False)

    def init_state(self, batch_size: int) -> SSMNState:
        return self.core.init_state(batch_size)

    def head_features(self, h: torch.Tensor) -> torch.Tensor:
        """Core features ``[..., hidden_dim]`` -> what multiplies the tied embedding ``[..., embed_dim]``."""
        return self.to_embed(self.norm(h))

    def features(self, tokens: torch.Tensor, state: SSMNState | None = None):
        """``forward`` without the output layer: (features ``[B, T, hidden_dim]``, state)."""
        return self.core(self.encoder(self.embed(tokens)), state)

    def step(self, token_t: torch.Tensor, state: SSMNState, inplace: bool = False):
        """One token ``[B]`` -> (logits ``[B, vocab]``, state). ``inplace`` (under no_grad, for a
        caller that owns ``state`` and never reuses it): the window caches are updated in place."""
        h, state = self.core(self.encoder(self.embed(token_t)), state, step=True, inplace=inplace)
        return self.head(h), state

    def prefill(self, tokens: torch.Tensor, state: SSMNState | None = None):
        """Read a prompt ``[B, T]`` in one parallel pass; logits of the last position only
        (``[B, vocab]``), so a long prompt never materialises ``T x vocab`` logits."""
        h, state = self.core(self.encoder(self.embed(tokens)), state)
        return self.head(h[:, -1]), state


class TextNativeSSMN(TextNativeSSMNNetwork):
    """Text-Native SSMN with the seed's public API (``generate``, ``generate_sequence``,
    ``analyze_synaptic_state``, statistics) on top of :class:`TextNativeSSMNNetwork`.

    ``generate`` and ``generate_sequence`` use the step path: O(window) memory per token, flat in
    the context length. ``fit`` trains on a 1-D array of token ids (see :func:`mnnn.training.lm.train_lm`).
    """

    def __init__(self, vocab_size: int, embed_dim: int = 128, hidden_dim: int = 256, window_size: int = 512,
                 plasticity_eta: float = 0.01, decay_lambda: float = 0.001, num_layers: int = 5,
                 plastic_ratio: float = 0.2, num_heads: int = 4, reread_iterations: int = 1,
                 plasticity_rule: str = "delta"):
        for name, value in (("vocab_size", vocab_size), ("embed_dim", embed_dim), ("hidden_dim", hidden_dim),
                            ("window_size", window_size), ("num_layers", num_layers), ("num_heads", num_heads)):
            check_int(name, value)
        check_int("reread_iterations", reread_iterations, 0)
        check_real("plasticity_eta", plasticity_eta, 0.0)
        check_real("decay_lambda", decay_lambda, 0.0, 1.0)
        super().__init__(vocab_size, embed_dim, hidden_dim, window_size, plasticity_eta, decay_lambda,
                         num_layers, plastic_ratio, num_heads, reread_iterations, plasticity_rule)
        self.config = dict(vocab_size=vocab_size, embed_dim=embed_dim, hidden_dim=hidden_dim,
                           window_size=window_size, plasticity_eta=plasticity_eta, decay_lambda=decay_lambda,
                           num_layers=num_layers, plastic_ratio=plastic_ratio, num_heads=num_heads,
                           reread_iterations=reread_iterations, plasticity_rule=plasticity_rule)
        self.last_state: SSMNState | None = None

    def _tokens(self, tokens, name: str = "tokens") -> torch.Tensor:
        t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
        if t.numel() == 0:
            raise ValueError(f"{name} is empty; give at least one token id")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            if t.dtype.is_floating_point and not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or infinity; expected integer token ids")
            raise TypeError(f"{name} must be integer token ids, got dtype {t.dtype}")
        if t.dim() > 1 and not (t.dim() == 2 and t.shape[0] == 1):
            raise ValueError(f"{name} must be one sequence of token ids (a list, 1-D array or [1, T] tensor), "
                             f"got shape {tuple(t.shape)}; run one prompt per call")
        t = t.long().reshape(-1)
        if int(t.min()) < 0 or int(t.max()) >= self.vocab_size:
            raise ValueError(f"{name} must be in [0, {self.vocab_size}), got min {int(t.min())}, max {int(t.max())}")
        return t.to(self.embed.weight.device)

    @torch.no_grad()
    def generate(self, tokens) -> np.ndarray:
        """Next-token probabilities ``[vocab_size]`` after reading ``tokens`` (a fresh state)."""
        self.eval()
        logits, self.last_state = self.prefill(self._tokens(tokens)[None])
        return torch.softmax(logits[0].double(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def generate_sequence(self, prompt_tokens, max_length: int = 100, temperature: float = 1.0,
                          top_k: int | None = 50, top_p: float | None = None, seed: int | None = None) -> list[int]:
        """Sample ``max_length`` new tokens after the prompt with the step path. ``temperature > 0``;
        ``top_k`` / ``top_p`` filter the distribution; ``seed`` makes sampling reproducible."""
        check_real("temperature", temperature, 0.0, open_low=True)
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 0:
            raise ValueError(f"max_length must be a non-negative int, got {max_length!r}")
        check_sampling(temperature, top_k, top_p)
        prompt = self._tokens(prompt_tokens, "prompt_tokens")
        self.eval()
        gen = torch.Generator(device=prompt.device)
        gen.manual_seed(seed if seed is not None else int(torch.randint(2**31, (1,))))
        logits, state = self.prefill(prompt[None])  # the prompt in one parallel pass, each token once
        last = logits[0]
        out: list[int] = []
        for _ in range(max_length):
            token = sample_token(last, temperature, top_k, top_p, gen)
            out.append(token)
            # the state is this loop's own (prefill made it): update its window caches in place
            logits, state = self.step(torch.tensor([token], device=prompt.device), state, inplace=True)
            last = logits[0]
        self.last_state = state
        return out

    def fit(self, token_ids, **kwargs) -> "TextNativeSSMN":
        """Train on a 1-D array of token ids; keyword arguments go to :func:`mnnn.training.lm.train_lm`."""
        from mnnn.training.lm import train_lm

        ids = self._tokens(token_ids, "token_ids").cpu().numpy()
        self.history_ = train_lm(self, ids, **kwargs)
        return self

    def _stats(self) -> dict[str, float]:
        if self.last_state is None:
            return {}
        return self.core.stats(self.last_state)

    @property
    def synaptic_energy(self) -> float:
        return self._stats().get("synaptic_energy", 0.0)

    @property
    def synaptic_update_magnitude(self) -> float:
        return self._stats().get("synaptic_update_magnitude", 0.0)

    @property
    def attention_entropy(self) -> float:
        return self._stats().get("attention_entropy", float("nan"))

    @property
    def window_fill(self) -> float:
        return self._stats().get("window_fill", 0.0)

    def analyze_synaptic_state(self) -> dict[str, float]:
        """See :func:`analyze_synaptic_state`; uses the state after the last generate call."""
        if self.last_state is None:
            return analyze_synaptic_state(self.init_state(1))
        return analyze_synaptic_state(self.last_state)

