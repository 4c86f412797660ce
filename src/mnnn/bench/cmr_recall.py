"""``mnnn bench cmr-recall``: planted long-range recall beyond the base model's context window.

Task (generated locally). Tokens: keys ``[1, 1+K)``, values ``[1+K, 1+2K)``, filler above. An
episode is read by one stream in segments of ``S`` tokens, the base model's whole context:

* segment 0 states ``n_facts`` facts ``k v`` (then filler up to ``S``);
* ``gap`` segments of random filler;
* the query segment asks ``n_query`` of the facts again as ``k v`` pairs: the model must predict
  each ``v`` from its ``k``. Accuracy is counted at those value positions only (chance 1/K).

The base model (Hugging Face ``GPT2LMHeadModel``, ``n_positions = S``, random init) is first
trained on single segments that hold the facts *and* the queries, by steps, until its running
training accuracy reaches ``base_target`` ("base, facts in window" is its held-out accuracy
there). Then, with the base frozen, a CMR is trained per retrieval strategy on episodes (memory
reset per episode, carried across its segments; loss at the query values) and every
configuration answers the same held-out episodes. The buffer stores every state
(``relevance_threshold 0``) and semantic retrieval has no similarity floor, so the strategies
differ only in which ``budget`` entries each position picks; "all memories" reads the whole
buffer (budget >= entries) as the upper reference. Retrieval is per token unless the row says
"per segment" (the seed's one query per segment); an entry is read as the state that followed it
(``memory_values='next'``) unless the row names another value ("own state": the entry itself;
"next token's embedding": the base's input embedding of the token that followed). Rows marked
"KV read" use ``reconstruction_method='kv_attention'``: entries are the blocks' attention keys and
values, scored against each position's attention query by the strategy, and read by the base's
own attention in one softmax with its local keys (:class:`mnnn.layers.kv_read.KVMemoryRead`; its
per-head memory weight and query map train, at ``kv_lr``; multi-criteria at
``kv_lr_by_strategy['multi_criteria']`` = 3e-3, because at 3e-2 its loss rose from 1.0 to 1.85
over the 500 steps; the contextual scorer, which starts as the mean attention logit, at
``kv_scorer_lr`` = 3e-4: in our probe scorer learning rates of 3e-2 / 3e-3 / 3e-4 / 1e-4 gave
0.11 / 0.72 / 0.85 / 0.84, a random-init scorer at 3e-2 / 1e-3 / 3e-3 gave 0.14 / 0.48 / 0.79).
Untrained, that read is the base attending over its retrieved past as if it were earlier context.
KV rows train for ``kv_steps`` = 1000 episodes (their loss was still falling at 500: semantic
0.875 at 500, 0.893 at 1000 in our probe). The row "multi_criteria, KV read, weights ..." sets
``criteria_weights`` to ``kv_criteria_weights`` (similarity-led) at ``kv_lr``: with the seed's
weights (relevance 0.4, similarity 0.3, recency 0.2, diversity 0.1) two query-independent terms
outweigh the cosine, every position picks much the same entries, and the fact's entries are
picked less often than at random in block 0 (0.13 vs chance 0.56 at git 830e356). Every trained
multi-criteria row (per token) is answered again on the same checkpoint with each criterion's
weight switched to 0 in turn (the others renormalised) and with its recency counted from the write
instead of the last retrieval (``recency_from``; the facts are the oldest writes by construction).
Rows marked "output read" use ``memory_fusion='output'``
(:class:`mnnn.layers.output_read.OutputRead`): no reweaving; the entries each position picks in
one block (``output_read_layer`` = block 0, or the last block where the row says so) vote for the
tokens that followed them, mixed into the base's next-token distribution by a learned gate (its
gate, temperature and query/entry map train at ``output_lr`` for ``output_steps`` episodes).
Block 0's states are mostly the token itself, which is what a key has to match here; in our
probe (1000 steps) block 0 answered 0.81 and the last block 0.64.

Planted hit rate: at the query keys (the positions that predict a value), the share whose
retrieved entries include a state of the asked fact (its key or value position in segment 0) in
the last target layer (the read layer for output-read rows), beside the chance of that for as
many entries drawn at random. Key-entry hit rate: the share that include the fact's key state,
the entry stored with the answer as its next token (the one the output read votes with; the
value state's next token is the next fact's key), beside its chance ``k / N``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mnnn.bench.cmr_checks import verify_cmr
from mnnn.bench.common import markdown_table, provenance, write_json
from mnnn.memory.retrieval import STRATEGIES
from mnnn.models.cmr import CMRModel

PRESETS = {
    "default": {"keys": 32, "filler": 32, "segment": 32, "n_facts": 8, "n_query": 8, "gap": 2, "n_embd": 64,
                "n_layer": 3, "n_head": 4, "base_lr": 5e-4, "base_steps": 5000, "base_target": 0.97, "cmr_steps": 500, "batch": 32,
                "budget": 32, "eval_episodes": 512, "segment_strategies": ("multi_criteria",), "kv_lr": 3e-2,
                "kv_lr_by_strategy": {"multi_criteria": 3e-3}, "kv_scorer_lr": 3e-4,
                "value_ablations": (("semantic", "self"), ("semantic", "next_token")), "output_lr": 3e-2,
                "kv_steps": 1000, "output_steps": 1000, "output_read_layer": 0,
                "kv_criteria_weights": {"relevance": 0.1, "similarity": 0.7, "recency": 0.1, "diversity": 0.1}},
    "toy": {"keys": 8, "filler": 8, "segment": 16, "n_facts": 4, "n_query": 4, "gap": 1, "n_embd": 16,
            "n_layer": 2, "n_head": 2, "base_lr": 1e-3, "base_steps": 3, "base_target": 0.97, "cmr_steps": 2, "batch": 4, "budget": 8,
            "eval_episodes": 8, "kv_lr": 3e-2, "output_lr": 3e-2},
}


def _vocab(c) -> int:
    return 1 + 2 * c["keys"] + c["filler"]


def _filler(c, shape, g) -> torch.Tensor:
    return 1 + 2 * c["keys"] + torch.randint(0, c["filler"], shape, generator=g)


def _facts(c, batch, g) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_facts`` distinct keys per row and their random values."""
    keys = torch.stack([torch.randperm(c["keys"], generator=g)[: c["n_facts"]] for _ in range(batch)]) + 1
    values = torch.randint(0, c["keys"], keys.shape, generator=g) + 1 + c["keys"]
    return keys, values


