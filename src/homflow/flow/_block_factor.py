"""Block-diagonal sliding factors of nets with one hidden layer.

The kink normal of a unit of a net with one hidden layer is ``grad_theta z_e``, ``z_e = <w_j, x_i>`` (a conv layer:
channel ``j`` at one position): it lives in the incoming weights of its own neuron (channel) ``j`` and does not move
with ``theta``. Normals of different neurons are orthogonal, so the Gram matrix ``G = N N^T`` of a sliding set is
block diagonal, one block per neuron, each block at most ``rank <= d`` units generically. A dense factor of ``K``
sliding units costs ``O(K^2)`` per solve and ``O(K P)`` per product with ``N`` at every field evaluation, and had to be
formed on the host per sliding set; the blocks cost ``O(K w)`` (``w`` the neuron's fan-in) and are formed inside the
compiled loop from the sliding set's indices, so a new sliding set costs the host nothing.

Layout: a sliding set is stored in ``m B`` slots, slot ``j B + b`` holding the ``b``-th sliding unit of neuron ``j``
(``B`` the block capacity: :data:`BLOCK_MIN` times a power of 4, enough for the fullest neuron). ``idx`` / ``valid``
of the compiled pieces are these slots. The neurons, their weights' columns and every unit's compact normal (its
normal on those columns) are found once per problem from the normals themselves (:func:`block_normals`).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._clarke import _eig_pinv, _gram_cholesky, capacity, jit

BLOCK_MIN = 4  # smallest block capacity (sliding units of one neuron)
BLOCK_GROWTH = 4


def block_capacity(k: int) -> int:
    """Slots per neuron for a fullest neuron of ``k`` sliding units: :data:`BLOCK_MIN` times a power of 4."""
    return capacity(k, BLOCK_MIN, BLOCK_GROWTH)


class BlockFactor(eqx.Module):
    """Compact normals ``Ns`` (m, B, w) of a sliding set in its slots, the columns ``cols`` (m, w) of ``theta`` they
    live on, the Gram blocks ``G`` (m, B, B) (identity rows at invalid slots), their pseudo-inverses ``Q`` and the slot
    mask ``valid`` (m, B). The interface of :class:`~homflow.flow._clarke.SlidingFactor` (``matvec``, ``rmatvec``,
    ``solve``) on flat slot vectors (m B,)."""

    Ns: jax.Array
    cols: jax.Array
    G: jax.Array
    Q: jax.Array
    valid: jax.Array
    P: int = eqx.field(static=True)

    def matvec(self, g):
        """``N g`` (m B,)."""
        return jnp.sum(self.Ns * g[self.cols][:, None, :], axis=-1).reshape(-1)

    def rmatvec(self, lam):
        """``N^T lam`` (P,)."""
        lam = lam.reshape(self.valid.shape)
        contrib = jnp.einsum("jbw,jb->jw", self.Ns, lam)
        return jnp.zeros((self.P,), contrib.dtype).at[self.cols.reshape(-1)].add(contrib.reshape(-1))

    def solve(self, b):
        """``G^+ b`` with one step of iterative refinement, zero at invalid slots."""
        b = b.reshape(self.valid.shape)
        d = jnp.einsum("jbc,jc->jb", self.Q, b)
        d = d + jnp.einsum("jbc,jc->jb", self.Q, b - jnp.einsum("jbc,jc->jb", self.G, d))
        return jnp.where(self.valid, d, 0.0).reshape(-1)


class BlockNormals(eqx.Module):
    """Per problem: the compact normal ``Nc`` (N, w) of every unit on the columns of its neuron, the neurons' columns
    ``cols`` (m, w) (padded with column 0 where a neuron has fewer; the compact normal is zero there) and every unit's
    neuron ``group`` (N,). :meth:`factor` forms a sliding set's :class:`BlockFactor` from its slots."""

    Nc: jax.Array
    cols: jax.Array
    group: jax.Array
    width: jax.Array  # columns of every neuron (m,)
    P: int = eqx.field(static=True)

    @property
    def n_groups(self) -> int:
        return int(self.cols.shape[0])

    def factor(self, idx, valid) -> BlockFactor:
        """The factor of the slots ``idx`` / ``valid`` (m B,): per block Cholesky when well conditioned (the smallest
        over the largest squared diagonal of its factor above ``1 / (1000 B eps)``), else its eigendecomposition with a
        ``B eps`` cut-off (dependent normals: the minimal-norm solution), as :class:`SlidingFactor` does for the whole
        set."""
        m = self.cols.shape[0]
        B = idx.shape[0] // m
        vm = valid.reshape(m, B)
        Ns = (self.Nc[idx] * valid[:, None].astype(self.Nc.dtype)).reshape(m, B, -1)
        eye = jnp.eye(B, dtype=Ns.dtype)
        G, L, ok = jax.vmap(lambda Nb, vb: _gram_cholesky(Nb.T, vb, None))(Ns, vm)  # per block, as gram_solve
        Lsafe = jnp.where(ok[:, None, None], L, eye)
        Qc = jax.vmap(lambda Lk: jax.scipy.linalg.cho_solve((Lk, True), eye))(Lsafe)

        def with_eig(Qc):
            V, inv = jax.vmap(_eig_pinv)(G)
            Qe = jnp.einsum("jbk,jk,jck->jbc", V, inv, V)
            return jnp.where(ok[:, None, None], Qc, Qe)

        Q = jax.lax.cond(jnp.all(ok), lambda Qc: Qc, with_eig, Qc)
        return BlockFactor(Ns, self.cols, G, Q, vm, self.P)


