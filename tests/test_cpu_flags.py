"""Importing dsn_saal_jax sets the fast XLA:CPU flag before JAX starts, and respects the user's own."""

import os
import shutil
import subprocess
import sys

import pytest

import dsn_saal_jax
from dsn_saal_jax import cpu

PROBE = """
import os, warnings
warnings.simplefilter("error")
{before}
import dsn_saal_jax, jax, jax.numpy as jnp
hlo = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
print(os.environ["XLA_FLAGS"])
print("ynn" if "__ynn_fusion" in hlo else "eigen")
"""


def _probe(xla_flags: str | None, before: str = "") -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  return subprocess.run([sys.executable, "-c", PROBE.format(before=before)], env=env, capture_output=True,
                        text=True, timeout=120)


def test_flag_is_added_to_the_users_flags_and_takes_effect():
  out = _probe("--xla_force_host_platform_device_count=2")
  assert out.returncode == 0, out.stderr
  flags, dots = out.stdout.split("\n")[:2]
  assert flags.split() == ["--xla_force_host_platform_device_count=2", dsn_saal_jax.CPU_XLA_FLAG]
  assert dots == "eigen"


def test_users_own_value_is_kept():
  """The same probe that sees Eigen above sees XLA's default (YNNPACK) dots when the user asks for them."""
  out = _probe("--xla_cpu_experimental_ynn_fusion_type=individual_dot")
  assert out.returncode == 0, out.stderr
  assert out.stdout.split("\n")[:2] == ["--xla_cpu_experimental_ynn_fusion_type=individual_dot", "ynn"]


def test_late_import_warns_that_the_flag_cannot_apply():
  out = _probe(None, before="import jax; jax.devices()")
  assert out.returncode != 0
  assert "RuntimeWarning" in out.stderr and "imported after JAX started its backends" in out.stderr


def test_cpu_model_and_features_are_what_lscpu_says():
  """Benchmarks name the CPU and its bf16 extensions through dsn_saal_jax.cpu; it must agree with lscpu."""
  if shutil.which("lscpu") is None:
    pytest.skip("lscpu is not installed on this machine")
  fields = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                                               check=True).stdout.splitlines() if ":" in line)
  assert cpu.model_name() == fields["Model name"].strip()
  assert cpu.features() == frozenset(fields["Flags"].split())
  named = [f for f in cpu.BF16_FEATURES if f in fields["Flags"].split()]
  assert cpu.describe() == f"{fields['Model name'].strip()} ({', '.join(named) or 'no bf16 extensions'})"
