"""Shared pytest fixtures.

Tests that need the read-only reference material in ``../shared`` (next to the project
root) use the fixtures below; they skip with a clear reason when that folder is absent,
so the suite still runs on a plain checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep every test single-threaded on BLAS/OpenMP: the CI box has 2 cores and several
# torch tests run in one process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = PROJECT_ROOT.parent / "shared"


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (the ../shared reference folder is absent)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared``: reference docs, fixtures and assets (read-only)."""
    return _need(SHARED_DIR, "shared reference folder")


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The tiny official-format checkpoint with recorded official outputs."""
    return _need(SHARED_DIR / "fixtures" / "ixc2_vl_tiny_public", "ixc2_vl_tiny_public fixture")


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    """The official finetuning example data (data.txt + JSON + images)."""
    return _need(SHARED_DIR / "assets" / "official-examples", "official example data")


@pytest.fixture(scope="session")
def real_tokenizer() -> Path:
    """Path of the real InternLM2 ``tokenizer.model``."""
    return _need(SHARED_DIR / "assets" / "internlm2-tokenizer" / "tokenizer.model", "real InternLM2 tokenizer")


@pytest.fixture(scope="session")
def fixture_2d5_dir() -> Path:
    """The tiny official InternLM-XComposer-2.5 checkpoint with recorded official outputs."""
    return _need(SHARED_DIR / "fixtures" / "ixc2d5_tiny_public", "ixc2d5_tiny_public fixture")
