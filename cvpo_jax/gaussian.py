"""The policy's multivariate normal with a lower-triangular scale, without LAPACK.

Why not distrax's MultivariateNormalTri: its log-prob and KL call a batched triangular
solve, which jaxlib 0.10.2 lowers on the CPU to a LAPACK kernel that splits large
batches into tasks on XLA's thread pool and blocks on them; two such calls in flight
at once (as in the M-step at batch 1024, K 64 on 2 cores) deadlock the pool. Here the
solves are forward substitution unrolled over the (small, static) action size A: the
same numbers (tests compare with distrax, SciPy and closed forms), no LAPACK, and
faster at these sizes.

Shapes: mean [..., A], scale_tril L [..., A, A] (positive diagonal); covariance L L^T.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


def solve_lower(tril: chex.Array, rhs: chex.Array) -> chex.Array:
    """Z = L^{-1} R by forward substitution; L [..., A, A], R [..., A, C] -> [..., A, C]."""
    num = tril.shape[-1]
    rows = []
    for i in range(num):
        acc = rhs[..., i, :]
        for j in range(i):
            acc = acc - tril[..., i, j, None] * rows[j]
        rows.append(acc / tril[..., i, i, None])
    return jnp.stack(rows, axis=-2)


def _log_det(tril: chex.Array) -> chex.Array:
    return jnp.sum(jnp.log(jnp.abs(jnp.diagonal(tril, axis1=-2, axis2=-1))), axis=-1)


class TriGaussian(NamedTuple):
    """N(mean, L L^T) with batch shape [...] and event shape [A]."""

    mean: chex.Array
    scale_tril: chex.Array

    def sample(self, seed: chex.PRNGKey, sample_shape: int | tuple[int, ...] = ()) -> chex.Array:
        """Samples [*sample_shape, ..., A] as mean + L eps."""
        shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
        eps = jax.random.normal(seed, shape + self.mean.shape, self.mean.dtype)
        return self.mean + jnp.einsum("...ij,...j->...i", self.scale_tril, eps)

    def log_prob(self, x: chex.Array) -> chex.Array:
        """log N(x; mean, L L^T) for x [*sample_shape, ..., A] -> [*sample_shape, ...]."""
        num = self.mean.shape[-1]
        z = solve_lower(self.scale_tril, (x - self.mean)[..., None])[..., 0]
        return (
            -0.5 * jnp.sum(jnp.square(z), axis=-1)
            - _log_det(self.scale_tril)
            - 0.5 * num * math.log(2.0 * math.pi)
        )

    def kl_divergence(self, other: TriGaussian) -> chex.Array:
        """KL(self || other), [...]."""
        num = self.mean.shape[-1]
        l_p, l_q = self.scale_tril, other.scale_tril
        trace = jnp.sum(jnp.square(solve_lower(l_q, l_p)), axis=(-2, -1))  # ||Lq^-1 Lp||_F^2
        m = solve_lower(l_q, (other.mean - self.mean)[..., None])[..., 0]
        mahalanobis = jnp.sum(jnp.square(m), axis=-1)
        return 0.5 * (trace + mahalanobis - num) + _log_det(l_q) - _log_det(l_p)
