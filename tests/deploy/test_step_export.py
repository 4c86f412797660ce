"""The exportable step graph (mnnn.deploy.step) against model.step, torch.export and ONNX round trips."""

import functools
import json
import os

import numpy as np
import pytest
import torch

from mnnn.deploy.export import OnnxStep, export_step, load_torch_export
from mnnn.deploy.step import manifest, step_graph
from mnnn.models.lm_baselines import LSTMLM, TransformerLM
from mnnn.models.s3cmn import S3CMN
from mnnn.models.ssmn import TextNativeSSMNNetwork

V, T = 97, 256


def s3cmn(**kw):
    torch.manual_seed(0)
    model = S3CMN(vocab_size=V, embedding_dim=24, hidden_dim=32, num_layers=2, d_state=8, max_len=48,
                  memory_size=40, memory_top_k=6, **kw).eval()
    with torch.no_grad():
        model.embed.weight.mul_(20)  # logits of order 1, so a 1e-4 check means something
        for block in model.blocks:  # neurons that fire (~40 %), so the spike path is exercised
            block.spiking.fc.weight.mul_(4)
        if model.output_memory is not None:
            model.output_memory.gate.bias.zero_()  # lambda 0.5: the memory moves the output
    return model


def lstm():
    torch.manual_seed(0)
    model = LSTMLM(V, embed_dim=16, hidden_dim=24, num_layers=2).eval()
    with torch.no_grad():
        model.embed.weight.mul_(50)
    return model


def tokens(batch=2, seed=0):
    # few distinct ids, so the 40-slot ring wraps and its reads hit
    return torch.randint(0, 12, (batch, T), generator=torch.Generator().manual_seed(seed))


def model_steps(model, toks):
    state, outs = model.init_state(toks.shape[0]), []
    with torch.no_grad():
        for t in range(toks.shape[1]):
            logits, state = model.step(toks[:, t], state)
            outs.append(logits)
    return torch.stack(outs, 1)


def ssmn(rule):
    def build():
        torch.manual_seed(0)
        model = TextNativeSSMNNetwork(V, embed_dim=16, hidden_dim=32, window_size=8, num_layers=3, plastic_ratio=0.4,
                                      num_heads=2, plasticity_rule=rule).eval()
        with torch.no_grad():
            model.embed.weight.mul_(50)  # logits of order 1, so a 1e-4 check means something
        return model
    return build


CASES = {"s3cmn": s3cmn, "s3cmn-no-memory": lambda: s3cmn(use_memory=False), "lstm": lstm,
         **{f"ssmn-{rule}": ssmn(rule) for rule in ("hebbian", "delta", "gated_delta")}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_graph_equals_model_step_over_256_steps(case):
    model, toks = CASES[case](), tokens()
    with torch.no_grad():
        got, _ = step_graph(model).run(toks)
    ref = model_steps(model, toks)
    assert ref.abs().max() > 0.5 and (got - ref).abs().max() < 1e-4
    if case == "s3cmn":
        assert model.get_stats()["spike_rate"] > 0.05 and model.output_memory.get_stats() is not None


def test_memory_switch_is_the_models_memory_off_path_and_changes_the_output():
    model, toks = s3cmn(), tokens()
    with torch.no_grad():
        on, _ = step_graph(model).run(toks)
        off, _ = step_graph(model, memory=False).run(toks)
        model.set_memory_enabled(False)
        ref = model_steps(model, toks)
    assert (off - ref).abs().max() < 1e-4
    assert (on - off).abs().max() > 0.1  # the memory is in the graph, not a no-op


def test_unsupported_models_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="memory_fusion='output'"):
        step_graph(s3cmn(memory_fusion="membrane"))
    with pytest.raises(ValueError, match="no memory switch"):
        step_graph(ssmn("delta")(), memory=False)
    with pytest.raises(ValueError, match="Transformer"):
        step_graph(TransformerLM(V, d_model=16, num_layers=1, num_heads=2, max_len=32))


def test_manifest_describes_the_state():
    graph = step_graph(s3cmn())
    man = manifest(graph, {"model": {}}, 1)
    assert man["inputs"][0] == "token" and len(man["inputs"]) == len(man["outputs"]) == 11
    assert man["state"]["ssm_re"]["shape"] == [2, 1, 32, 4] and man["batch_axes"]["ssm_re"] == 1
    assert man["batch_axes"]["mem_count"] is None and man["state"]["mem_values"]["dtype"] == "int64"
    json.dumps(man)


