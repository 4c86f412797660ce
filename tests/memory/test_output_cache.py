"""The output memory (continuous cache) against a per-position loop written from its definition."""

import pytest
import torch
import torch.nn.functional as F

from mnnn.memory.output_cache import OutputMemory


def _naive_nll(mem: OutputMemory, feats, tokens, targets, nll_lm):
    """Position p of stream b reads the entries e in [p - M, p) (key q_e, value tokens[e + 1]),
    keeps the k best cosines, and mixes p = (1 - lam) p_LM + lam p_mem at the target."""
    B, T, _ = feats.shape
    q = F.normalize(feats, dim=-1)
    theta = mem.log_theta.exp()
    out = []
    for b in range(B):
        row = []
        for p in range(T):
            cands = list(range(max(0, p - mem.memory_size), p))
            if not cands:
                row.append(nll_lm[b, p])
                continue
            scores = torch.stack([q[b, p] @ q[b, e] for e in cands])
            top, pos = scores.topk(min(mem.top_k, len(cands)))
            w = torch.softmax(theta * top, 0)
            hit = torch.stack([tokens[b, cands[i] + 1] == targets[b, p] for i in pos.tolist()])
            p_mem = (w * hit).sum()
            lam = torch.sigmoid(mem.gate(feats[b, p])[0])
            row.append(-torch.log((1 - lam) * torch.exp(-nll_lm[b, p]) + lam * p_mem))
        out.append(torch.stack(row))
    return torch.stack(out)


@pytest.mark.parametrize("cuts", [(), (5,), (3, 9, 14)])
def test_output_memory_matches_loop_in_values_and_gradients(cuts):
    """Whole or cut into segments (the ring evicting: 20 positions, 6 slots, gradients flowing
    through the stored keys of earlier segments), values and gradients equal the loop's."""
    torch.manual_seed(0)
    B, T, D, V = 2, 20, 5, 4  # few token ids: many hits, and ids retrieved twice
    mem = OutputMemory(D, memory_size=6, top_k=3, theta=3.0).double()
    torch.nn.init.normal_(mem.gate.weight, std=0.5)
    feats = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    nll_lm = (torch.rand(B, T, dtype=torch.float64) + 0.5).requires_grad_()
    tokens = torch.randint(0, V, (B, T + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    state, parts, start = mem.init_state(B), [], 0
    for end in list(cuts) + [T]:
        (nll, _), state = mem(feats[:, start:end], x[:, start:end], None, state, y[:, start:end],
                              nll_lm=nll_lm[:, start:end])
        parts.append(nll)
        start = end
    got = torch.cat(parts, 1)
    ref = _naive_nll(mem, feats, x, y, nll_lm)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)

    g = torch.randn(B, T, dtype=torch.float64)
    params = [feats, nll_lm, mem.log_theta, mem.gate.weight, mem.gate.bias]
    g_got = torch.autograd.grad((got * g).sum(), params)
    g_ref = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
