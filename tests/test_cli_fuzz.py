"""Fuzz the CLI's `--set` keys with hypothesis: whatever value a user types for any key of any
section, `mnnn train` answers with one `error: ...` line and exit status 2 (a user error) and
never a traceback or an "unexpected" internal error. The data folder is empty, so a config that
passes every check stops at the data loader (with its own one-line error) before training."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mnnn.cli import main  # noqa: E402
from mnnn.lm import LANGUAGE_MODELS, TRAINING_SCHEMA  # noqa: E402
from mnnn.models.s3cmn import S3CMNConfig  # noqa: E402

SMALL = {  # a small model of each kind, so that a config that passes builds in milliseconds
    "s3cmn": "model:\n  name: s3cmn\n  vocab_size: 64\n  embedding_dim: 8\n  hidden_dim: 8\n  d_state: 4\n"
             "  max_len: 32\nmemory:\n  memory_size: 16\n  memory_top_k: 4\n",
    "text_native_ssmn": "model:\n  name: text_native_ssmn\n  vocab_size: 64\n  embed_dim: 8\n  hidden_dim: 8\n"
                        "  window_size: 4\n  num_layers: 2\n  num_heads: 2\n",
    "transformer": "model:\n  name: transformer\n  vocab_size: 64\n  d_model: 8\n  num_heads: 2\n  max_len: 32\n",
    "lstm": "model:\n  name: lstm\n  vocab_size: 64\n  embed_dim: 8\n  hidden_dim: 8\n",
}
MEMORY_KEYS = ["memory_size", "memory_top_k", "memory_interval", "memory_fusion", "memory_theta", "memory_lambda",
               "memory_compressed_dim", "memory_quantize", "memory_similarity_threshold", "enabled"]


def _keys(model: str) -> list[str]:
    if model == "s3cmn":
        names = [f.name for f in dataclasses.fields(S3CMNConfig)]
    else:
        names = [p for p in inspect.signature(LANGUAGE_MODELS[model].__init__).parameters if p != "self"]
    return ([f"model.{n}" for n in names] + [f"memory.{n}" for n in MEMORY_KEYS]
            + [f"training.{n}" for n in TRAINING_SCHEMA] + ["model.name", "model.no_such_key", "training.nope"])


def _yaml(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value) if not isinstance(value, list) else "[" + ", ".join(_yaml(v) for v in value) + "]"


# Positive integers stay small: a large size or depth is a legal model that takes gigabytes or
# hours to build, which is the user's call (no cap is imposed on sizes).
VALUES = st.one_of(
    st.integers(-3, 9), st.just(-(10**12)), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(alphabet="abcxyz_- .", max_size=6),
    st.lists(st.integers(-2, 2), max_size=2), st.sampled_from(["output", "membrane", "both", "hebbian", "delta"]),
)


@pytest.mark.parametrize("model", list(SMALL))
def test_any_set_value_is_one_line_error_never_a_traceback(model, tmp_path_factory, monkeypatch, capsys):
    root = tmp_path_factory.mktemp(f"fuzz_{model}")
    (root / "data").mkdir()
    config = root / "small.yaml"
    config.write_text(SMALL[model] + "training:\n  time_budget_s: 1\n  batch_size: 2\n  seq_len: 8\n")
    monkeypatch.setenv("MNNN_DATA_DIR", str(root / "data"))  # empty: nothing can train
    keys = _keys(model)

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.sampled_from(keys), VALUES), min_size=1, max_size=2))
    def check(items):
        overrides = [a for key, value in items for a in ("--set", f"{key}={_yaml(value)}")]
        code = main(["train", "--config", str(config), "--no-resume", "--quiet", "--out", str(root / "out"),
                     *overrides])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (overrides, code, err)
        assert err and err[-1].startswith("error: ") and not err[-1].startswith("error: unexpected "), (overrides, err)

    check()
