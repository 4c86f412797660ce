"""The scikit-learn style base shared by every sequence estimator (AMRC, PMRC, AMN, baselines).

Rows of ``X`` are consecutive time steps of one sequence. ``fit`` trains by truncated BPTT on
windows of ``bptt`` consecutive rows (windows are shuffled, rows inside a window are not), then
runs the whole training sequence once so that the memory ends where the data ends, as in the
seed; ``predict`` carries that memory on unless ``reset_memory=True``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mnnn.estimators._sklearn import BaseEstimator, RegressorMixin, check_is_fitted
from mnnn.serialization import load_pickled, load_tensors, save_pickled, save_tensors
from mnnn.training.loop import train_epochs
from mnnn.validation import check_real

_METRICS = ("r2", "mse", "mae")
_SAVE_METHODS = ("custom", "joblib", "pickle")


class _HybridMethod:
    """``Model.load(path)`` builds a new model; ``model.load(path)`` loads into ``model``."""

    def __init__(self, func):
        self.func = func

    def __get__(self, obj, cls):
        def bound(*args, **kwargs):
            return self.func(cls, obj, *args, **kwargs)

        bound.__doc__ = self.func.__doc__
        bound.__name__ = self.func.__name__
        return bound


def _as_float_array(value: Any, name: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"this estimator requires {name} to be passed, but the target {name} is None")
    if hasattr(value, "toarray") or type(value).__module__.startswith("scipy.sparse"):
        raise TypeError(f"sparse input is not supported for {name}; convert it with {name}.toarray()")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except Exception as err:  # ragged lists and the like
        raise ValueError(f"{name} must be array-like of numbers; could not convert: {err}") from err
    if arr.dtype.kind == "c":
        raise ValueError(f"Complex data not supported: {name} has dtype {arr.dtype}, expected real numbers")
    try:
        arr = arr.astype(np.float32)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}: {err}") from err
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity; clean or impute it before fitting")
    return arr


def _output_dtype(X: Any) -> type:
    """float32 for float32 input (arrays and tensors), float64 for anything else."""
    dtype = X.dtype if isinstance(X, (np.ndarray, torch.Tensor)) else np.asarray(X).dtype
    return np.float32 if dtype in (np.float32, torch.float32) else np.float64


def _check_sample_weight(sample_weight: Any, n: int) -> np.ndarray:
    """Finite, non-negative weights, one per row, not all zero."""
    try:
        w = np.asarray(sample_weight, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"sample_weight must be numbers, got {sample_weight!r:.60}") from err
    if w.shape != (n,):
        raise ValueError(f"sample_weight must have shape ({n},), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() == 0:
        raise ValueError("sample_weight must be finite and >= 0 with a positive sum, got "
                         f"{'NaN or infinity' if not np.isfinite(w).all() else 'negative or all-zero weights'}")
    return w


def expected_failed_checks(estimator: Any) -> dict[str, str]:
    """scikit-learn checks that every mnnn estimator fails by design, with the reason.

    Pass it to ``check_estimator(est, expected_failed_checks=expected_failed_checks(est))`` or to
    ``parametrize_with_checks``; the checks that the ``non_deterministic`` tag skips are not
    listed here (the tag declares them).
    """
    expected = {
        "check_dict_unchanged": (
            "predict advances the memory carried from call to call (the seeds' documented "
            "behaviour; predict(X, reset_memory=True) or reset_memory() start from zero)"
        ),
    }
    if getattr(estimator, "warm_start", False):
        expected["check_supervised_y_2d"] = (
            "the check fits the same object twice; with warm_start=True (the seeds' default) the "
            "second fit continues training, so its predictions differ (warm_start=False passes)"
        )
    return expected


def check_X(X: Any, n_features: int | None = None, name: str = "X",
            estimator: str = "this estimator", param: str = "input_size") -> np.ndarray:
    """Validate an input matrix: 2-D, non-empty, finite, numeric; converted to float32."""
    arr = _as_float_array(X, name)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (n_samples, n_features); got {arr.ndim}-D with shape {arr.shape}. "
            "Reshape your data either using array.reshape(-1, 1) if it has a single feature or "
            "array.reshape(1, -1) if it contains a single sample"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"Found array with 0 sample(s) (shape={arr.shape}) while a minimum of 1 is required.")
    if arr.shape[1] == 0:
        raise ValueError(f"Found array with 0 feature(s) (shape={arr.shape}) while a minimum of 1 is required.")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(
            f"Expected {param}={n_features}, got {arr.shape[1]} "
            f"(X has {arr.shape[1]} features, but {estimator} is expecting {n_features} features as input)"
        )
    return arr


class SequenceEstimator(RegressorMixin, BaseEstimator):
    """Base class: subclasses define ``__init__`` (storing arguments only) and ``_build``.

    Common constructor arguments of subclasses: ``input_size`` / ``output_size`` (``None``: taken
    from the data at the first fit), ``hidden_size``, ``learning_rate``, ``bptt`` (window length
    of truncated BPTT), ``weight_decay``, ``grad_clip``, ``warm_start`` (``True``: a second ``fit``
    continues from the current weights, as the seed documents; ``False``: every ``fit`` starts
    from scratch, the scikit-learn default), ``random_state`` and ``device``.
    """

    # names of the size parameters (SSMN calls them input_dim / hidden_dim / output_dim)
    _input_param: ClassVar[str] = "input_size"
    _hidden_param: ClassVar[str] = "hidden_size"
    _output_param: ClassVar[str] = "output_size"
    _default_reset_memory: ClassVar[bool] = False
    _default_batch_size: ClassVar[int] = 64
    # constructor arguments that fix the shape of the network (checked on load and warm fits)
    _arch_params: ClassVar[tuple[str, ...]] = ("input_size", "hidden_size", "output_size")

    # ---- scikit-learn tags ---------------------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # predict carries the memory from one call to the next (the seeds' documented behaviour):
        # the same rows predicted twice, reordered or subset give other outputs, so the checks of
        # order/subset invariance and pipeline == bare estimator do not apply.
        tags.non_deterministic = True
        tags.target_tags.multi_output = True  # y may be [n_samples, output_size]
        tags.target_tags.single_output = True
        return tags

    # ---- subclass hooks -------------------------------------------------------------------
    def _build(self, input_size: int, output_size: int) -> nn.Module:
        raise NotImplementedError

    def _sync(self) -> None:
        """Push hyper-parameters that may change between fits (beta, alpha, dt, ...) into the net."""

    def _validate_params(self) -> None:
        for name in (self._hidden_param, "bptt"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in (self._input_param, self._output_param):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        # a step above 1e4 overflows AdamW's float32 arithmetic: refused rather than diverging
        check_real("learning_rate", self.learning_rate, 0.0, 1e4, open_low=True)
        if self.grad_clip is not None:
            check_real("grad_clip", self.grad_clip, 0.0, open_low=True)  # None switches clipping off
        check_real("weight_decay", self.weight_decay, 0.0, 1e4)
        rs = self.random_state
        if rs is not None and not isinstance(rs, np.random.RandomState) and (
                not isinstance(rs, (int, np.integer)) or isinstance(rs, bool) or not 0 <= rs < 2**63):
            raise ValueError(f"random_state must be None, a numpy RandomState or an int in [0, 2**63), got {rs!r}")

    # ---- fitting ------------------------------------------------------------------------------
    def _check_y(self, y: Any, n_rows: int) -> tuple[np.ndarray, bool]:
        """Return y as ``[n_rows, outputs]`` and whether it came 1-D."""
        arr = _as_float_array(y, "y")
        was_1d = arr.ndim == 1
        if was_1d:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise ValueError(f"y must be 1-D or 2-D (n_samples, output_size), got shape {arr.shape}")
        if arr.shape[0] != n_rows:
            raise ValueError(f"X and y have different lengths: X has {n_rows} rows, y has {arr.shape[0]}")
        return arr, was_1d

    def _seed(self) -> torch.Generator:
        seed = self.random_state
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
        elif isinstance(seed, np.random.RandomState):
            seed = int(seed.randint(2**31))
        torch.manual_seed(int(seed))
        gen = torch.Generator().manual_seed(int(seed))
        return gen

    def fit(self, X, y, epochs: int = 100, batch_size: int | None = None, verbose: int = 0,
            validation_split: float = 0.0, reset_memory: bool | None = None):
        """Train on one sequence of rows.

        Args:
            X: ``[n_samples, input_size]``, rows are consecutive time steps.
            y: ``[n_samples, output_size]`` or ``[n_samples]``.
            epochs: passes over the sequence.
            batch_size: rows per gradient step: the rows are cut into ``batch_size // bptt``
                contiguous streams (at least one) walked in order in windows of ``bptt`` rows, the
                memory carried from window to window as ``predict`` carries it.
            verbose: 0 silent, 1 a tqdm bar, 2 also a line per fit with the final losses.
            validation_split: the last fraction of rows (in time order) held out; its loss is
                recorded per epoch in ``history_``.
            reset_memory: start from zero memory (default: False, AMN: True).

        Returns:
            self
        """
        self._validate_params()
        if not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
        if not 0.0 <= validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
        batch_size = self._default_batch_size if batch_size is None else batch_size
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        reset_memory = self._default_reset_memory if reset_memory is None else reset_memory

        warm = self.warm_start and hasattr(self, "network_")
        X = check_X(X, self.n_features_in_ if warm else getattr(self, self._input_param),
                    estimator=type(self).__name__, param=self._input_param)
        Y, y_1d = self._check_y(y, X.shape[0])
        expected_out = self.n_outputs_ if warm else getattr(self, self._output_param)
        if expected_out is not None and Y.shape[1] != expected_out:
            raise ValueError(f"Expected {self._output_param}={expected_out}, got y with {Y.shape[1]} columns")

        gen = self._seed()
        if not warm:
            self.network_ = self._build(X.shape[1], Y.shape[1]).to(self.device)
            self.n_features_in_, self.n_outputs_ = X.shape[1], Y.shape[1]
            self.training_steps_, self.last_loss_ = 0, float("nan")
            self._masks: dict[str, torch.Tensor] = {}
            self._memory = None
        self._y_1d = y_1d
        self._sync()
        if reset_memory or self._memory is None:
            self._memory = self.network_.init_state(1)

        n_val = int(round(validation_split * X.shape[0]))
        if n_val >= X.shape[0]:
            raise ValueError("validation_split leaves no training rows")
        Xt = torch.from_numpy(X).to(self.device)
        Yt = torch.from_numpy(Y).to(self.device)
        Xtr, Ytr = Xt[: X.shape[0] - n_val], Yt[: X.shape[0] - n_val]
        window = min(self.bptt, Xtr.shape[0])
        per_batch = max(1, batch_size // window)

        # Truncated BPTT as predict runs: the rows are cut into up to batch_size // bptt contiguous
        # streams, walked in order in windows of `window` rows, the memory carried (detached) from
        # one window to the next. Training from a zero state per window (shuffled windows) taught
        # the models states of at most `window` rows of history while predict continues from the
        # end of the training rows; AMN's R^2 then varied with the initialisation (0.93-0.99).
        # A random offset per epoch moves the window boundaries.
        carried: dict[str, Any] = {"state": None}

        def batches(epoch: int):
            n_rows = Xtr.shape[0]
            offset = int(torch.randint(0, min(window, n_rows - window + 1), (1,), generator=gen))
            n_streams = max(1, min(per_batch, (n_rows - offset) // window))
            length = (n_rows - offset) // n_streams
            starts = offset + length * torch.arange(n_streams)
            for w in range(0, length, window):
                idx = starts[:, None] + torch.arange(w, min(w + window, length))[None, :]
                yield Xtr[idx], Ytr[idx], w == 0

        def loss_fn(net: nn.Module, batch):
            xb, yb, first = batch
            pred, state = net(xb, None if first else carried["state"])
            carried["state"] = state.detach()
            return torch.mean((pred - yb) ** 2)

        validate = None
        if n_val:
            def validate() -> float:
                # the held-out rows follow the training rows: run through both, score the tail
                pred, _ = self.network_(Xt[None])
                return float(torch.mean((pred[0, -n_val:] - Yt[-n_val:]) ** 2))

        optimizer = torch.optim.AdamW(
            [p for p in self.network_.parameters() if p.requires_grad],
            lr=self.learning_rate, weight_decay=self.weight_decay,
        )
        frozen = {name: p.detach().clone() for name, p in self.network_.named_parameters()
                  if name in self._masks}
        params = dict(self.network_.named_parameters())

        def restore_frozen() -> None:
            with torch.no_grad():
                for name, mask in self._masks.items():
                    params[name].copy_(torch.where(mask, params[name], frozen[name]))

        history = train_epochs(
            self.network_, batches, loss_fn, optimizer, epochs, grad_clip=self.grad_clip,
            after_step=restore_frozen if self._masks else None, validate=validate,
            progress=verbose >= 1, desc=type(self).__name__,
        )
        self.history_ = {"train_loss": history.train_loss, "val_loss": history.val_loss}
        self.training_steps_ += history.steps
        finite = all(bool(torch.isfinite(p).all()) for p in self.network_.parameters())
        if not finite or (history.train_loss and not math.isfinite(history.train_loss[-1])):
            raise ValueError(f"training diverged: {'the loss' if finite else 'the weights'} became NaN or infinite "
                             f"within {history.steps} steps; lower learning_rate (got {self.learning_rate!r}) or "
                             f"weight_decay (got {self.weight_decay!r}), or clip gradients (grad_clip, got "
                             f"{self.grad_clip!r})")
        if history.train_loss:
            self.last_loss_ = history.train_loss[-1]
        # Carry the memory through the training rows, so predict continues where the data ends.
        self.network_.eval()
        with torch.no_grad():
            _, state = self.network_(Xt[None], self._memory)
        self._memory = state
        if verbose >= 2:
            print(f"{type(self).__name__}: {history.steps} steps, last loss {self.last_loss_:.6f}"
                  + (f", val loss {history.val_loss[-1]:.6f}" if history.val_loss else ""))
        return self

    # ---- inference ----------------------------------------------------------------------------
    def predict(self, X, reset_memory: bool = False) -> np.ndarray:
        """Predict row by row, carrying the memory from the previous call (or from the end of the
        training rows) unless ``reset_memory``. Returns ``[n_samples, output_size]`` (1-D when
        ``fit`` saw a 1-D ``y``)."""
        check_is_fitted(self, "network_")
        X_in = X
        X = check_X(X, self.n_features_in_, estimator=type(self).__name__, param=self._input_param)
        self._sync()
        if reset_memory:
            self._memory = self.network_.init_state(1)
        self.network_.eval()
        with torch.no_grad():
            pred, state = self.network_(torch.from_numpy(X).to(self.device)[None], self._memory)
        if not torch.isfinite(pred).all() or not all(torch.isfinite(t).all() for t in state.tensors().values()):
            # e.g. one huge finite input overflowing float32 inside the network: keep the memory as it was
            raise ValueError("the prediction or the memory became NaN or infinite on this X (values too large for "
                             f"float32? max |X| = {float(np.abs(X).max()):.3g}); the memory is unchanged")
        self._memory = state
        # float64 input (NumPy's default, lists) gives float64 predictions, as scikit-learn's
        # regressors do; float32 input stays float32. A fresh array: it never aliases the state.
        out = pred[0].cpu().numpy().astype(_output_dtype(X_in))
        return out[:, 0] if self._y_1d else out

    def score(self, X, y, metric: str = "r2", sample_weight=None) -> float:
        """``'r2'`` (coefficient of determination, averaged over outputs), ``'mse'`` or ``'mae'``.

        Note that ``predict`` is stateful: scoring advances the memory like any prediction."""
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
        pred = self.predict(X)
        Y = self._check_y(y, len(pred))[0].astype(np.float64)
        P = np.asarray(pred, dtype=np.float64).reshape(Y.shape)
        w = None if sample_weight is None else _check_sample_weight(sample_weight, len(Y))
        if metric == "mse":
            return float(np.average(np.mean((P - Y) ** 2, axis=1), weights=w))
        if metric == "mae":
            return float(np.average(np.mean(np.abs(P - Y), axis=1), weights=w))
        ss_res = np.average((Y - P) ** 2, axis=0, weights=w)
        ss_tot = np.average((Y - np.average(Y, axis=0, weights=w)) ** 2, axis=0, weights=w)
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0),
                      np.where(ss_res == 0, 1.0, 0.0))
        return float(np.mean(r2))

    # ---- memory -------------------------------------------------------------------------------
    def reset_memory(self) -> None:
        """Reset the internal memory to zero."""
        check_is_fitted(self, "network_")
        self._memory = self.network_.init_state(1)

    def _memory_parts(self) -> dict[str, torch.Tensor]:
        """State tensors exposed by get/set_memory_state (AMN keeps its manifold apart)."""
        skip = getattr(self.network_, "separate_state", ())
        return {k: v for k, v in self._memory.tensors().items() if k.split(".")[0] not in skip}

    def get_memory_state(self) -> np.ndarray:
        """The whole recurrent state as one float vector, in a fixed order (AMRC: echo h then
        memory m; PMRC: h, m, gates, previous output; AMN: liquid potentials then the LRU state
        as real and imaginary parts; the manifold is read with ``get_manifold_state``).
        ``set_memory_state`` of this vector restores the model exactly."""
        check_is_fitted(self, "network_")
        # the estimator's memory is one stream (batch 1), so each state tensor is flattened whole
        # (this also covers layouts whose batch axis is not the first, and 0-dim counters)
        parts = [torch.view_as_real(v.reshape(-1)).T.reshape(-1) if v.is_complex() else v.reshape(-1).double()
                 for v in self._memory_parts().values()]
        return torch.cat(parts).detach().cpu().numpy().astype(np.float32)

    def set_memory_state(self, memory) -> None:
        """Set the vector returned by :meth:`get_memory_state` (same length)."""
        check_is_fitted(self, "network_")
        arr = np.asarray(memory, dtype=np.float32).reshape(-1)
        parts = self._memory_parts()
        sizes = [v.numel() * (2 if v.is_complex() else 1) for v in parts.values()]
        if arr.shape[0] != sum(sizes):
            raise ValueError(f"memory must have shape ({sum(sizes)},), got {np.shape(memory)}")
        if not np.isfinite(arr).all():
            raise ValueError("memory contains NaN or infinity")
        tensors = self._memory.tensors()
        for (name, current), chunk in zip(parts.items(), torch.split(torch.from_numpy(arr), sizes)):
            value = torch.complex(*chunk.view(2, -1)) if current.is_complex() else chunk
            if not (current.is_floating_point() or current.is_complex()):
                value = value.round()  # counters travel as floats
            tensors[name] = value.to(current.dtype).reshape(current.shape).to(current.device)
        self._memory = type(self._memory).from_tensors(tensors)

    @property
    def training_steps(self) -> int:
        """Gradient steps taken over all fits."""
        return getattr(self, "training_steps_", 0)

    @property
    def last_loss(self) -> float:
        """Mean training loss (MSE) of the last epoch."""
        return getattr(self, "last_loss_", float("nan"))

    @property
    def avg_memory_magnitude(self) -> float:
        """Mean absolute value of the current memory vector."""
        if not hasattr(self, "network_"):
            return 0.0
        return float(self.network_.memory_vector(self._memory).abs().mean())

    # ---- freezing (a mask per parameter: True = trainable) ------------------------------------
    def _freeze(self, name: str, where: torch.Tensor | None = None) -> None:
        """Freeze parameter ``name`` entirely, or the entries where ``where`` is True."""
        check_is_fitted(self, "network_")
        param = dict(self.network_.named_parameters())[name]
        trainable = self._masks.get(name, torch.ones_like(param, dtype=torch.bool))
        if where is None:
            trainable = torch.zeros_like(trainable)
        else:
            trainable = trainable & ~where.to(device=param.device, dtype=torch.bool).expand_as(param)
        self._masks[name] = trainable

    def _unfreeze(self, names) -> None:
        check_is_fitted(self, "network_")
        for name in names:
            self._masks.pop(name, None)

    def frozen_fraction(self) -> float:
        """Fraction of all weights currently frozen."""
        check_is_fitted(self, "network_")
        total = sum(p.numel() for p in self.network_.parameters())
        frozen = sum(int((~m).sum()) for m in self._masks.values())
        return frozen / total

    # ---- persistence --------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "params": self.get_params(deep=False),
            "fitted": {
                "n_features_in_": self.n_features_in_,
                "n_outputs_": self.n_outputs_,
                "training_steps_": self.training_steps_,
                "last_loss_": None if math.isnan(self.last_loss_) else self.last_loss_,
                "y_1d": bool(self._y_1d),
            },
        }

    def save(self, filepath, method: str = "custom"):
        """Save the fitted model, its memory and its freezing masks.

        ``method='custom'`` (default) writes one safetensors file with a JSON header: loading it
        executes no code. ``'joblib'`` and ``'pickle'`` are available when named. Writes are atomic.
        """
        check_is_fitted(self, "network_")
        if method not in _SAVE_METHODS:
            raise ValueError(f"method must be one of {_SAVE_METHODS}, got {method!r}")
        if method != "custom":
            save_pickled(self, filepath, method)
            return self
        params = self.get_params(deep=False)
        if not isinstance(params.get("random_state"), (int, type(None))):
            params["random_state"] = None
        meta = self._meta()
        meta["params"] = params
        tensors = {f"param/{k}": v for k, v in self.network_.state_dict().items()}
        tensors.update({f"memory/{k}": v for k, v in self._memory.tensors().items()})
        tensors.update({f"mask/{k}": v.to(torch.uint8) for k, v in self._masks.items()})
        save_tensors(filepath, tensors, meta)
        return self

    @_HybridMethod
    def load(cls, self, filepath, method: str = "custom"):
        """``Model.load(path)`` returns a new model; ``model.load(path)`` loads into ``model``
        (the file must hold the same model class and sizes). Returns the loaded model."""
        if method not in _SAVE_METHODS:
            raise ValueError(f"method must be one of {_SAVE_METHODS}, got {method!r}")
        if method != "custom":
            obj = load_pickled(filepath, method)
            if not isinstance(obj, cls):
                raise ValueError(f"{filepath} holds a {type(obj).__name__}, expected {cls.__name__}")
            if self is None:
                return obj
            self.__dict__.clear()
            self.__dict__.update(obj.__dict__)
            return self
        tensors, meta = load_tensors(filepath)
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{filepath} holds a {meta.get('class')!r} model, expected {cls.__name__!r}")
        params = meta["params"]
        if self is None:
            self = cls(**params)
        else:
            fitted_dims = {self._input_param: meta["fitted"]["n_features_in_"],
                           self._output_param: meta["fitted"]["n_outputs_"]}
            for name in self._arch_params:
                mine = getattr(self, name)
                theirs = fitted_dims.get(name, params.get(name))
                if mine is not None and mine != theirs:
                    raise ValueError(f"size mismatch: {filepath} has {name}={theirs}, this model has {mine}")
            self.set_params(**params)
        fitted = meta["fitted"]
        self.n_features_in_, self.n_outputs_ = fitted["n_features_in_"], fitted["n_outputs_"]
        self.training_steps_ = fitted["training_steps_"]
        self.last_loss_ = float("nan") if fitted["last_loss_"] is None else fitted["last_loss_"]
        self._y_1d = fitted["y_1d"]
        self.network_ = self._build(self.n_features_in_, self.n_outputs_).to(self.device)
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("param/")}
        try:
            self.network_.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(f"{filepath} does not match the {cls.__name__} it describes: {err}") from err
        self._sync()
        memory = {k[7:]: v.to(self.device) for k, v in tensors.items() if k.startswith("memory/")}
        self._memory = type(self.network_.init_state(1)).from_tensors(memory)
        self._masks = {k[5:]: v.to(torch.bool).to(self.device)
                       for k, v in tensors.items() if k.startswith("mask/")}
        return self
