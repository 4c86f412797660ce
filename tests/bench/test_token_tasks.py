"""The shared trainer of the token suites scores every batch as independent examples."""

import torch

from mnnn.bench import token_tasks as tt


def test_a_batch_never_reads_entries_of_an_earlier_batch():
    """S3CMN's membrane stores live in the module: without the reset, batch B's outputs would
    depend on the batch scored before it."""
    torch.manual_seed(0)
    model = tt.build("s3cmn", 16, 32, 40, 16).eval()
    with torch.no_grad():
        for block in model.blocks:  # an untrained read is zero by construction: make it count
            block.mem_in.weight.normal_(0, 1.0)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(3, 16, (4, 40), generator=g), torch.randint(3, 16, (4, 40), generator=g)
    with torch.no_grad():
        fresh, _ = tt._scored(model, b, b)
        tt._scored(model, a, a)
        after_a, _ = tt._scored(model, b, b)
    assert torch.equal(after_a, fresh)
