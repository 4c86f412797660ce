"""mnnn: Memory-Native Neural Networks.

Every public class and function of the seeds is importable from here; the heavier ones load on
first use (``import mnnn`` stays fast and does not need transformers)::

    from mnnn import AMRC, PMRC, AMN, create_model                     # seeds/003 (MNNN API)
    from mnnn import SparseStreamMemoryNetwork, TextNativeSSMN          # seeds/002 (SSMN)
    from mnnn import S3CMN, Memory, SpikingLayer                        # seeds/000-001 (S3CMN)
    from mnnn import CMRModel, CMRConfig, FullCMRModel, IntegratedCMRModel  # seeds/004 (CMR)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# everything loads on first use: a program (or a benchmark suite, whose JSON lists the files it
# imported) that needs one model does not import the others
_LAZY = {
    "AMN": "mnnn.estimators",
    "AMRC": "mnnn.estimators",
    "PMRC": "mnnn.estimators",
    "create_model": "mnnn.estimators",
    "SparseStreamMemoryNetwork": "mnnn.estimators",
    "LSTMRegressor": "mnnn.estimators",
    "GRURegressor": "mnnn.estimators",
    "TextNativeSSMN": "mnnn.models.ssmn",
    "S3CMN": "mnnn.models.s3cmn",
    "Memory": "mnnn.memory",
    "OutputMemory": "mnnn.memory.output_cache",
    "OutputMemoryLM": "mnnn.models.memory_lm",
    "SpikingLayer": "mnnn.layers.spiking",
    "SynapticMemory": "mnnn.layers.synaptic",
    "CMRModel": "mnnn.models.cmr",
    "CMRConfig": "mnnn.models.cmr",
    "FullCMRModel": "mnnn.models.cmr",
    "IntegratedCMRModel": "mnnn.models.cmr",
}

__all__ = ["__version__", *_LAZY]


class _RegisterWithTransformers:
    """Registers mnnn's models with transformers' Auto classes when transformers is imported
    (a meta-path finder that runs once), so ``import mnnn`` never imports transformers itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        import importlib.util
        import sys

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _register_hf()

        spec.loader.exec_module = exec_module
        return spec


def _register_hf() -> None:
    try:
        from mnnn.hf import register
    except ImportError:  # transformers too old or broken: the Auto classes simply do not know mnnn
        return
    register()


def _install_hf_registration() -> None:
    import importlib.util
    import sys

    if "transformers" in sys.modules:
        _register_hf()
    elif importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, _RegisterWithTransformers())


_install_hf_registration()


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mnnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
