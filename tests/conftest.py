"""Shared test setup.

Eight simulated CPU devices are requested before jax is imported anywhere, so that sharding tests can
build real meshes on a machine with one CPU, and XLA's CPU code generation runs at -O0 with its
elemental emitters, which cuts the suite's compile time by about half (see ``suite_xla_flags`` in
tests/fixtures/multiprocess.py; the subprocesses that tests start get the same flags). Tests that need an accelerator are marked
``gpu`` and skip on CPU.

One persistent JAX compilation cache serves the whole session: the pytest-xdist workers and every
subprocess a test starts (`genevolve train` in the fault tests, the two-process workers) inherit it
through the environment. Many tests compile the same programs (each trainer a test builds, each
process of a kill-and-resume test), and XLA's compile is most of their time on a CPU; a program
compiled once is read back from disk afterwards, the same executable, so the numbers do not change.
The cache is made empty for each session and removed at its end, so no run depends on what an
earlier one compiled. Set ``JAX_COMPILATION_CACHE_DIR`` yourself to choose the directory, or to
the empty string to compile everything afresh.

With pytest-xdist (``-n 2``, the README's command) the workers steal work from each other, and
the modules that hold slow tests run first (see the hooks below).
"""
import os
import shutil
import sys
import tempfile

from tests.fixtures.multiprocess import suite_xla_flags  # noqa: E402  (imports no jax)

os.environ.setdefault("XLA_FLAGS", suite_xla_flags(8))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Made by the first process that imports this file (pytest itself, or the xdist controller, which
# starts its workers after this import); the workers and subprocesses find it in the environment.
SESSION_COMPILE_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    SESSION_COMPILE_CACHE = tempfile.mkdtemp(prefix="genevolve-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = SESSION_COMPILE_CACHE
# Programs that compile in under 0.2 s are not worth a file (the many one-op dispatches); a size
# limit turns on the cache's file lock, so that a worker never reads an entry another is writing.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

# Python's bytecode likewise. The README installs with `pip install --no-compile`, so no .pyc comes
# with the packages, and where PYTHONDONTWRITEBYTECODE is set (this project's machines set it) none is
# ever written: every process would compile jax, flax, transformers and this package from source again,
# 4 to 5 CPU-seconds each (measured on one `genevolve train` process: 17.0 → 13.1 CPU-s), and the
# suite starts a few dozen such processes. The bytecode then goes to a session folder
# (PYTHONPYCACHEPREFIX), removed at the end, so nothing is written next to the sources or into
# the environment that the setting was meant to keep clean.
SESSION_PYCACHE = None
if sys.dont_write_bytecode and "PYTHONPYCACHEPREFIX" not in os.environ:
    SESSION_PYCACHE = tempfile.mkdtemp(prefix="genevolve-tests-pycache-")
    os.environ["PYTHONPYCACHEPREFIX"] = SESSION_PYCACHE
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.pycache_prefix = SESSION_PYCACHE
    sys.dont_write_bytecode = False

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    # `pytest -n N` (pytest-xdist) hands each worker fixed runs of consecutive tests ("load"), so
    # a long test can wait behind another on one worker while the other runs dry. Work stealing
    # lets an idle worker take tests that have not started yet from a busy one. An explicit
    # --dist is left as asked.
    asked = any(a == "--dist" or a.startswith("--dist=") or a == "-d" for a in config.invocation_params.args)
    if getattr(config.option, "dist", "no") == "load" and not asked:
        config.option.dist = "worksteal"


def pytest_collection_modifyitems(config, items):
    # Modules with slow tests first (each module kept whole, in its order, for its fixtures): the
    # long tests start early and the short ones fill in behind them, so the run does not end on
    # one long test while the other worker idles.
    slow_modules = {item.module for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.module not in slow_modules)     # a stable sort
    has_gpu = any(d.platform in ("gpu", "tpu") for d in jax.devices())
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a GPU/TPU accelerator")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_unconfigure(config):
    for folder in (SESSION_COMPILE_CACHE, SESSION_PYCACHE):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
