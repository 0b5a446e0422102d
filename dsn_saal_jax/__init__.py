"""DSN-SAAL: deep-supervised VGG16-BN with a self-adaptive auxiliary loss, in JAX/Flax."""

import os as _os
import sys as _sys
import warnings as _warnings

# XLA:CPU hands convs and dots to YNNPACK by default; with it, this model's
# convolution gradients ran 5-10x slower than with XLA's own Eigen kernels.
# Measured on both CPU kinds we run on, so it is set on every CPU: the VGG train
# step went from 0.74x to 0.93x PyTorch's speed on AMD EPYC (Zen 4), and from
# 0.46x to 0.68x on Intel Xeon (AVX-512, AMX); benchmarks/conv_kernels.py times
# each choice on a new CPU kind (benchmarks/README.md). Turned off here, before
# JAX starts its backend, unless the user chose a value. The flag only touches
# the CPU backend.
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