def _pairs(keys, values) -> torch.Tensor:
    return torch.stack([keys, values], dim=-1).flatten(1)


def _queries(c, keys, values, g, with_order: bool = False):
    """Query pairs over a random subset of the facts; the second output marks value positions
    (and the third, with ``with_order``, which fact each query asks)."""
    order = torch.stack([torch.randperm(keys.shape[1], generator=g)[: c["n_query"]] for _ in range(keys.shape[0])])
    q = _pairs(keys.gather(1, order), values.gather(1, order))
    is_value = torch.zeros_like(q, dtype=torch.bool)
    is_value[:, 1::2] = True
    return (q, is_value, order) if with_order else (q, is_value)


def in_window_batch(c, batch, g) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment with facts then queries (training data for the base model)."""
    keys, values = _facts(c, batch, g)
    q, is_value = _queries(c, keys, values, g)
    seg = torch.cat([_pairs(keys, values), q], 1)
    mask = torch.cat([torch.zeros(batch, 2 * c["n_facts"], dtype=torch.bool), is_value], 1)
    pad = c["segment"] - seg.shape[1]
    if pad < 0:
        raise ValueError(f"segment {c['segment']} too short for {c['n_facts']} facts and {c['n_query']} queries")
    return torch.cat([seg, _filler(c, (batch, pad), g)], 1), torch.cat([mask, torch.zeros(batch, pad, dtype=torch.bool)], 1)


def episode_batch(c, batch, g) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Segments of one episode per row: facts, ``gap`` filler segments, queries, the value mask and
    ``asked [batch, n_query]``: the fact each query asks (its key and value sit at positions
    ``2 f`` and ``2 f + 1`` of segment 0)."""
    S = c["segment"]
    keys, values = _facts(c, batch, g)
    facts = _pairs(keys, values)
    segs = [torch.cat([facts, _filler(c, (batch, S - facts.shape[1]), g)], 1)]
    segs += [_filler(c, (batch, S), g) for _ in range(c["gap"])]
    q, is_value, asked = _queries(c, keys, values, g, with_order=True)
    segs.append(torch.cat([q, _filler(c, (batch, S - q.shape[1]), g)], 1))
    mask = torch.cat([is_value, torch.zeros(batch, S - q.shape[1], dtype=torch.bool)], 1)
    return segs, mask, asked


