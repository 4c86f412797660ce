"""The memory switches used for on/off rows: they switch the memory off and put back what they found."""

import pytest
import torch

from mnnn.bench import token_tasks as tt
from mnnn.bench.switches import fast_weights_off, memory_off


def _tn_ssmn():
    torch.manual_seed(0)
    return tt.build("text_native_ssmn", vocab=12, d=32, seq_len=16, window=4)


def test_fast_weights_off_zeroes_every_layers_rate_and_restores_each_layers_own():
    model = _tn_ssmn()
    layers = model.core.synaptic_layers()
    layers[0].eta, layers[0].lam = 0.3, 0.9
    if len(layers) > 1:
        layers[1].eta, layers[1].lam = 0.05, 0.7
    saved = [(s.eta, s.lam) for s in layers]
    with pytest.raises(RuntimeError), fast_weights_off(model.core):
        assert all(s.eta == 0.0 for s in layers)
        assert [s.lam for s in layers] == [lam for _, lam in saved]
        raise RuntimeError("the body failed")
    assert [(s.eta, s.lam) for s in layers] == saved


def test_memory_off_changes_the_output_of_a_model_with_memory_and_nothing_else():
    x = torch.randint(3, 12, (2, 16))
    model = _tn_ssmn().eval()
    with torch.no_grad():
        on, _ = model.features(x)
        with memory_off(model) as what:
            off, _ = model.features(x)
        again, _ = model.features(x)
    assert what == "fast weights"
    assert not torch.allclose(on, off)  # the switch reaches the model
    torch.testing.assert_close(again, on, rtol=0, atol=0)  # and is put back

    s3 = tt.build("s3cmn", vocab=12, d=32, seq_len=16, window=4)
    s3.set_memory_enabled(False)
    with memory_off(s3) as what:
        assert what == "memory" and not s3.memory_enabled
    assert not s3.memory_enabled  # the setting found, not "on"

    lstm = tt.build("lstm", vocab=12, d=32, seq_len=16, window=4)
    with memory_off(lstm) as what:
        assert what is None
