"""Shared fixtures: every test gets its own key; nothing seeds globally."""

import atexit
import collections
import os
import shutil
import tempfile
import zlib

# Two test processes share the machine (pytest-xdist, pyproject's addopts): on a GPU neither
# may take 75 % of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Many tests compile the same small programs: each Simformer traces its own functions, so
# JAX's in-memory cache cannot share them, but XLA's persistent cache (keyed on the program
# itself) can. One cache per test process (its writes are not atomic), removed at exit;
# subprocesses started by tests inherit it. A second tiny fit in one process: 5.7 s to 1.2 s.
# Tracing still runs, so jax.log_compiles still reports every retrace (test_compile_cache.py).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="numpyro-simformer-tests-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402 - after the environment it reads
import pytest


@pytest.fixture
def rng_key(request):
    """A key derived from the test's name, so tests are independent and reproducible."""
    return jax.random.key(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(items):
    """Files with the most ``slow`` tests first, tests inside a file in their own order.

    The test processes take whole files (``--dist loadfile``); a file of minutes collected
    last, as alphabetical order would, runs alone while the other process idles.
    """
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])  # stable: ties keep the collection order