def _masked_loss_acc(logits, tokens, mask) -> tuple[torch.Tensor, float]:
    """Next-token loss and accuracy at the positions ``mask`` marks (predicted from the one before)."""
    pred, target, m = logits[:, :-1], tokens[:, 1:], mask[:, 1:]
    loss = F.cross_entropy(pred[m], target[m])
    return loss, (pred[m].argmax(-1) == target[m]).float().mean().item()


def _run_episode(model: CMRModel, segs, use_memory: bool):
    model.reset_memory()
    for seg in segs[:-1]:
        with torch.no_grad():
            model(seg, use_memory=use_memory)
    return model(segs[-1], use_memory=use_memory).logits


def _planted_hits(model: CMRModel, asked: torch.Tensor) -> dict[int, tuple[float, ...]]:
    """Per target layer, at the query keys (the positions that predict a value): how many
    positions' retrieved sets hold an entry of the asked fact (its key or value state in segment
    0) and the chance of that for as many entries drawn at random from the stream's store
    (``1 - C(N-2, k) / C(N, k)``); how many hold the fact's key entry, the one stored with the
    answer as its next token (what the output read votes with), and its chance ``k / N``; and the
    number of positions."""
    out = {}
    for layer, r in model.last_retrieval.items():
        key_pos = torch.arange(asked.shape[1]) * 2  # query j's key sits at 2 j of the query segment
        idx_seg, idx_pos, valid = (r["segment"][:, key_pos], r["position"][:, key_pos], r["valid"][:, key_pos])
        fact = 2 * asked[..., None]
        key_entry = valid & (idx_seg == 0) & (idx_pos == fact)
        hit = (key_entry | (valid & (idx_seg == 0) & (idx_pos == fact + 1))).any(-1)
        n = r["entries"].float()[:, None]
        k = valid.sum(-1).float()
        chance = 1 - ((n - k) * (n - k - 1)).clamp_min(0) / (n * (n - 1)).clamp_min(1)
        out[layer] = (float(hit.sum()), float(chance.sum()), float(key_entry.any(-1).sum()),
                      float((k / n.clamp_min(1)).clamp_max(1).sum()), hit.numel())
    return out


@torch.no_grad()
def evaluate(model: CMRModel, episodes, use_memory: bool = True, details: dict | None = None) -> float:
    """Query accuracy over ``episodes``; ``details`` (a dict) receives the planted-fact hit rate
    per target layer beside its chance level."""
    model.eval()
    hits, n = 0.0, 0
    planted: dict[int, list[float]] = {}
    for segs, mask, asked in episodes:
        logits = _run_episode(model, segs, use_memory)
        _, acc = _masked_loss_acc(logits, segs[-1], mask)
        k = int(mask[:, 1:].sum())
        hits, n = hits + acc * k, n + k
        if use_memory and model.config.retrieval_mode == "token":
            for layer, counts in _planted_hits(model, asked).items():
                tot = planted.setdefault(layer, [0.0] * len(counts))
                planted[layer] = [a + b for a, b in zip(tot, counts)]
    if details is not None:
        details.update({str(layer): {"planted_hit_rate": h / m, "chance": ch / m, "key_entry_hit_rate": kh / m,
                                     "key_entry_chance": kc / m} for layer, (h, ch, kh, kc, m) in planted.items()})
    return hits / max(n, 1)


