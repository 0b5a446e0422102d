"""What CPU this is, from /proc/cpuinfo: the facts that CPU-dependent speed choices and benchmark reports name.

It imports no JAX: benchmarks/conv_kernels.py names the CPU in a process that
must leave JAX's flags to its workers.
"""

from __future__ import annotations

import functools

# The instruction-set extensions that decide which bfloat16 kernels a CPU can run fast.
BF16_FEATURES = ("avx512_bf16", "amx_bf16", "amx_tile")


@functools.cache
def _cpuinfo() -> dict[str, str]:
  """The first processor's "key: value" lines; empty where /proc/cpuinfo cannot be read (not Linux)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().split("\n\n", 1)[0].splitlines()
  except OSError:
    return {}
  return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def model_name() -> str:
  """lscpu's "Model name", e.g. 'AMD EPYC' or 'Intel(R) Xeon(R) Processor'."""
  return _cpuinfo().get("model name", "unknown CPU")


def features() -> frozenset[str]:
  """The CPU's flags as lscpu lists them (avx512f, avx512_bf16, amx_tile, ...)."""
  return frozenset(_cpuinfo().get("flags", "").split())


def describe() -> str:
  """Model name and the bfloat16-relevant extensions, for benchmark headers."""
  present = [f for f in BF16_FEATURES if f in features()]
  return f"{model_name()} ({', '.join(present) if present else 'no bf16 extensions'})"
