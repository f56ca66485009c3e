"""Test setup: 8 fake CPU devices, fast XLA compiles (`xla_flags.py`) and full float32 matmul precision, set
before JAX is imported.

A session-wide persistent compilation cache lets the training tests, which build the same tiny train step
several times (straight run, interrupted run, resumed run), compile it once. It lives in a temporary
folder that is removed when the test process exits, so repeated runs leave nothing behind.
"""
import atexit
import os
import shutil
import tempfile

from xla_flags import FAST_COMPILE, flags

os.environ.setdefault("XLA_FLAGS", flags(8))
if FAST_COMPILE not in os.environ["XLA_FLAGS"]:  # the README command sets only the device count
    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
_CACHE_DIR = tempfile.mkdtemp(prefix="insloc_jax_test_cache_")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
