"""Validation of splitting coefficients and the degree-``p`` analysis of which splits preserve what.

A split of one hidden neuron (or channel) into ``m`` copies multiplies the copies' in-weights by ``alpha_r`` and their
out-weights by ``beta_r`` (the embedding of arXiv 2505.12419 is ``alpha = beta = c``). With an activation of degree
``p`` and ``alpha_r >= 0``, copy ``r`` contributes ``beta_r alpha_r^p a sigma(w.x)``, so

* outputs are preserved            iff ``sum_r beta_r alpha_r^p = 1``;
* ``T^T T = I`` (isometry)         iff ``sum_r alpha_r^2 = 1`` and ``sum_r beta_r^2 = 1``;
* gradients map by ``T``           iff for every copy ``beta_r = alpha_r^p`` (out-weight derivative) and
  ``beta_r alpha_r^(p-1) = alpha_r`` (in-weight derivative), or ``alpha_r = beta_r = 0``.

For ``p = 1`` the last two conditions read ``beta = alpha`` and the first ``sum c_r^2 = 1``: the classical split. For
``p != 1`` they force ``alpha_r^(2p-2) = 1``, i.e. every ``alpha_r`` is 0 or 1, and with ``sum beta_r alpha_r^p = 1``
exactly one copy equals the old neuron and the others are zero: only the trivial (one-hot) split carries gradients,
KKT points and trajectories. A non-trivial output-preserving split exists (e.g. ``beta_r = c_r^(2-p)``,
``alpha_r = c_r``) but it is neither an isometry nor gradient-preserving; ``docs/embedding.md`` has the details.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["check_coeffs", "split_properties", "output_preserving_out_coeffs", "DEFAULT_COEFF_TOL"]

DEFAULT_COEFF_TOL = 1e-12


def _as_coeffs(name: str, coeffs) -> tuple[float, ...]:
    try:
        arr = np.asarray(coeffs, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a 1-D sequence of real numbers; got {coeffs!r}.") from None
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"`{name}` must be a non-empty 1-D sequence (one coefficient per copy); got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite; got {arr.tolist()}.")
    if np.any(arr < 0):
        raise ValueError(
            f"`{name}` must be non-negative (the split relies on positive homogeneity, sigma(c z) = c^p sigma(z) only "
            f"for c >= 0); got {arr.tolist()}."
        )
    return tuple(float(c) for c in arr)


def check_coeffs(coeffs, *, p: int = 1, out_coeffs=None, tol: float = DEFAULT_COEFF_TOL):
    """Validate splitting coefficients for an activation of degree ``p``; return ``(alpha, beta)`` as float tuples.

    Arguments:
        coeffs: the in-weight coefficients ``alpha_r >= 0`` (and the out-weight ones when ``out_coeffs`` is None).
        p: the activation's degree.
        out_coeffs: optional out-weight coefficients ``beta_r >= 0`` (a rescaled split); must preserve outputs.
        tol: tolerance on ``sum c_r^2 = 1`` (classical split) or ``sum beta_r alpha_r^p = 1`` (rescaled split).

    Returns:
        ``(alpha, beta)``.

    Raises:
        ValueError: negative, non-finite or empty coefficients; ``sum c_r^2 != 1``; for ``p != 1`` a classical split
            that is not one-hot (it cannot preserve outputs); a rescaled split that does not preserve outputs.

    >>> check_coeffs([0.6, 0.8])
    ((0.6, 0.8), (0.6, 0.8))
    """
    tol = float(tol)
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"`tol` must be a finite number >= 0; got {tol!r}.")
    alpha = _as_coeffs("coeffs", coeffs)
    if out_coeffs is None:
        sq = sum(c * c for c in alpha)
        if abs(sq - 1.0) > tol:
            raise ValueError(
                f"`coeffs` must square-sum to 1 (sum c_r^2 = 1 makes the split an isometry, arXiv 2505.12419); "
                f"got sum c_r^2 = {sq!r} (|sum - 1| = {abs(sq - 1):.3g} > tol = {tol:g}) for coeffs {list(alpha)}."
            )
        if p != 1:
            out = sum(c ** (p + 1) for c in alpha)
            if abs(out - 1.0) > tol:
                raise ValueError(
                    f"a split with `coeffs` {list(alpha)} cannot preserve the outputs of a network whose activation has "
                    f"degree p = {p}: the copies (c_r w, c_r a) output sum_r c_r^(p+1) a sigma(w.x) = {out:.6g} * "
                    f"a sigma(w.x), and sum_r c_r^(p+1) = 1 with sum_r c_r^2 = 1 only for one-hot coefficients. For "
                    f"p != 1 no non-trivial split maps gradients (that needs beta_r = alpha_r^p and beta_r alpha_r^(p-1)"
                    f" = alpha_r, i.e. alpha_r in {{0, 1}}), so KKT points and trajectories do not transfer. Use a "
                    f"one-hot `coeffs` (the neuron plus zero copies), or pass `out_coeffs` (e.g. "
                    f"homflow.embedding.output_preserving_out_coeffs(coeffs, p) = c_r^(2-p)) for a map that preserves "
                    f"outputs only."
                )
        return alpha, alpha
    beta = _as_coeffs("out_coeffs", out_coeffs)
    if len(beta) != len(alpha):
        raise ValueError(
            f"`out_coeffs` must have one coefficient per copy like `coeffs` ({len(alpha)}); got {len(beta)}."
        )
    out = sum(b * a**p for a, b in zip(alpha, beta))
    if abs(out - 1.0) > tol:
        raise ValueError(
            f"`coeffs` (in-weights alpha_r) and `out_coeffs` (out-weights beta_r) must preserve outputs, "
            f"sum_r beta_r alpha_r^p = 1 with p = {p}; got {out!r} (|sum - 1| = {abs(out - 1):.3g} > tol = {tol:g})."
        )
    return alpha, beta


def output_preserving_out_coeffs(coeffs, p: int) -> tuple[float, ...]:
    """Out-weight coefficients ``beta_r = c_r^(2-p)`` (0 where ``c_r = 0``) that, with in-weights ``alpha_r = c_r`` and
    ``sum c_r^2 = 1``, preserve the outputs of a degree-``p`` network: ``sum beta_r alpha_r^p = sum c_r^2 = 1``.

    For ``p = 1`` this is ``beta = c`` (the classical split). For ``p != 1`` the map preserves outputs only: it is not an
    isometry and does not carry gradients (see the module docstring).

    >>> output_preserving_out_coeffs([0.6, 0.8], 2)
    (1.0, 1.0)
    """
    alpha = _as_coeffs("coeffs", coeffs)
    return tuple(c ** (2 - p) if c > 0 else 0.0 for c in alpha)


def split_properties(alpha, beta, p: int, tol: float = DEFAULT_COEFF_TOL) -> dict[str, bool]:
    """Which identities a split with in-coefficients ``alpha`` and out-coefficients ``beta`` satisfies for degree ``p``.

    Returns a dict with ``preserves_outputs``, ``isometric`` and ``preserves_gradients`` (hence KKT points and
    trajectories), by the criteria of the module docstring.

    >>> split_properties((0.6, 0.8), (0.6, 0.8), 1)["preserves_gradients"]
    True
    >>> split_properties((0.6, 0.8), (1.0, 1.0), 2)["preserves_gradients"]
    False
    """
    tol = max(float(tol), 1e-15)
    outputs = abs(sum(b * a**p for a, b in zip(alpha, beta)) - 1.0) <= tol
    iso = abs(sum(a * a for a in alpha) - 1.0) <= tol and abs(sum(b * b for b in beta) - 1.0) <= tol
    grads = outputs
    for a, b in zip(alpha, beta):
        if a == 0.0:
            grads = grads and b == 0.0
        else:
            grads = grads and abs(b - a**p) <= tol and abs(b * a ** (p - 1) - a) <= tol
    return {"preserves_outputs": bool(outputs), "isometric": bool(iso), "preserves_gradients": bool(grads)}
