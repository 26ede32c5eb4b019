"""Shared test fixtures.

The parity fixtures and real data live in ``../shared`` next to the repository root. Tests that need them
use the ``shared_dir`` fixture, which skips (only that test) when the folder is absent.

The suite compiles into one persistent XLA cache of its own, new for each run: every worker and every
subprocess (``jaxnas.main`` reads ``JAX_COMPILATION_CACHE_DIR``) shares it, so a program compiled by one test
is loaded by the next, as on a user's machine; the run starts cold, as on CI, and leaves the user's cache
(``~/.cache/jaxnas/xla``) alone. The suite's programs are tiny and their compilation outweighs their run, so
XLA:CPU compiles them with LLVM at its lowest level (options ``XLA_FLAGS`` sets are kept): 9-16% less time.
"""
import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("JAXNAS_SHARED", REPO_ROOT.parent / "shared"))

if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller (or a run without xdist), before JAX is imported
  _cache = tempfile.mkdtemp(prefix="jaxnas_test_xla_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache  # xdist workers and subprocesses inherit it
  from jaxnas import parallel  # pylint: disable=g-import-not-at-top  (after the cache: JAX reads it on import)
  parallel.add_xla_flags({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


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
