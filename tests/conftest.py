"""Shared fixtures: every test gets its own key; nothing seeds globally."""

import os
import zlib

# Two test processes share the machine (pytest-xdist, pyproject's addopts): on a GPU neither
# may take 75 % of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402 - after the environment it reads
import pytest


@pytest.fixture
def rng_key(request):
    """A key derived from the test's name, so tests are independent and reproducible."""
    return jax.random.key(zlib.crc32(request.node.nodeid.encode()))
