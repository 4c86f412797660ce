import subprocess
import sys

import mnnn


def test_every_seed_name_imports_from_mnnn():
    for name in mnnn.__all__:
        assert getattr(mnnn, name) is not None, name
    from mnnn import CMRModel, Memory, S3CMN, SparseStreamMemoryNetwork, SpikingLayer, TextNativeSSMN  # noqa: F401


def test_import_mnnn_does_not_load_transformers():
    code = "import sys, mnnn; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()
    assert out == "False"
