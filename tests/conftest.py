"""Shared fixtures: every test gets its own key; nothing seeds globally."""

import zlib

import jax
import pytest


@pytest.fixture
def rng_key(request):
    """A key derived from the test's name, so tests are independent and reproducible."""
    return jax.random.key(zlib.crc32(request.node.nodeid.encode()))
