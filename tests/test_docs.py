"""The documentation site builds with warnings as errors (``mkdocs build --strict``).

This checks every page, every link between pages and every docstring rendered in the
API reference. Build it yourself with ``mkdocs build --strict`` (``pip install -e
".[docs]"``) or preview it with ``mkdocs serve``.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="install the docs tools: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index.html", "quickstart/index.html", "diagnostics/index.html", "checkpoints/index.html",
                 "missing-data/index.html", "api/index.html"):
        assert (tmp_path / "site" / page).exists(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "check_against_mcmc" in api and "sbc" in api and "Simformer" in api
