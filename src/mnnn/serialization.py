"""Atomic, code-free persistence: safetensors tensors + JSON metadata in one file.

Pickle-based formats are available only when asked for by name, and loading them warns.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

FORMAT_VERSION = 1


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``: a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` (complex ones stored as real pairs) and JSON ``meta`` atomically."""
    flat: dict[str, torch.Tensor] = {}
    complex_keys = []
    for key, value in tensors.items():
        value = value.detach().cpu()
        if value.is_complex():
            complex_keys.append(key)
            value = torch.view_as_real(value)
        flat[key] = value.contiguous()
    header = {"mnnn_format_version": str(FORMAT_VERSION), "meta": json.dumps(meta),
              "complex_keys": json.dumps(complex_keys)}
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(_canonical_safetensors(flat, header)))


def _canonical_safetensors(flat: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes whose JSON header has its keys sorted: the library writes the metadata
    in hash order, which differs between processes, so the same tensors would give different
    files. Data offsets are relative to the end of the header, so re-serialising it is safe."""
    import struct

    from safetensors.torch import save

    raw = save(flat, metadata=metadata)
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(header)) + header + raw[8 + n :]


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`; any other content raises ``ValueError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable mnnn safetensors file (truncated or foreign): {err}") from err
    if "mnnn_format_version" not in header:
        raise ValueError(f"{path} is a safetensors file but not one written by mnnn (no mnnn header)")
    version = int(header["mnnn_format_version"])
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {version}; this mnnn reads up to {FORMAT_VERSION}")
    for key in json.loads(header.get("complex_keys", "[]")):
        tensors[key] = torch.view_as_complex(tensors[key])
    return tensors, json.loads(header["meta"])


def save_pickled(obj: Any, path: str | os.PathLike, method: str) -> Path:
    """Save with ``pickle`` or ``joblib``: only ever called when the user names the method."""
    if method == "joblib":
        import joblib

        return atomic_write(path, lambda tmp: joblib.dump(obj, tmp))
    import pickle

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)

    return atomic_write(path, write)


def load_pickled(path: str | os.PathLike, method: str) -> Any:
    warnings.warn(
        f"loading {path} with {method} executes code stored in the file: only load files you trust "
        "(method='custom' stores tensors and JSON only)",
        UserWarning,
        stacklevel=3,
    )
    if method == "joblib":
        import joblib

        return joblib.load(path)
    import pickle

    with open(path, "rb") as fh:
        return pickle.load(fh)
