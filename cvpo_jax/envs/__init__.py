"""Environments: Safety-Gymnasium (through a compatibility layer) behind one batched API.

Importing this package is cheap; safety_gymnasium itself is imported, with its
compatibility fixes, on first use.
"""

from cvpo_jax.envs.registry import list_env_ids, list_env_names, resolve_env_id
from cvpo_jax.envs.safety_gymnasium import (
    EpisodeStats,
    SafetyGymVectorEnv,
    StepResult,
    accumulate_episodes,
    true_next_observations,
)
from cvpo_jax.envs.safety_gymnasium_compat import (
    SafetyGymnasiumCompatError,
    import_safety_gymnasium,
)

__all__ = [
    "EpisodeStats",
    "SafetyGymVectorEnv",
    "SafetyGymnasiumCompatError",
    "StepResult",
    "accumulate_episodes",
    "import_safety_gymnasium",
    "list_env_ids",
    "list_env_names",
    "resolve_env_id",
    "true_next_observations",
]
