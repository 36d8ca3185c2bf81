"""Data sets: a validated ``Dataset(X, y)``, synthetic generators, scikit-learn digits, and file loaders."""

from __future__ import annotations

import os

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = ["Dataset", "gaussian_toy", "teacher_student", "sphere", "digits", "load", "save"]


class Dataset(eqx.Module):
    """Inputs ``X`` (n, d) and targets ``y`` (n,): validated finite, with matching shapes.

    Labels are checked against ``{-1, +1}`` by :meth:`check_for` when a classification loss uses them.
    """

    X: Float[Array, "n d"]
    y: Float[Array, " n"]

    def __init__(self, X, y, dtype=None):
        Xn = np.asarray(X)
        yn = np.asarray(y)
        if Xn.ndim == 1:
            Xn = Xn[:, None]
        if Xn.ndim != 2:
            raise ValueError(f"`X` must be a 2-D array (n, d); got shape {Xn.shape}.")
        if yn.ndim != 1 or yn.shape[0] != Xn.shape[0]:
            raise ValueError(f"`y` must be a 1-D array of length n = {Xn.shape[0]} (rows of X); got shape {yn.shape}.")
        if Xn.shape[0] == 0:
            raise ValueError("`X` must hold at least one sample; got n = 0.")
        for nm, a in (("X", Xn), ("y", yn)):
            if np.iscomplexobj(a):
                raise ValueError(f"`{nm}` must be real numbers; got the complex dtype {a.dtype} (its imaginary part "
                                 "would be dropped).")
        if not np.issubdtype(Xn.dtype, np.number) or not np.all(np.isfinite(Xn)):
            raise ValueError("`X` must be finite real numbers; it holds NaN, inf or non-numeric entries.")
        if not np.issubdtype(yn.dtype, np.number) or not np.all(np.isfinite(yn)):
            raise ValueError("`y` must be finite real numbers; it holds NaN, inf or non-numeric entries.")
        dtype = dtype or jnp.result_type(float)
        self.X = jnp.asarray(Xn, dtype=dtype)
        self.y = jnp.asarray(yn, dtype=dtype)

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def d(self) -> int:
        return self.X.shape[1]

    def check_for(self, loss) -> "Dataset":
        """Raise a ``ValueError`` if ``loss`` is a classification loss and some label is not -1 or +1."""
        from .losses import get_loss

        loss = get_loss(loss)
        if loss.classification:
            yn = np.asarray(self.y)
            bad = yn[(yn != 1) & (yn != -1)]
            if bad.size:
                raise ValueError(
                    f"`y` must hold labels in {{-1, +1}} for the {loss.name} loss; got {bad.size} other values, "
                    f"e.g. {bad[:3].tolist()}."
                )
        return self

    def check_model(self, model) -> "Dataset":
        """Raise a ``ValueError`` if ``model`` expects another input dimension."""
        if model.d_in != self.d:
            raise ValueError(f"the model expects inputs of dimension {model.d_in} but `X` has d = {self.d} columns.")
        return self

    def subset(self, idx) -> "Dataset":
        return Dataset(np.asarray(self.X)[idx], np.asarray(self.y)[idx])


def _rng(seed):
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def gaussian_toy(n: int = 100, *, separable: bool = True, std: float = 1.0, seed=0) -> Dataset:
    """The 2-D Gaussian toy data of arXiv 2505.12419: ``n/2`` points around ``(2, -2)`` (label +1) and ``n/2`` around
    ``(-2, 2)`` (label -1) when ``separable``; centres ``(1, -1)`` and ``(-1, 1)`` otherwise (classes overlap).

    Separable data are checked to be linearly separable through the origin (points on the wrong side are redrawn).
    """
    if n < 2:
        raise ValueError(f"`n` must be >= 2; got {n!r}.")
    rng = _rng(seed)
    c = np.array([2.0, -2.0]) if separable else np.array([1.0, -1.0])
    n_pos = n // 2
    y = np.concatenate([np.ones(n_pos), -np.ones(n - n_pos)])
    X = rng.standard_normal((n, 2)) * std + np.where(y[:, None] > 0, c, -c)
    if separable:
        for _ in range(1000):
            bad = y * (X @ c) <= 0.1
            if not bad.any():
                break
            X[bad] = rng.standard_normal((bad.sum(), 2)) * std + np.where(y[bad, None] > 0, c, -c)
    return Dataset(X, y)


