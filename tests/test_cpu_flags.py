"""dsn_saal_jax.setup_host() sets the fast XLA:CPU flag before JAX starts and respects the user's own; importing
the package sets nothing."""

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
import jax, jax.numpy as jnp
from dsn_saal_jax import host
host.set_cpu_xla_flag()  # setup_host()'s XLA part, without its TensorFlow import
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


def test_late_setup_warns_that_the_flag_cannot_apply():
  out = _probe(None, before="import jax; jax.devices()")
  assert out.returncode != 0
  assert "RuntimeWarning" in out.stderr and "called after JAX started its backends" in out.stderr


IMPORT_ONLY = """
import os, sys
import tensorflow as tf
calls = []
tf.config.set_visible_devices = lambda *args: calls.append(args)
import dsn_saal_jax, dsn_saal_jax.data, dsn_saal_jax.cli, dsn_saal_jax.models
print(os.environ.get("XLA_FLAGS"), calls, dsn_saal_jax.models.cpu_kernels._choice)
dsn_saal_jax.setup_host()
print(os.environ.get("XLA_FLAGS"), calls, dsn_saal_jax.models.cpu_kernels._choice)
"""


def test_import_changes_nothing_and_setup_host_does_it_all():
  """XLA_FLAGS, TensorFlow's devices and the kernel choice stay as they were until setup_host() is called."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", DSN_SAAL_CPU_KERNELS="off")
  out = subprocess.run([sys.executable, "-c", IMPORT_ONLY], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split("\n")[:2] == [
      "--xla_force_host_platform_device_count=2 [] auto",
      f"--xla_force_host_platform_device_count=2 {dsn_saal_jax.CPU_XLA_FLAG} [([], 'GPU')] off"]


def test_this_test_process_runs_with_the_flag():
  """conftest calls setup_host() before JAX starts, so the suite times and compiles what the launchers run."""
  assert dsn_saal_jax.CPU_XLA_FLAG in os.environ["XLA_FLAGS"].split()


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
