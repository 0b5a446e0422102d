"""DSN-SAAL: deep-supervised VGG16-BN with a self-adaptive auxiliary loss, in JAX/Flax.

Importing it changes nothing in the process: call `setup_host()` first (the launch scripts do) for the
XLA:CPU flag, TensorFlow's device visibility and the CPU kernels (see `dsn_saal_jax.host`).
"""

from dsn_saal_jax.host import CPU_XLA_FLAG, setup as setup_host

__all__ = ["CPU_XLA_FLAG", "setup_host"]
