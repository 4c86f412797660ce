import pytest
import torch

from mnnn.data.tasks import IGNORE, copy_task, mqar, selective_copy


def test_mqar_layout():
    V, L, kv = 64, 32, 4
    x, y = mqar(50, V, L, kv, seed=0)
    assert x.shape == y.shape == (50, L)
    keys, values = x[:, 0 : 2 * kv : 2], x[:, 1 : 2 * kv : 2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert all(len(set(row.tolist())) == kv for row in keys)
    assert ((y != IGNORE).sum(1) == kv).all()
    for i in range(50):
        pos = (y[i] != IGNORE).nonzero().squeeze(1)
        for p in pos:  # the key is read at p, its value is the label and the next input
            k = x[i, p]
            j = (keys[i] == k).nonzero().item()
            assert y[i, p] == values[i, j] == x[i, p + 1]
    assert (y[:, : 2 * kv] == IGNORE).all()


def test_mqar_bad_input():
    with pytest.raises(ValueError, match="too short"):
        mqar(2, 64, 10, 4)
    with pytest.raises(ValueError, match="num_examples"):
        mqar(0)


def test_copy_and_selective_copy():
    x, y = copy_task(10, num_tokens=3, delay=5, vocab_size=8)
    assert x.shape[1] == 2 * 3 + 5 + 1
    torch.testing.assert_close(y[:, 3 + 5 : 3 + 5 + 3], x[:, :3])
    assert (x[:, 3 + 5 + 1 :] == 0).all() and (x[:, 8] == 1).all()
    x, y = selective_copy(10, num_tokens=3, seq_len=12, vocab_size=8)
    for i in range(10):
        data = x[i, :12][x[i, :12] >= 3]
        torch.testing.assert_close(y[i, 12:15], data)
    with pytest.raises(ValueError, match="vocab_size"):
        copy_task(2, vocab_size=3)