@pytest.mark.parametrize("case", ["s3cmn", "lstm", "ssmn-gated_delta"])
def test_torch_export_round_trip_with_a_dynamic_batch(case, tmp_path):
    graph = step_graph(CASES[case]())
    man = manifest(graph, {}, 1)
    path = export_step(graph, "torch-export", tmp_path / "step.pt2", man)
    program, loaded = load_torch_export(path)
    assert loaded == json.loads(json.dumps(man))
    step = program.module()
    toks = tokens(batch=3)
    state, outs = graph.init_state(3), []
    with torch.no_grad():
        for t in range(40):
            logits, *state = step(toks[:, t], *state)
            outs.append(logits)
        ref, _ = graph.run(toks[:, :40])
    assert (torch.stack(outs, 1) - ref).abs().max() < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["step.pt2"]  # no temporary left behind


@pytest.mark.parametrize("case", ["s3cmn", "lstm", "ssmn-hebbian", "ssmn-delta"])
def test_onnx_step_equals_pytorch_over_256_steps(case, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    graph = step_graph(CASES[case]())
    path = export_step(graph, "onnx", tmp_path / "step.onnx", manifest(graph, {}, 1))
    runner = OnnxStep(path, threads=1)
    assert runner.manifest["model"] == type(graph.m).__name__
    toks = tokens(batch=3)
    state, outs = runner.init_state(3), []
    for t in range(T):
        logits, state = runner.step(toks[:, t].numpy(), state)
        outs.append(logits)
    with torch.no_grad():
        ref, ref_state = graph.run(toks)
    assert np.abs(np.stack(outs, 1) - ref.numpy()).max() <= 1e-4
    for got, want in zip(state, ref_state):
        assert np.allclose(got, want.numpy(), atol=1e-4)


def test_onnx_runner_refuses_a_foreign_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save_model(helper.make_model(g), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="not an mnnn step export"):
        OnnxStep(tmp_path / "x.onnx")


needs_data = pytest.mark.skipif(not os.environ.get("MNNN_DATA_DIR"), reason="MNNN_DATA_DIR not set")


@needs_data
def test_cli_export_onnx_int8_and_torch_export(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from mnnn.cli import main
    from tests.test_cli_lm import TINY

    assert main(["train", "--out", str(tmp_path / "run"), "--quiet", *TINY]) == 0
    ckpt = str(tmp_path / "run" / "checkpoint.safetensors")
    capsys.readouterr()
    out = tmp_path / "export" / "s3cmn.onnx"
    assert main(["export", ckpt, "--format", "onnx", "--int8", "--eval-tokens", "300", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wikitext-2 valid" in text and "int8" in text and "ppl" in text
    assert out.exists() and (out.parent / "s3cmn.int8.onnx").stat().st_size < out.stat().st_size
    assert sorted(p.name for p in out.parent.iterdir()) == ["s3cmn.int8.onnx", "s3cmn.onnx"]
    assert main(["export", ckpt, "--format", "torch-export", str(tmp_path / "s3cmn.pt2")]) == 0
    assert main(["export", ckpt, "--format", "hf", "--int8", str(tmp_path / "hf")]) == 2
    assert "--int8" in capsys.readouterr().err
    assert main(["export", ckpt, "--format", "torch-export", "--int8", str(tmp_path / "x.pt2")]) == 2

    # a graph that does not compute what the model's step computes is refused and not written
    import mnnn.deploy.step as step_mod

    real = step_mod.S3CMNStep.forward

    @functools.wraps(real)  # keeps forward's signature, which the exporter reads
    def off_by_1e3(self, *args):
        logits, *state = real(self, *args)
        return (logits + 1e-3, *state)

    monkeypatch.setattr(step_mod.S3CMNStep, "forward", off_by_1e3)
    bad = tmp_path / "bad" / "s3cmn.onnx"
    assert main(["export", ckpt, "--format", "onnx", "--eval-tokens", "300", str(bad)]) == 1
    assert "differs from the PyTorch step" in capsys.readouterr().err
    assert not bad.exists() and list(bad.parent.iterdir()) == []
