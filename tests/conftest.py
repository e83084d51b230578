import sys
import tempfile
from pathlib import Path

import jax

# Test helpers (e.g. the scripted env) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

# Many tests build learners with identical configurations; a persistent compilation
# cache (fresh per test session) compiles each distinct program once.
_CACHE = tempfile.mkdtemp(prefix="cvpo-jax-test-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
