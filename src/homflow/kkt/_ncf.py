"""The neural correlation function (NCF) ``N(u) = sum_i ytilde_i Phi(u; x_i)`` and its constrained KKT residual.

docs/math.md section 3 (arXiv 2402.09226, 2403.08121): near the origin gradient flow follows ``du/ds = grad N(u)``; the
directions it reaches are KKT points of ``max N(u)`` subject to ``||u|| = 1``: ``grad N(u) = lambda u`` with
``lambda = L N(u)`` (Euler). The residual of a point is the tangential gradient ``||grad N(u) - <u, grad N(u)> u||`` at
the normalised point ``u = theta / ||theta||``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..flow import Problem, make_problem, tangent_gradient
from ..models import AbstractHomogeneousModel, safe_norm

__all__ = ["NCF", "as_problem", "Unflatten", "unflattener", "make_ncf", "ncf", "ncf_grad", "ncf_kkt_residual",
           "tangent_gradient"]


class NCF(eqx.Module):
    """The NCF of a :class:`homflow.flow.Problem` under its historical method names: ``value`` is ``N``, ``grad`` is
    ``grad N`` (the problem object's ``ncf``, ``ncf_grad``, ...; the NCF is written once, in the problem). Build one
    with :func:`make_ncf`; new code uses the :class:`homflow.flow.Problem` directly (every function of this package
    accepts either)."""

    problem: Problem

    @property
    def X(self):
        return self.problem.X

    @property
    def ytilde(self):
        return self.problem.ytilde

    @property
    def unflatten(self):
        return self.problem.unflatten

    @property
    def degree(self) -> int:
        return self.problem.degree

    def outputs(self, theta, X=None):
        """Network outputs ``Phi(theta; x_i)`` on the data (or on ``X``)."""
        return self.problem.outputs(theta, X)

    def value(self, theta):
        """``N(theta)``."""
        return self.problem.ncf(theta)

    def grad(self, theta):
        """``grad N(theta)``."""
        return self.problem.ncf_grad(theta)

    def value_and_grad(self, theta):
        return self.problem.ncf_value_and_grad(theta)

    def hessian(self, theta):
        """Dense ``Hess N(theta)``."""
        return self.problem.ncf_hessian(theta)

    def hvp(self, theta, v):
        """``Hess N(theta) v``."""
        return self.problem.ncf_hvp(theta, v)

    def residual(self, theta):
        """``(residual, lam, value)`` at ``u = theta / ||theta||`` (:meth:`homflow.flow.Problem.ncf_residual`)."""
        return self.problem.ncf_residual(theta)


def as_problem(obj) -> Problem:
    """The :class:`homflow.flow.Problem` of a problem or an :class:`NCF` view."""
    if isinstance(obj, NCF):
        return obj.problem
    if isinstance(obj, Problem):
        return obj
    raise ValueError(f"expected a homflow.flow.Problem (make_problem) or a kkt.NCF (make_ncf); got {type(obj).__name__}.")


class Unflatten(eqx.Module):
    """Hashable ``theta -> model`` map for one architecture (equal for equal architectures, so jitted functions taking
    an :class:`NCF` compile once per architecture, not once per call)."""

    skeleton: object = eqx.field(static=True)
    treedef: object = eqx.field(static=True)
    shapes: tuple = eqx.field(static=True)

    def __call__(self, theta):
        leaves, start = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape, dtype=np.int64))
            leaves.append(jnp.reshape(theta[start : start + size], shape))
            start += size
        return eqx.combine(jax.tree_util.tree_unflatten(self.treedef, leaves), self.skeleton)


def unflattener(model: AbstractHomogeneousModel) -> Unflatten:
    """The :class:`Unflatten` of ``model``'s architecture (same order as :func:`homflow.models.flatten`)."""
    params, skeleton = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return Unflatten(skeleton, treedef, tuple(tuple(x.shape) for x in leaves))


def make_ncf(model: AbstractHomogeneousModel, data, loss) -> tuple[NCF, Float[Array, " P"]]:
    """The NCF of ``model``'s architecture on ``data`` with the effective labels of ``loss`` (an :class:`NCF` view of
    :func:`homflow.flow.make_problem`), and ``model``'s vector.

    ``ytilde_i = -dl/dPhi(0, y_i)``: ``y`` for the square and exponential losses, ``y / 2`` for the logistic loss.

    Raises:
        ValueError: if the data's dimension does not match the model or a classification loss meets labels not +-1.
    """
    problem, theta = make_problem(model, data, loss)
    return NCF(problem), theta


def _unit(theta, name="model"):
    nrm = float(safe_norm(theta))
    if not nrm > 0:
        raise ValueError(f"`{name}` has all parameters zero; the NCF direction u = theta/||theta|| is undefined.")
    return theta / nrm


def ncf(model: AbstractHomogeneousModel, data, *, loss, normalize: bool = False) -> Float[Array, ""]:
    """The NCF value ``N(theta) = sum_i ytilde_i Phi(theta; x_i)`` (docs/math.md section 3, arXiv 2403.08121 eq. (5)).

    Arguments:
        model: the network (its parameters are ``theta``); data: a ``Dataset``; loss: gives ``ytilde`` (square and
            exponential: ``y``; logistic: ``y / 2``).
        normalize: evaluate at ``u = theta / ||theta||`` instead of ``theta`` (``N(u) = N(theta) / ||theta||^L``).

    Returns:
        The scalar ``N``.

    >>> import jax.numpy as jnp
    >>> from homflow.models import MLP
    >>> from homflow.data import Dataset
    >>> m = MLP.from_weights((jnp.array([[3.0, 4.0]]),), None)
    >>> round(float(ncf(m, Dataset(jnp.eye(2), jnp.array([1.0, 1.0])), loss="square", normalize=True)), 6)
    1.4
    """
    problem, theta = make_problem(model, data, loss)
    if normalize:
        theta = _unit(theta)
    return problem.ncf(theta)


def ncf_grad(model: AbstractHomogeneousModel, data, *, loss, normalize: bool = False) -> Float[Array, " P"]:
    """The flat gradient ``grad N(theta)`` (parameter order of :func:`homflow.models.flatten`), or at ``u`` if
    ``normalize``. Use ``unflatten_like(model, g)`` for the pytree form."""
    problem, theta = make_problem(model, data, loss)
    if normalize:
        theta = _unit(theta)
    return problem.ncf_grad(theta)


def ncf_kkt_residual(model: AbstractHomogeneousModel, data, *, loss) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """KKT residual of the constrained NCF at the normalised point ``u = theta / ||theta||``.

    Returns ``(residual, lam)``: ``residual = ||grad N(u) - <u, grad N(u)> u||`` (0 exactly at a KKT point of
    ``max N(u)`` s.t. ``||u|| = 1``) and ``lam = <u, grad N(u)> = L N(u)``. docs/math.md section 3, arXiv 2403.08121.

    Raises:
        ValueError: if every parameter is zero (no direction), or the data do not fit the model / loss.
    """
    problem, theta = make_problem(model, data, loss)
    res, lam, _ = problem.ncf_residual(_unit(theta))
    return res, lam
