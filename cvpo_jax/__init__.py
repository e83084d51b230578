"""cvpo-jax: Constrained Variational Policy Optimization (Liu et al., ICML 2022) in JAX."""

from cvpo_jax.config import CVPOConfig, episodic_to_q_threshold
from cvpo_jax.learner import Learner, make_learner
from cvpo_jax.types import TrainState, Transition

__all__ = [
    "CVPOConfig",
    "Learner",
    "TrainState",
    "Transition",
    "episodic_to_q_threshold",
    "make_learner",
]
__version__ = "0.1.0"
