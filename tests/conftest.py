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
