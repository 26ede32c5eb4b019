"""Shared test fixtures.

The parity fixtures and real data live in ``../shared`` next to the repository root. Tests that need them
use the ``shared_dir`` fixture, which skips (only that test) when the folder is absent.
"""
import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("JAXNAS_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  if not SHARED.is_dir():
    pytest.skip(f"shared material not found at {SHARED}")
  return SHARED


@pytest.fixture
def x64():
  """Runs the test body with 64-bit floats enabled."""
  import jax
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)
