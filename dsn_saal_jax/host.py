"""What a process sets once, before JAX and TensorFlow start: `setup()`. Importing dsn_saal_jax sets nothing.

The launch scripts call it (through `dsn_saal_jax.cli.setup`); a notebook, benchmark or test process calls
`dsn_saal_jax.setup_host()` first thing. It
- adds CPU_XLA_FLAG to XLA_FLAGS (unless the user chose a value for it);
- hides accelerators from TensorFlow, which only decodes and resizes images here, so that it never claims
  memory JAX needs;
- picks the CPU-only kernels (`models.cpu_kernels`) from DSN_SAAL_CPU_KERNELS = auto | on | off, read here
  once, not while a model is traced.
"""

from __future__ import annotations

import os
import sys
import warnings

# XLA:CPU hands convs and dots to YNNPACK by default; with it, this model's
# convolution gradients ran 5-10x slower than with XLA's own Eigen kernels.
# Measured on both CPU kinds we run on, so it is set on every CPU: the VGG train
# step went from 0.74x to 0.93x PyTorch's speed on AMD EPYC (Zen 4), and from
# 0.46x to 0.68x on Intel Xeon (AVX-512, AMX); benchmarks/conv_kernels.py times
# each choice on a new CPU kind (benchmarks/README.md). It must be set before
# JAX starts its backend, unless the user chose a value. The flag only touches
# the CPU backend.
CPU_XLA_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
CPU_KERNELS_ENV = "DSN_SAAL_CPU_KERNELS"


def setup(cpu_kernels: str | None = None, tensorflow: bool = True) -> None:
  """All of the above; `cpu_kernels` overrides DSN_SAAL_CPU_KERNELS. Calling it again changes nothing more.

  `tensorflow=False`: a process that never uses TensorFlow (in-memory data) does not import it (~4 s).
  """
  set_cpu_xla_flag()
  if tensorflow:
    hide_accelerators_from_tensorflow()
  from dsn_saal_jax.models import cpu_kernels as kernels  # pylint: disable=import-outside-toplevel
  kernels.use(cpu_kernels if cpu_kernels is not None else os.environ.get(CPU_KERNELS_ENV, "auto"))


def set_cpu_xla_flag() -> None:
  """Adds CPU_XLA_FLAG to XLA_FLAGS; warns when JAX's backends have started and it is too late."""
  flags = os.environ.get("XLA_FLAGS", "")
  if CPU_XLA_FLAG.rstrip("=") in flags:
    return
  os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()
  if "jax" in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    if xla_bridge.backends_are_initialized():
      warnings.warn(
          "dsn_saal_jax.setup_host() was called after JAX started its backends, so XLA_FLAGS cannot take "
          f"{CPU_XLA_FLAG!r} any more and CPU training runs ~1.3x slower. Call it before using JAX, or "
          "export XLA_FLAGS with it.", RuntimeWarning, stacklevel=3)


def hide_accelerators_from_tensorflow() -> None:
  """TensorFlow sees no GPU (a no-op once TF has initialised its devices, or where TF is not installed)."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  except ImportError:  # an accelerator image without TensorFlow: nothing to hide
    return
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass
