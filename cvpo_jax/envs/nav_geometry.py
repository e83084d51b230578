"""Pseudo-lidar and layout sampling of the navigation tasks, in JAX (jit/vmap-safe).

Both follow safety-gymnasium 1.0.0 (see `nav_task.py` for the sources mirrored); the
layout sampler replaces the unbounded Python retry loops with a fixed number of
vectorised proposals, so a reset is one fixed-shape computation.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def ego_xy(points: chex.Array, agent_pos: chex.Array, agent_mat: chex.Array) -> chex.Array:
    """Points [N, 2] in the robot's frame [N, 2] (`_ego_xy`: z of the points taken as 0).

    agent_pos: [3] body position; agent_mat: [3, 3] body orientation (xmat).
    """
    world = jnp.concatenate([points, jnp.zeros_like(points[:, :1])], axis=1) - agent_pos
    return (world @ agent_mat)[:, :2]


def pseudo_lidar(
    ego: chex.Array,
    num_bins: int,
    max_dist: float | None,
    exp_gain: float,
    alias: bool,
) -> chex.Array:
    """Safety-Gymnasium's pseudo-lidar [num_bins] of objects at ego-frame points [N, 2].

    Each object lights the bin of its angle with max(0, max_dist - d) / max_dist
    (exp(-exp_gain * d) when max_dist is None) and, with alias, its two neighbours
    with that value times the angle's position inside the bin; bins keep the max.
    """
    dist = jnp.linalg.norm(ego, axis=1)
    angle = jnp.mod(jnp.arctan2(ego[:, 1], ego[:, 0]), 2 * jnp.pi)
    bin_size = 2 * jnp.pi / num_bins
    index = jnp.clip(jnp.floor(angle / bin_size).astype(jnp.int32), 0, num_bins - 1)
    if max_dist is None:
        sensor = jnp.exp(-exp_gain * dist)
    else:
        sensor = jnp.maximum(0.0, max_dist - dist) / max_dist
    obs = jnp.zeros((num_bins,), ego.dtype).at[index].max(sensor)
    if alias:
        frac = (angle - index * bin_size) / bin_size
        obs = obs.at[(index + 1) % num_bins].max(frac * sensor)
        obs = obs.at[(index - 1) % num_bins].max((1 - frac) * sensor)
    return obs


def draw_clear_point(
    key: chex.PRNGKey,
    extents: tuple[float, float, float, float],
    keepout: float,
    others: chex.Array,
    others_keepout: chex.Array,
    tries: int,
) -> tuple[chex.Array, chex.Array]:
    """The first of `tries` uniform draws that clears every other object.

    A draw is uniform in the extents shrunk by `keepout` and clear when its distance
    to each other object i is >= keepout + others_keepout[i] (`draw_placement`,
    `sample_layout`; margin 0).

    Args:
      others: [P, 2] positions; others_keepout: [P] (an entry of -inf disables one).

    Returns:
      (xy [2], ok []): ok is False when no draw was clear (xy is then the last draw).
    """
    lo = jnp.asarray([extents[0] + keepout, extents[1] + keepout])
    hi = jnp.asarray([extents[2] - keepout, extents[3] - keepout])
    draws = jax.random.uniform(key, (tries, 2), minval=lo, maxval=hi)
    if others.shape[0] == 0:
        return draws[0], jnp.asarray(True)
    dist = jnp.linalg.norm(draws[:, None, :] - others[None, :, :], axis=-1)  # [T, P]
    clear = jnp.all(dist >= keepout + others_keepout[None, :], axis=1)
    first = jnp.argmax(clear)
    ok = clear[first]
    return jnp.where(ok, draws[first], draws[-1]), ok


def sample_layout(
    key: chex.PRNGKey,
    extents: tuple[float, float, float, float],
    keepouts: tuple[float, ...],
    tries: int = 100,
    restarts: int = 8,
) -> tuple[chex.Array, chex.Array]:
    """A layout of len(keepouts) objects placed in order (`sample_layout`).

    Each object takes the first of `tries` draws clear of those before it; a layout
    in which some object found none is discarded, and of `restarts` layouts sampled
    at once the first complete one is returned (Safety-Gymnasium restarts up to
    10,000 times, one at a time).

    Returns:
      (xy [P, 2], ok []): ok is False if all restarts failed (xy: the last one).
    """
    keepout = jnp.asarray(keepouts)

    def one(k):
        keys = jax.random.split(k, len(keepouts))
        xy = jnp.zeros((len(keepouts), 2))
        ok = jnp.asarray(True)
        for i, ko in enumerate(keepouts):
            others_keepout = jnp.where(jnp.arange(len(keepouts)) < i, keepout, -jnp.inf)
            point, found = draw_clear_point(keys[i], extents, ko, xy, others_keepout, tries)
            xy = xy.at[i].set(point)
            ok = ok & found
        return xy, ok

    layouts, oks = jax.vmap(one)(jax.random.split(key, restarts))
    first = jnp.argmax(oks)
    return layouts[first], oks[first]


def sample_layout_until(
    key: chex.PRNGKey,
    extents: tuple[float, float, float, float],
    keepouts: tuple[float, ...],
    max_attempts: int,
    tries: int = 100,
) -> tuple[chex.Array, chex.Array]:
    """Safety-Gymnasium's `build_layout`: single layouts (`sample_layout` with one
    restart) drawn one after another until one is complete, at most `max_attempts`.

    A while loop: under vmap it runs until every lane has succeeded, so it suits a
    reset at the start of training, not a step.

    Returns:
      (xy [P, 2], ok []) as `sample_layout`.
    """

    def attempt(carry):
        k, n, _, _ = carry
        k, sub = jax.random.split(k)
        xy, ok = sample_layout(sub, extents, keepouts, tries, restarts=1)
        return k, n + 1, xy, ok

    def pending(carry):
        _, n, _, ok = carry
        return (~ok) & (n < max_attempts)

    start = (key, jnp.zeros((), jnp.int32), jnp.zeros((len(keepouts), 2)), jnp.asarray(False))
    _, _, xy, ok = jax.lax.while_loop(pending, attempt, start)
    return xy, ok
