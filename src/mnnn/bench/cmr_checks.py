"""The checks that can fail, run by the CMR suites that train (cmr-recall, cmr-wikitext) before
they train anything.

For each configuration a suite trains, a fresh CMR of it is built on a fresh base of the suite's
architecture, its reads opened as training opens them (the reweaving's output projection and gate
are zero and closed at construction; the KV read and the output read are open as built), and it
reads the memory of one segment while answering the next:

- causality: changing token ``j`` of the answering segment changes no logit before ``j``;
- memory path: with the memory on the logits differ from the base's (the read is exercised), and
  with ``use_memory=False`` they are the base's (a switch, not a second model).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

CHECKS = ["causality with memory read (a token of the answering segment changed)",
          "memory path: memory on != the base, memory off == the base"]


def open_reads(model) -> None:
    """What training does to the reads that start closed: the reweaving's output projection
    (zero at construction) gets small random weights and its gate opens."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for r in model.reweavers.values():
            r.gate.fill_(2.0)
            w = r.attn.out_proj.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.2)


def verify_cmr(builds: dict[str, Callable[[], Any]], vocab: int, segment: int, batch: int = 2) -> dict[str, Any]:
    """``builds``: label -> a function returning a fresh CMR of one configuration on a fresh base.
    Returns ``{"passed", "failures", "checks"}``."""
    failures = []
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab, (batch, segment), generator=g)
    # the answering segment repeats the first, so a read by similarity finds its entries
    second = first.clone()
    j = segment // 2
    changed = second.clone()
    changed[:, j] = (changed[:, j] + 1) % vocab
    for label, build in builds.items():
        model = build().eval()
        open_reads(model)
        with torch.no_grad():
            outputs = {}
            for name, tokens, memory in (("on", second, True), ("changed", changed, True), ("off", second, False)):
                model.reset_memory()
                model(first)
                outputs[name] = model(tokens, use_memory=memory).logits
            base = model.base(input_ids=second).logits
        model.remove_hooks()
        leak = float((outputs["changed"][:, :j] - outputs["on"][:, :j]).abs().max())
        if leak > 1e-5:
            failures.append(f"{label}: a logit before position {j} changed by {leak:.2e} when token {j} changed "
                            "(future leak)")
        if float((outputs["off"] - base).abs().max()) > 1e-5:
            failures.append(f"{label}: memory off is not the base model")
        if float((outputs["on"] - base).abs().max()) < 1e-6:
            failures.append(f"{label}: the memory path changes nothing (memory on == the base)")
    return {"passed": not failures, "failures": failures, "checks": CHECKS}
