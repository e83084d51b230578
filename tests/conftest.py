import os
import sys
import tempfile
from pathlib import Path

import jax

# Test helpers (e.g. the scripted env) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

# Many tests build learners with identical configurations; a persistent compilation
# cache (fresh per test session) compiles each distinct program once. The pytest-xdist
# workers of one run share it (their run id names it), and so do the training
# subprocesses the CLI tests start (they inherit the JAX_* variables).
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN:
    _CACHE = os.path.join(tempfile.gettempdir(), f"cvpo-jax-test-xla-cache-{_RUN}")
    os.makedirs(_CACHE, exist_ok=True)
else:
    _CACHE = tempfile.mkdtemp(prefix="cvpo-jax-test-xla-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The end-to-end tests run training in subprocesses (the CLI, the notebook's kernel),
# whose time is mostly XLA compiling small programs, much of it LLVM's optimisation
# passes: without them the notebook test's CPU time fell from 188 s to 120 s. They
# check plumbing (runs, checkpoints, resume), not numerics, so their subprocesses
# inherit XLA_FLAGS with the backend's optimisation off. This process starts its
# backend first (jax reads XLA_FLAGS once), so the in-process tests, which compare
# numbers, run what users run. The cache's keys hash XLA_FLAGS as read at compile
# time, so the subprocesses get a cache of their own (else this process could load
# their unoptimised programs under its keys). CVPO_TEST_XLA_OPT=1 keeps the default.
jax.devices()
if not os.environ.get("CVPO_TEST_XLA_OPT"):
    _OPT = "--xla_backend_optimization_level=0"
    if _OPT not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _OPT).strip()
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE + "-subprocesses-o0"
    os.makedirs(os.environ["JAX_COMPILATION_CACHE_DIR"], exist_ok=True)
