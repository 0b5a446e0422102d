"""DSN-SAAL: deep-supervised VGG16-BN with a self-adaptive auxiliary loss, in JAX/Flax."""

import os as _os
import sys as _sys
import warnings as _warnings

# XLA:CPU hands dots to YNNPACK by default; with it, this model's convolution
# gradients ran 5-10x slower than with XLA's own Eigen kernels and a train step
# 0.74x the PyTorch reference's speed (benchmarks/README.md). Turned off here,
# before JAX starts its backend, unless the user chose a value. The flag only
# touches the CPU backend.
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _set_cpu_xla_flag() -> None:
  flags = _os.environ.get("XLA_FLAGS", "")
  if CPU_XLA_FLAG.rstrip("=") in flags:
    return
  _os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()
  if "jax" in _sys.modules:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      _warnings.warn(
          "dsn_saal_jax was imported after JAX started its backends, so XLA_FLAGS cannot take "
          f"{CPU_XLA_FLAG!r} any more and CPU training runs ~1.3x slower. Import dsn_saal_jax before "
          "using JAX, or export XLA_FLAGS with it.", RuntimeWarning, stacklevel=3)


_set_cpu_xla_flag()