def sphere(n: int, d: int, *, seed=0, labels: str = "random") -> Dataset:
    """``n`` points uniform on the unit sphere in ``R^d``; labels random signs (``labels='random'``) or the sign of the
    first coordinate (``'linear'``)."""
    rng = _rng(seed)
    X = rng.standard_normal((n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    if labels == "random":
        y = rng.choice([-1.0, 1.0], size=n)
    elif labels == "linear":
        y = np.where(X[:, 0] >= 0, 1.0, -1.0)
    else:
        raise ValueError(f"`labels` must be 'random' or 'linear'; got {labels!r}.")
    return Dataset(X, y)


def teacher_student(
    n: int, d: int, *, teacher_width: int = 5, p: int = 1, seed=0, labels: str = "sign", noise: float = 0.0
) -> Dataset:
    """Gaussian inputs labelled by a random two-layer teacher ``sum_j a_j relu(w_j . x)^p``; ``labels='sign'`` gives
    +-1 labels (classification), ``'value'`` the real outputs (regression, plus Gaussian ``noise``).

    ``teacher_student(100, 10, teacher_width=5, p=2)`` draws the same data as the canonical benchmark problem."""
    rng = _rng(seed)
    X = rng.standard_normal((n, d))
    f = (np.maximum(X @ rng.standard_normal((teacher_width, d)).T, 0.0) ** p) @ rng.standard_normal(teacher_width)
    if labels == "sign":
        y = np.sign(f)
        y[y == 0] = 1.0
    elif labels == "value":
        y = f + noise * rng.standard_normal(n)
    else:
        raise ValueError(f"`labels` must be 'sign' or 'value'; got {labels!r}.")
    return Dataset(X, y)


def digits(classes=(3, 5), *, n: int | None = None, normalize: bool = True, seed=0) -> Dataset:
    """scikit-learn's 8x8 digits (bundled, no download), two classes: label +1 for ``classes[0]``, -1 for
    ``classes[1]``. Inputs are 64-vectors scaled to [0, 1] and (``normalize``) to unit norm; ``n`` subsamples."""
    from sklearn.datasets import load_digits

    classes = tuple(int(c) for c in classes)
    if len(classes) != 2 or classes[0] == classes[1] or not all(0 <= c <= 9 for c in classes):
        raise ValueError(f"`classes` must be two different digits in 0..9; got {classes!r}.")
    bunch = load_digits()
    keep = np.isin(bunch.target, classes)
    X = bunch.data[keep] / 16.0
    y = np.where(bunch.target[keep] == classes[0], 1.0, -1.0)
    if normalize:
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    if n is not None:
        if not 1 <= n <= len(y):
            raise ValueError(f"`n` must be between 1 and {len(y)}; got {n!r}.")
        idx = _rng(seed).choice(len(y), size=n, replace=False)
        X, y = X[idx], y[idx]
    return Dataset(X, y)


def load(path, *, label_column: int = -1) -> Dataset:
    """Load a data set from ``.npz`` (arrays ``X`` and ``y``) or ``.csv`` (numbers; the label in ``label_column``)."""
    import stat
    import zipfile

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"`path` does not exist: {path!r}.")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"`path` must be a regular file; {path!r} is a directory, FIFO or device.")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = {"X", "y"} - set(f.files)
                if missing:
                    raise ValueError(f"`{path}` must hold arrays 'X' and 'y'; missing {sorted(missing)}.")
                return Dataset(f["X"], f["y"])
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"`path` {path!r} is not a readable .npz archive ({type(e).__name__}: {e}).") from None
    if path.endswith(".csv"):
        try:
            arr = np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError:
            arr = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)
        y = arr[:, label_column]
        X = np.delete(arr, label_column % arr.shape[1], axis=1)
        return Dataset(X, y)
    raise ValueError(f"`path` must end in .npz or .csv; got {path!r}.")


def save(data: Dataset, path) -> None:
    """Write ``data`` to ``.npz``."""
    np.savez(os.fspath(path), X=np.asarray(data.X), y=np.asarray(data.y))
