import pytest
import torch

from mnnn.models.lm_baselines import LSTMLM, TransformerLM
from mnnn.state import step_through


def test_transformer_kv_step_equals_forward():
    torch.manual_seed(0)
    model = TransformerLM(50, d_model=32, num_layers=2, num_heads=2, max_len=64).eval()
    x = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        full, _ = model(x)
        steps, cache = step_through(model, x, model.init_cache(3))
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    assert cache.k.shape == (2, 3, 2, 64, 16) and int(cache.length) == 20


def test_transformer_kv_step_gradients_equal_forward():
    torch.manual_seed(0)
    model = TransformerLM(40, d_model=16, num_layers=2, num_heads=2, max_len=12)
    x = torch.randint(0, 40, (2, 7))
    model(x)[0].pow(2).mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    steps, cache = step_through(model, x, model.init_cache(2, capacity=7))
    steps.pow(2).mean().backward()
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="full"):
        model.step(x[:, 0], cache)
    with pytest.raises(ValueError, match="capacity"):
        model.init_cache(1, capacity=13)


def test_transformer_causal_and_too_long():
    torch.manual_seed(0)
    model = TransformerLM(50, d_model=16, num_layers=1, num_heads=2, max_len=8).eval()
    x = torch.randint(0, 50, (1, 8))
    y = x.clone()
    y[0, 5] = (x[0, 5] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0][:, :5], model(y)[0][:, :5])
        with pytest.raises(ValueError, match="max_len"):
            model(torch.zeros(1, 9, dtype=torch.long))


def test_lstm_whole_equals_chunks_equals_steps():
    torch.manual_seed(0)
    model = LSTMLM(30, embed_dim=8, hidden_dim=12).eval()
    x = torch.randint(0, 30, (2, 10))
    with torch.no_grad():
        whole, _ = model(x)
        a, s = model(x[:, :4])
        b, _ = model(x[:, 4:], s)
        steps, _ = step_through(model, x)
    torch.testing.assert_close(torch.cat([a, b], 1), whole)
    torch.testing.assert_close(steps, whole)
