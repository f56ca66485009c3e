"""The XLA flags of every test process: the conftest's and those of the subprocesses tests start.

The suite is mostly XLA compiling tiny programs once each, and much of a CPU compile is LLVM optimising the
generated code. `--xla_backend_optimization_level=0` turns that optimisation down to its lowest level: on
the 2-core VM tests/test_step.py takes 103 s instead of 138 s, and the whole suite passes with the same
tolerances. The programs under test then run slower, which at the tests' sizes costs less than it saves.
"""
FAST_COMPILE = "--xla_backend_optimization_level=0"


def flags(devices: int = 0) -> str:
    """XLA_FLAGS for a test process: fast compiles, and `devices` fake CPU devices where it is non-zero."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}" if devices else FAST_COMPILE