def block_slots(group, m, sliding):
    """``(idx, valid, slot)``: the slot arrays (m B,) of a sorted list of sliding units and the slot of each, from the
    units' neurons ``group`` (a host array) and the neuron count ``m``."""
    sliding = np.asarray(sliding, np.int64)
    g = group[sliding].astype(np.int64) if sliding.size else np.zeros(0, np.int64)
    counts = np.bincount(g, minlength=m)
    B = block_capacity(int(counts.max()) if sliding.size else 0)
    order = np.argsort(g, kind="stable")  # sorted units stay sorted within their neuron
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(sliding.size, np.int64)
    rank[order] = np.arange(sliding.size) - starts[g[order]]
    slot = g * B + rank
    idx = np.zeros(m * B, np.int32)
    valid = np.zeros(m * B, bool)
    idx[slot] = sliding
    valid[slot] = True
    return idx, valid, slot


@jit
def _normals_chunk(problem, theta, idx):
    return problem.normals(theta, idx)


def block_normals(problem, theta, chunk: int = 2048):
    """The :class:`BlockNormals` of a net with one hidden layer, found from its normals at ``theta`` (computed in
    chunks of ``chunk`` units): neurons are the connected components of the columns two units' normals share (for a
    dense layer its neurons, for a convolution its channels). ``None`` when every normal is zero."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    N = problem.n_entries
    P = int(theta.shape[0])
    rows = []
    chunk = min(chunk, N)
    for a in range(0, N, chunk):
        ids = np.arange(a, min(a + chunk, N), dtype=np.int32)
        pad = np.zeros(chunk, np.int32)
        pad[:ids.size] = ids
        rows.append(np.asarray(jax.device_get(_normals_chunk(problem, theta, jnp.asarray(pad))))[:ids.size])
    Nd = np.concatenate(rows)
    r, c = np.nonzero(Nd)
    graph = coo_matrix((np.ones(r.size, bool), (P + r, c)), shape=(P + N, P + N))
    _, label = connected_components(graph, directed=False)
    col_label, unit_label = label[:P], label[P:]
    used = np.unique(col_label[np.unique(c)]) if c.size else np.zeros(0, np.int64)
    if used.size == 0:
        return None
    comp = {int(l): k for k, l in enumerate(used)}
    cols_of = [np.flatnonzero(col_label == l) for l in used]
    w = max(len(x) for x in cols_of)
    m = len(cols_of)
    group = np.array([comp.get(int(l), 0) for l in unit_label], np.int32)  # a unit with a zero normal: neuron 0
    cols = np.zeros((m, w), np.int32)
    Nc = np.zeros((N, w), Nd.dtype)
    for k, cc in enumerate(cols_of):
        cols[k, :len(cc)] = cc
        sel = np.flatnonzero(group == k)
        Nc[np.ix_(sel, np.arange(len(cc)))] = Nd[np.ix_(sel, cc)]
    width = np.asarray([len(cc) for cc in cols_of], np.int32)
    return BlockNormals(jnp.asarray(Nc), jnp.asarray(cols), jnp.asarray(group), jnp.asarray(width), P)