def train_base(gpt2, c, progress: bool) -> list[float]:
    """Train the base on in-window episodes until its running training accuracy (last 50 steps)
    reaches ``base_target`` or ``base_steps`` run out (AdamW, one-cycle schedule over
    ``base_steps``). In-context recall is learnt in a sudden phase change (here near step 1000);
    a constant learning rate of 5e-4 or 1e-3 stayed on the 0.38 plateau for 6000 steps in our
    probes, the one-cycle schedule (with its momentum cycling) left it twice in ~1200 steps."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(gpt2.parameters(), lr=c["base_lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c["base_lr"], total_steps=max(c["base_steps"], 1),
                                                pct_start=0.05)
    gpt2.train()
    accs = []
    bar = tqdm(range(c["base_steps"]), desc="base (in-window recall)", disable=not progress)
    for _ in bar:
        x, m = in_window_batch(c, c["batch"] * 2, g)
        loss, acc = _masked_loss_acc(gpt2(input_ids=x).logits, x, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt2.parameters(), 1.0)
        opt.step()
        sched.step()
        accs.append(acc)
        if len(accs) >= 50 and sum(accs[-50:]) / 50 >= c["base_target"]:
            break
    bar.close()
    gpt2.eval()
    return accs


def _row_lr(c, strategy: str, values: str, extra: dict) -> float:
    """A row's learning rate: KV read at ``kv_lr`` (a strategy's own in ``kv_lr_by_strategy``,
    unless the row sets its own ``criteria_weights``), output read at ``output_lr``, reweaving 3e-3."""
    if values == "kv":
        if "criteria_weights" in extra:
            return c["kv_lr"]
        return c.get("kv_lr_by_strategy", {}).get(strategy, c["kv_lr"])
    return c["output_lr"] if values == "output" else 3e-3


def train_cmr_episodes(model: CMRModel, c, progress: bool, desc: str, lr: float = 3e-3,
                       scorer_lr: float | None = None, steps: int | None = None) -> list[float]:
    """AdamW over the CMR parameters at ``lr`` for ``steps`` (default ``cmr_steps``) episodes; the
    contextual scorer's at ``scorer_lr`` when given."""
    g = torch.Generator().manual_seed(2)
    opt = torch.optim.AdamW(model.optimizer_groups(lr, lr if scorer_lr is None else scorer_lr), lr=lr)
    losses = []
    for _ in tqdm(range(c["cmr_steps"] if steps is None else steps), desc=desc, disable=not progress):
        model.train()
        segs, mask, _ = episode_batch(c, c["batch"], g)
        loss, _ = _masked_loss_acc(_run_episode(model, segs, True), segs[-1], mask)
        if loss.requires_grad:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


_VALUE_LABEL = {"self": "own state", "next_token": "next token's embedding", "next": "next state", "kv": "KV read",
                "output": "output read"}


def _cmr(gpt2, c, strategy: str, budget: int, mode: str = "token", values: str = "next",
         extra: dict | None = None) -> CMRModel:
    torch.manual_seed(3)
    kv, output = values == "kv", values == "output"
    return CMRModel(gpt2, {**(extra or {}), "retrieval_strategy": strategy, "retrieval_budget": budget, "similarity_threshold": -1.0,
                           "retrieval_mode": mode, "memory_values": None if kv or output else values,
                           "reconstruction_method": "kv_attention" if kv else "cross_attention",
                           "memory_fusion": "output" if output else "reweave",
                           "relevance_threshold": 0.0, "max_clusters": 8, "context_heads": 4,
                           "max_entries_per_layer": 100_000, "max_total_entries": 1_000_000,
                           "target_layers": list(range(c["n_layer"]))})


def _criteria_switched_off(model: CMRModel, episodes, label: str, last: str, in_window: float) -> list[dict]:
    """The trained multi-criteria ``model`` answered again with one criterion's weight set to 0
    (the others renormalised), for each criterion in turn, then with its recency counted from the
    write instead of the last retrieval: ablations on the same checkpoint. A criterion that
    already weighs 0 is skipped; the trained settings are restored."""
    from mnnn.memory.retrieval import CRITERIA

    trained, clock = dict(model.retriever.weights), model.retriever.recency_from
    switches = []
    for off in CRITERIA:
        rest = {c: w for c, w in trained.items() if c != off}
        if trained[off] > 0 and sum(rest.values()) > 0:
            switches.append((f"{off} switched off", {"switched_off": off}, rest, clock))
    other = "write" if clock == "access" else "access"
    if trained["recency"] > 0:
        since = {"access": "the last retrieval", "write": "the write"}
        switches.append((f"recency from {since[other]} (not {since[clock]})", {"recency_from": other}, trained, other))
    rows = []
    for name, tag, weights, recency_from in switches:
        model.set_multi_criteria(weights, recency_from)
        details: dict = {}
        acc = evaluate(model, episodes, details=details)
        hit = details.get(last, {})
        rows.append({"model": f"CMR trained: {label}, {name} (same checkpoint)", "strategy": "multi_criteria", **tag,
                     "criteria_weights": dict(model.retriever.weights), "budget": model.config.retrieval_budget,
                     "accuracy": acc, "vs_in_window": acc / max(in_window, 1e-9),
                     "planted_hit_rate": hit.get("planted_hit_rate"), "planted_hit_chance": hit.get("chance"),
                     "key_entry_hit_rate": hit.get("key_entry_hit_rate"),
                     "key_entry_chance": hit.get("key_entry_chance"), "planted_hits_per_layer": details})
    model.set_multi_criteria(trained, clock)
    return rows


