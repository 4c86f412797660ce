import pytest
import torch

from mnnn.models.lm_baselines import LSTMLM, TransformerLM


def test_transformer_kv_step_equals_forward():
    torch.manual_seed(0)
    model = TransformerLM(50, d_model=32, num_layers=2, num_heads=2, max_len=64).eval()
    x = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        full, _ = model(x)
        cache, outs = model.init_cache(3), []
        for t in range(x.shape[1]):
            out, cache = model.step(x[:, t], cache)
            outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.k.shape == (2, 3, 2, 20, 16)


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


def test_lstm_chunks_equal_whole():
    torch.manual_seed(0)
    model = LSTMLM(30, embed_dim=8, hidden_dim=12).eval()
    x = torch.randint(0, 30, (2, 10))
    with torch.no_grad():
        whole, _ = model(x)
        a, s = model(x[:, :4])
        b, _ = model(x[:, 4:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), whole)


def test_lstm_step_equals_forward():
    torch.manual_seed(0)
    model = LSTMLM(30, embed_dim=8, hidden_dim=12).eval()
    x = torch.randint(0, 30, (2, 6))
    with torch.no_grad():
        whole, _ = model(x)
        state, outs = model.init_state(2), []
        for t in range(x.shape[1]):
            out, state = model.step(x[:, t], state)
            outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 1), whole)
