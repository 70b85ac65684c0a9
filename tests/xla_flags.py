"""XLA flags of the test processes and of every subprocess a test starts (no JAX import here: conftest reads this
before JAX starts its backend).

LLVM at -O0: the tests' tiny programs compile about a third faster (a 20-step trainer subprocess: 46 -> 30 s of
CPU) and still run for milliseconds a step. XLA's older loop emitters for fusions instead of its MLIR fusion
emitters: another quarter off (a text DiT's train step compiled in 12.7-13.0 s instead of 15.5-17.6 s). Numerics
are XLA's either way (fast-math stays off); speed is measured by `vdit_jax.bench`, never by a test.
"""

COMPILE_FAST = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices."""
    return COMPILE_FAST if devices == 1 else f"{COMPILE_FAST} --xla_force_host_platform_device_count={devices}"