def _weights_label(weights: dict[str, float]) -> str:
    return "/".join(f"{k} {v:g}" for k, v in weights.items())


def _gpt2(c):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=_vocab(c), n_positions=c["segment"], n_embd=c["n_embd"],
                                      n_layer=c["n_layer"], n_head=c["n_head"], bos_token_id=0, eos_token_id=0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _configs(c, entries: int) -> list[tuple]:
    """The trained rows' configurations: ``(label, strategy, budget, mode, values, extra)``."""
    weights = c.get("kv_criteria_weights")
    read_at = c.get("output_read_layer")
    at = {} if read_at is None else {"output_read_layer": read_at}
    return ([("all memories", "semantic", entries, "token", "next", {})]
            + [(s, s, c["budget"], "token", "next", {}) for s in STRATEGIES]
            + [(f"{s}, values = {_VALUE_LABEL[v]}", s, c["budget"], "token", v, {})
               for s, v in c.get("value_ablations", ())]
            + [(f"{s}, per segment", s, c["budget"], "segment", "next", {}) for s in c.get("segment_strategies", ())]
            + [("all memories, KV read", "semantic", entries, "token", "kv", {})]
            + [(f"{s}, KV read", s, c["budget"], "token", "kv", {}) for s in STRATEGIES]
            + ([("multi_criteria, KV read, weights " + _weights_label(weights), "multi_criteria", c["budget"],
                 "token", "kv", {"criteria_weights": weights})] if weights else [])
            + [("semantic, output read at the last block", "semantic", c["budget"], "token", "output", {})]
            + [(f"{s}, output read" + ("" if read_at is None else f" at block {read_at}"), s, c["budget"], "token",
                "output", at) for s in STRATEGIES])


