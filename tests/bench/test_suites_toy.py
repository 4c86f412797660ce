"""Every suite that needs no data runs end to end at its toy size and writes the documented files."""

import json

import numpy as np

import pytest

from mnnn.cli import main

SUITES = ["cmr-recall", "mqar", "copy", "selective-copy", "series", "streaming", "kernels"]


def _failed_check(suite, tmp_path, capsys=None, rows="results"):
    """Run ``suite`` at toy size expecting its check to fail: exit 1, ``check.passed`` false in its
    JSON with the ``rows`` key empty (None: not looked at) and, given ``capsys``, "check failed" on
    stderr. Returns the JSON."""
    assert main(["bench", suite, "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 1
    payload = json.loads((tmp_path / f"{suite.replace('-', '_')}.json").read_text())
    assert payload["check"]["passed"] is False
    if rows is not None:
        assert payload[rows] == []
    if capsys is not None:
        assert "check failed" in capsys.readouterr().err
    return payload


@pytest.mark.parametrize("suite", SUITES)
def test_suite_toy_writes_json_table_plot(suite, tmp_path):
    assert main(["bench", suite, "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    stem = suite.replace("-", "_")
    payload = json.loads((tmp_path / f"{stem}.json").read_text())
    assert payload["suite"] == suite and payload["preset"] == "toy"
    assert payload["results"] and payload["config"] and "git_revision" in payload and "machine" in payload
    assert (tmp_path / f"{stem}.md").read_text().startswith("|")
    assert (tmp_path / f"{stem}.png").stat().st_size > 1000
    if suite in ("copy", "selective-copy"):  # checked first: causal models, a Transformer that solves it
        assert payload["check"]["passed"] and payload["check"]["sanity"]["accuracy"] >= 0.9
        # the memory models are scored again on the same trained model with their memory off
        names = [r["model"] for r in payload["results"]]
        for off in ("s3cmn (memory off)", "text_native_ssmn (fast weights off)"):
            assert names.count(off) == len(names) // 6 and names[names.index(off) - 1] == off.split(" (")[0]
    if suite == "cmr-recall":  # checked first: causal with memory read, the memory path a switch;
        assert payload["check"]["passed"] and len(payload["check"]["checks"]) == 2
        # each multi-criteria row is answered again with one criterion off and with its recency
        rows = payload["results"]  # counted from the write
        for i, row in enumerate(rows):
            if row.get("strategy") == "multi_criteria" and row.get("mode") == "token":
                switched = rows[i + 1: i + 6]
                assert [r.get("switched_off") for r in switched] == ["relevance", "similarity", "recency", "diversity",
                                                                       None]
                assert switched[-1]["recency_from"] == "write" and "recency from the write" in switched[-1]["model"]
                for r in switched[:4]:
                    assert r["criteria_weights"][r["switched_off"]] == 0.0
                    assert abs(sum(r["criteria_weights"].values()) - 1) < 1e-9
    if suite == "series":  # checked first: the windows, a ridge that learns the sine, causal estimators
        assert payload["check"]["passed"] and len(payload["check"]["checks"]) == 3
    if suite == "kernels":  # every op's errors measured before any timing; the rows carry them
        errs = payload["check"]["max_rel_err"]
        assert payload["check"]["passed"] and len(errs) == len(payload["results"])
        assert all(errs[f"{r['op']} T={r['T']}"] == [r["max_rel_err_out"], r["max_rel_err_grad"]]
                   for r in payload["results"])
    if suite == "streaming":  # checked first past the output cache's capacity, the memory switched off once
        check = payload["check"]
        assert check["passed"] and check["tokens"] > payload["results"][0]["context"]
        assert check["memory_effect"]["s3cmn"] > 0 and check["memory_effect"]["text_native_ssmn"] > 0
        # S3CMN is timed twice, model.step and its lean decoder, which the check compared too
        assert check["max_abs_err"]["s3cmn_decoder"] < 1e-3
        names = [r["model"] for r in payload["results"]]
        contexts = {r["context"] for r in payload["results"]}
        assert names.count("s3cmn_decoder") == names.count("s3cmn") == len(contexts)
    if suite == "mqar":  # the toy preset sweeps two learning rates and keeps each model's best
        assert payload["check"]["passed"] and payload["sanity"]["accuracy"] >= 0.9
        for row in payload["results"]:
            assert set(row["accuracy_per_lr"]) == {"0.003", "0.01"}
            assert row["accuracy"] == max(row["accuracy_per_lr"].values()) and row["state_bytes"] > 0
            assert row["chance"] == 1 / 32  # vocab 64: values are drawn from [32, 64)
            # memory models are scored again with their memory off; models without one are not
            assert ("memory_off" in row) == (row["model"] not in ("transformer", "lstm"))


def test_all_skips_suites_without_the_preset(tmp_path, capsys, monkeypatch):
    import mnnn.bench as bench

    monkeypatch.setattr(bench, "SUITES", {"kernels": "mnnn.bench.kernels", "series": "mnnn.bench.series"})
    assert main(["bench", "all", "--preset", "gpu", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "kernels: skipped" in err and "series: skipped" in err and "no suite has the preset 'gpu'" in err


def test_serve_suite_checks_then_measures(tmp_path):
    pytest.importorskip("fastapi")
    assert main(["bench", "serve", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    payload = json.loads((tmp_path / "serve.json").read_text())
    assert payload["check"]["passed"] and "git_revision" in payload and "dirty" in payload
    assert {r["model"] for r in payload["followup"]} == {"s3cmn", "transformer"}
    assert all(r["followup_ms"] > 0 and r["fresh_ms"] > 0 for r in payload["followup"])
    (load,) = payload["load"]
    assert load["errors"] == 0 and load["requests"] > 0 and load["rss_MB_max"] > 10
    assert (tmp_path / "serve.png").stat().st_size > 1000


def test_serve_suite_fails_when_its_check_fails(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    import prometheus_client

    monkeypatch.setattr(prometheus_client, "generate_latest", lambda registry: b"not { metrics")
    payload = _failed_check("serve", tmp_path, capsys, rows=None)
    assert "metrics" in payload["check"]["failures"][0]
    assert not (tmp_path / "serve.png").exists()


def test_serve_suite_fails_when_load_requests_fail(tmp_path, monkeypatch, capsys):
    """The check passes, but every streamed load request is answered 503: the load row keeps its
    error count in the JSON, and the suite shows no table and exits 1."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import contextlib

    @contextlib.contextmanager
    def busy(self, method, url, **kwargs):  # only the load loop streams
        yield httpx.Response(503, text="busy")

    monkeypatch.setattr(httpx.Client, "stream", busy)
    payload = _failed_check("serve", tmp_path, capsys)
    (load,) = payload["load"]
    assert load["requests"] == 0 and load["errors"] > 0 and "load requests failed" in payload["check"]["failures"][0]
    assert not (tmp_path / "serve.md").exists()


def test_mqar_fails_when_its_sanity_check_fails(tmp_path, monkeypatch, capsys):
    """An untrained Transformer (learning rate 0) cannot pass the sanity check: no grid, exit 1."""
    from mnnn.bench import mqar

    monkeypatch.setitem(mqar.PRESETS["toy"], "sanity", {**mqar.PRESETS["toy"]["sanity"], "lr": 0.0})
    payload = _failed_check("mqar", tmp_path, capsys)
    assert payload["sanity"]["accuracy"] < 0.5 and "sanity" in payload["check"]["failures"][0]
    assert not (tmp_path / "mqar.png").exists()


@pytest.mark.parametrize("suite", ["copy", "selective-copy"])
def test_copy_suites_fail_when_a_model_leaks_the_future(suite, tmp_path, monkeypatch, capsys):
    """A model whose output at t reads token t + 1 fails the causality check: nothing is trained, exit 1."""
    from mnnn.bench import copying

    real = copying.tt.build

    def build(name, *args):
        model = real(name, *args)
        if name == "lstm":
            features = model.features
            model.features = lambda x, state=None: (features(x.roll(-1, dims=1))[0], None)
        return model

    monkeypatch.setattr(copying.tt, "build", build)
    payload = _failed_check(suite, tmp_path, capsys)
    assert payload["check"]["failures"][0].startswith("lstm: output before position")
    assert not (tmp_path / f"{suite.replace('-', '_')}.png").exists()


def test_copy_fails_when_its_sanity_check_fails(tmp_path, monkeypatch):
    """An untrained Transformer (learning rate 0) cannot solve even the shortest delay."""
    from mnnn.bench import copying

    monkeypatch.setitem(copying.PRESETS["toy"], "sanity", {**copying.PRESETS["toy"]["sanity"], "lr": 0.0})
    payload = _failed_check("copy", tmp_path, rows=None)
    assert payload["check"]["sanity"]["accuracy"] < 0.5
    assert "sanity" in payload["check"]["failures"][0]


def test_export_suite_checks_then_compares_engines(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["bench", "export", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    payload = json.loads((tmp_path / "export.json").read_text())
    assert payload["check"]["passed"] and "git_revision" in payload
    rows = payload["results"]
    assert {(r["memory"], r["engine"]) for r in rows} == {
        (m, e) for m in ("on", "off") for e in ("PyTorch step", "torch.export", "ONNX fp32", "ONNX int8 (dynamic)")}
    for r in rows:
        if r["engine"] in ("torch.export", "ONNX fp32"):
            assert r["max_abs_logit_err"] <= 1e-4
    on = {r["engine"]: r for r in rows if r["memory"] == "on"}
    assert abs(on["ONNX fp32"]["ppl"] - on["PyTorch step"]["ppl"]) < 1e-2 * on["PyTorch step"]["ppl"]
    assert (tmp_path / "export.png").stat().st_size > 1000


def test_export_suite_fails_when_the_onnx_graph_is_wrong(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import functools

    import mnnn.deploy.step as step_mod

    real = step_mod.S3CMNStep.forward

    @functools.wraps(real)
    def off_by_1e3(self, *args):
        logits, *state = real(self, *args)
        return (logits + 1e-3, *state)

    monkeypatch.setattr(step_mod.S3CMNStep, "forward", off_by_1e3)
    payload = _failed_check("export", tmp_path, rows=None)
    assert "differs" in payload["check"]["failures"][0]
    assert not (tmp_path / "export.png").exists()


def test_soak_suite_measures_a_planted_leak_and_bounded_models(tmp_path):
    from mnnn.bench import soak

    payload = soak.run(tmp_path, "toy", progress=False)
    assert payload["check"]["passed"] and payload["check"]["planted_leak_measured_KiB_per_step"] > 2
    assert {r["model"] for r in payload["results"]} == set(soak.build())
    assert all(r["ms_per_step"] > 0 and r["rss_end_MB"] > 10 for r in payload["results"])
    assert (tmp_path / "soak.png").stat().st_size > 1000


def test_soak_growth_fit():
    from mnnn.bench.soak import growth

    flat = [(i * 100, 50_000_000 + (i % 2) * 4096, 1.0) for i in range(11)]
    leaking = [(i * 100, 50_000_000 + i * 100 * 2048, 1.0) for i in range(11)]
    assert abs(growth(flat, 0.2)[0]) < 10 and growth(flat, 0.2)[1] > 0
    assert abs(growth(leaking, 0.2)[0] - 2048) < 1e-6
    with pytest.raises(ValueError, match="too few samples"):
        growth(flat[:2], 0.2)


def test_robustness_suite_reports_distribution_beside_baselines(tmp_path):
    assert main(["bench", "robustness", "--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    payload = json.loads((tmp_path / "robustness.json").read_text())
    assert payload["check"]["passed"] and "git_revision" in payload and "dirty" in payload
    assert len(payload["runs"]) == 3 * 2  # three models x two initialisations x one task
    by_model = {r["model"]: r for r in payload["results"]}
    for name in ("amrc", "pmrc", "amn"):
        scores = [r["r2"] for r in payload["runs"] if r["model"] == name]
        assert by_model[name]["min_r2"] == min(scores)
        assert by_model[name]["runs_ge_0.98"] == sum(s >= 0.98 for s in scores)
    # the baselines are what they claim: persistence ~0.89 on this task, ridge near the noise floor
    assert 0.85 < by_model["last value (baseline)"]["min_r2"] < 0.93 < by_model["ridge on lags (baseline)"]["min_r2"]
    assert (tmp_path / "robustness.png").stat().st_size > 1000


def test_robustness_suite_fails_when_a_snapshot_does_not_restore(tmp_path, monkeypatch, capsys):
    from mnnn.estimators import AMN

    monkeypatch.setattr(AMN, "set_manifold_state", lambda self, manifold: None)
    payload = _failed_check("robustness", tmp_path, capsys, rows="runs")
    assert any(f.startswith("amn: a restored memory snapshot") for f in payload["check"]["failures"])


def test_ssmn_suite_fails_when_a_fast_form_is_wrong(tmp_path, monkeypatch, capsys):
    from mnnn.bench import ssmn

    monkeypatch.setattr(ssmn, "window_attention_naive", lambda q, k, v, w: (v * 0.5, None))
    payload = _failed_check("ssmn", tmp_path, capsys)
    assert payload["check"]["failures"][0].startswith("window_attention: fast and naive forms differ")


def _leaky_gpt2(make):
    """A GPT-2 whose logits at position t read token t + 1."""
    def build(c):
        model = make(c)
        forward = model.forward
        model.forward = lambda input_ids=None, **kw: forward(input_ids=input_ids.roll(-1, dims=1), **kw)
        return model
    return build


@pytest.mark.parametrize("suite", ["cmr-recall", "cmr-wikitext"])
@pytest.mark.parametrize("broken", ["future leak", "memory path cut"])
def test_cmr_suites_fail_when_a_model_is_broken(suite, broken, tmp_path, monkeypatch, capsys):
    """Checked before anything trains (and before cmr-wikitext reads its data): a base that sees the
    next token, or a CMR that never stores a memory, fails the check and the suite exits 1."""
    import importlib

    from mnnn.models.cmr import CMRModel

    module = importlib.import_module(f"mnnn.bench.{suite.replace('-', '_')}")
    if broken == "future leak":
        monkeypatch.setattr(module, "_gpt2", _leaky_gpt2(module._gpt2))
    else:
        monkeypatch.setattr(CMRModel, "_store", lambda self, *args: None)
    monkeypatch.delenv("MNNN_DATA_DIR", raising=False)  # the check comes before any data is read
    payload = _failed_check(suite, tmp_path, capsys)
    expected = "future leak" if broken == "future leak" else "memory path changes nothing"
    assert payload["check"]["failures"] and all(expected in f for f in payload["check"]["failures"])


@pytest.mark.parametrize("broken", ["targets", "estimator"])
def test_series_fails_when_its_data_or_an_estimator_is_broken(broken, tmp_path, monkeypatch, capsys):
    """Targets two steps ahead (not the next value), or an estimator that reads its rows backwards
    (a future leak): the check fails before anything trains and the suite exits 1."""
    from mnnn.bench import series

    if broken == "targets":
        real = series.noisy_sine

        def shifted(**kw):
            Xtr, ytr, Xte, yte = real(**kw)
            y = np.concatenate([ytr, yte])
            y = np.concatenate([y[1:], y[-1:]])
            return Xtr, y[: len(ytr)], Xte, y[len(ytr):]

        monkeypatch.setattr(series, "noisy_sine", shifted)
    else:
        Real = series.MODELS["lstm"]

        class Backwards(Real):
            def predict(self, X, reset_memory=False):
                return super().predict(np.asarray(X)[::-1].copy(), reset_memory)[::-1].copy()

        monkeypatch.setitem(series.MODELS, "lstm", Backwards)
    failures = _failed_check("series", tmp_path, capsys)["check"]["failures"]
    if broken == "targets":
        assert failures[0].startswith("sine: the windows are not consecutive")
    else:
        assert [f.split(":")[0] for f in failures] == ["lstm", "lstm"] and "future leak" in failures[1]


@pytest.mark.parametrize("broken", ["future leak", "memory off", "frozen fast weights", "decoder"])
def test_streaming_fails_when_a_model_is_broken(broken, tmp_path, monkeypatch, capsys):
    """A model whose parallel forward sees the next token (the step path cannot), an S3CMN built
    without its memory, an SSMN that never writes its fast weights, or an S3CMN decoder that
    forgets to mix its memory in: the check fails before anything is timed, the JSON holds no
    rows and the suite exits 1."""
    import torch

    from mnnn.bench import streaming
    from mnnn.models.lm_baselines import LSTMLM
    from mnnn.models.s3cmn import S3CMN

    real = streaming.build

    class Leaky(LSTMLM):
        def forward(self, tokens, state=None):
            logits, state = super().forward(tokens, state)
            nxt = torch.nn.functional.one_hot(tokens[:, 1:], logits.shape[-1]).to(logits.dtype)
            return torch.cat([logits[:, :-1] + nxt, logits[:, -1:]], 1), state

    def build(c):
        models = real(c)
        if broken == "future leak":
            old = models["lstm"]
            models["lstm"] = Leaky(c["vocab"], embed_dim=c["d"], hidden_dim=c["d"], num_layers=c["layers"])
            models["lstm"].load_state_dict(old.state_dict())
        elif broken == "memory off":
            models["s3cmn"] = S3CMN(vocab_size=c["vocab"], embedding_dim=c["d"], hidden_dim=c["d"],
                                    num_layers=c["layers"], memory_size=1024, d_state=16, max_len=c["chunk"],
                                    use_memory=False)
        else:
            for layer in models["text_native_ssmn"].core.synaptic_layers():
                layer.eta = 0.0  # the rule's switch: every write stops
        return models

    if broken == "decoder":
        from mnnn.models.s3cmn_decode import S3CMNDecoder

        monkeypatch.setattr(S3CMNDecoder, "_mix", lambda self, om, feats, token, logits, state, theta:
                            torch.log_softmax(logits, -1))
    else:
        monkeypatch.setattr(streaming, "build", build)
    failures = _failed_check("streaming", tmp_path, capsys)["check"]["failures"]
    expected = {"future leak": ["lstm: step path differs", "lstm: the forward in chunks differs"],
                "memory off": ["s3cmn: switching its memory off moved no logit"],
                "decoder": ["s3cmn_decoder: the lean decoder differs from the parallel forward"],
                "frozen fast weights": ["text_native_ssmn: switching its fast weights off moved no logit"]}[broken]
    assert [f[: len(e)] for f, e in zip(failures, expected)] == expected and len(failures) == len(expected)


@pytest.mark.parametrize("suite", ["kernels", "estimators", "memory"])
def test_check_failure_is_written_not_raised(suite, tmp_path, monkeypatch, capsys):
    """A fast op that drifts from its naive loop (kernels), a network whose step path is not its
    forward (estimators), a memory search that returns other entries than brute force (memory):
    the check fails before anything is timed, the failure is in the JSON with no rows, exit 1."""
    if suite == "kernels":
        from mnnn.bench import kernels

        real = kernels.cases

        def cases(*args):
            out = real(*args)
            fast, naive, inputs = out["linear_scan"]
            out["linear_scan"] = (lambda a, b: fast(a, b) * 1.01, naive, inputs)
            return out

        monkeypatch.setattr(kernels, "cases", cases)
        expected = "linear_scan T=32: fast form differs from the naive loop"
    elif suite == "estimators":
        from mnnn.bench import estimators

        Real = estimators.MODELS["gru"]

        class Drifting(Real):
            def _build(self, n_in, n_out):
                net = super()._build(n_in, n_out)
                forward = net.forward

                def drifting(x, state=None, **kw):  # the whole-sequence path only: steps have T = 1
                    y, state = forward(x, state, **kw)
                    return (y + 0.01 if x.shape[1] > 1 else y), state

                net.forward = drifting
                return net

        monkeypatch.setitem(estimators.MODELS, "gru", Drifting)
        expected = "gru: step and forward disagree by 1.00e-02"
    else:
        from mnnn.memory import Memory

        real = Memory.search

        def search(self, *args, **kw):  # the right entries in the wrong order
            found = real(self, *args, **kw)
            return found._replace(indices=found.indices.flip(-1))

        monkeypatch.setattr(Memory, "search", search)
        expected = "Memory top-k disagrees with brute force at n=1000"
    failures = _failed_check(suite, tmp_path, capsys)["check"]["failures"]
    assert [f[: len(expected)] for f in failures] == [expected]