def run(out_dir: str | Path, preset: str = "default", progress: bool = True) -> dict[str, Any]:
    c = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = (c["gap"] + 1) * c["segment"]
    # checks first, on fresh models of every configuration, before anything trains
    check = verify_cmr({label: (lambda a=args: _cmr(_gpt2(c), c, *a)) for label, *args in _configs(c, entries)},
                       vocab=_vocab(c), segment=c["segment"])
    if not check["passed"]:
        payload = {"suite": "cmr-recall", "preset": preset, "results": [], "check": check, **provenance(c)}
        write_json(out_dir / "cmr_recall.json", payload)
        return payload
    torch.manual_seed(0)
    gpt2 = _gpt2(c)
    start = time.perf_counter()
    base_accs = train_base(gpt2, c, progress)
    base_s = time.perf_counter() - start
    for p in gpt2.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(123)
    eval_batch = min(c["eval_episodes"], 64)
    episodes = [episode_batch(c, eval_batch, g) for _ in range(math.ceil(c["eval_episodes"] / eval_batch))]
    with torch.no_grad():
        window = [in_window_batch(c, eval_batch, g) for _ in range(len(episodes))]
        in_window = sum(_masked_loss_acc(gpt2(input_ids=x).logits, x, m)[1] for x, m in window) / len(window)
    rows = [{"model": "base, facts in window", "accuracy": in_window},
            {"model": "base, facts beyond window", "accuracy": None}]
    untrained = _cmr(gpt2, c, "semantic", entries)
    rows[1]["accuracy"] = evaluate(untrained, episodes, use_memory=False)
    rows.append({"model": "CMR untrained (output projection 0)", "accuracy": evaluate(untrained, episodes)})
    untrained.remove_hooks()
    untrained_kv = _cmr(gpt2, c, "semantic", entries, values="kv")
    acc = evaluate(untrained_kv, episodes)
    rows.append({"model": "CMR untrained, KV read of all memories (memory weight 0)", "budget": entries,
                 "accuracy": acc, "vs_in_window": acc / max(in_window, 1e-9)})
    untrained_kv.remove_hooks()
    curves = {}
    configs = _configs(c, entries)
    for label, strategy, budget, mode, values, extra in configs:
        model = _cmr(gpt2, c, strategy, budget, mode, values, extra)
        last = str(model.read_layer if values == "output" else c["n_layer"] - 1)
        start = time.perf_counter()
        lr = _row_lr(c, strategy, values, extra)
        steps = c.get(f"{values}_steps") if values in ("kv", "output") else None
        scorer_lr = c.get("kv_scorer_lr") if values == "kv" else None
        curves[label] = train_cmr_episodes(model, c, progress, f"CMR {label}", lr, scorer_lr, steps)
        details: dict = {}
        acc = evaluate(model, episodes, details=details)
        first = len(rows)
        rows.append({"model": f"CMR trained: {label}", "strategy": strategy, "mode": mode, "memory_values": values,
                     "budget": budget, "lr": lr, "steps": len(curves[label]), "read_layer": int(last),
                     **({"criteria_weights": extra["criteria_weights"]} if "criteria_weights" in extra else {}),
                     "scorer_lr": scorer_lr if strategy == "contextual" else None,
                     "accuracy": acc, "vs_in_window": acc / max(in_window, 1e-9),
                     "accuracy_memory_off": evaluate(model, episodes, False),
                     "planted_hit_rate": details.get(last, {}).get("planted_hit_rate"),
                     "planted_hit_chance": details.get(last, {}).get("chance"),
                     "key_entry_hit_rate": details.get(last, {}).get("key_entry_hit_rate"),
                     "key_entry_chance": details.get(last, {}).get("key_entry_chance"), "planted_hits_per_layer": details,
                     "train_s": time.perf_counter() - start,
                     "gates": {} if values == "output" else {k: torch.tanh(r.gate).item() for k, r in model.reweavers.items()},
                     "kv_memory_weight": {k: r.bias.tolist() for k, r in model.kv_readers.items()},
                     "output_theta": model.output_read.theta if model.output_read is not None else None,
                     "output_score_scale": (float(model.output_read.score_scale.detach())
                                            if model.output_read is not None else None)})
        if strategy == "multi_criteria" and mode == "token":
            rows.extend(_criteria_switched_off(model, episodes, label, last, in_window))
        if progress:
            for r in rows[first:]:
                off = r.get("accuracy_memory_off")
                tqdm.write(f"{r['model']}: accuracy {r['accuracy']:.3f} ({r['vs_in_window']:.2f} x in-window "
                           f"{in_window:.3f}" + ("" if off is None else f"; memory off {off:.3f}")
                           + f"), planted hit rate {r['planted_hit_rate']} (chance {r['planted_hit_chance']})")
        model.remove_hooks()
    payload = {"suite": "cmr-recall", "preset": preset, "chance": 1.0 / c["keys"], "buffer_entries_per_layer": entries,
               "results": rows, "base_train_s": base_s, "base_steps_run": len(base_accs),
               "base_final_train_acc": sum(base_accs[-20:]) / max(len(base_accs[-20:]), 1),
               "cmr_losses": curves, "check": check, **provenance(c)}
    write_json(out_dir / "cmr_recall.json", payload)
    (out_dir / "cmr_recall.md").write_text(markdown_table(rows, ["model", "budget", "accuracy", "vs_in_window",
                                                                          "accuracy_memory_off", "planted_hit_rate",
                                                                          "planted_hit_chance", "key_entry_hit_rate",
                                                                          "key_entry_chance"]))
    _plot(rows, curves, c, out_dir / "cmr_recall.png")
    return payload


def _plot(rows, curves, c, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.barh([r["model"] for r in rows], [r["accuracy"] for r in rows])
    a.axvline(1.0 / c["keys"], color="k", ls="--", label="chance")
    a.set_xlabel("query accuracy")
    a.set_ylabel("configuration")
    a.legend()
    a.set_title(f"recall {c['gap']} segments after the facts (window {c['segment']})")
    for label, losses in curves.items():
        b.plot(losses, label=label)
    b.set_xlabel("CMR training step")
    b.set_ylabel("loss at query values")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
