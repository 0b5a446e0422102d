"""Fixtures shared by the trainer tests: the subprocess worker and one uninterrupted reference run."""

import os
import socket
import subprocess
import sys
from concurrent import futures

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 12  # tiny_config's num_train_steps: 3 epochs of 4 steps, a checkpoint every 4


@pytest.hookimpl(trylast=True)  # after pytest's tmpdir plugin has set up the session's base folder
def pytest_configure(config):
  """One persistent compilation cache for the session: this process and every process it launches.

  Tests compile the same programs many times over (tiny configs' init, steps, reports), in process and in
  each launched run; XLA:CPU's compile is most of a small test's time. Set before JAX is imported; so is
  the host setup every process of the suite makes.
  """
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(config._tmp_path_factory.getbasetemp() / "jax_cache"))  # pylint: disable=protected-access
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  import dsn_saal_jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  dsn_saal_jax.setup_host()  # as the launchers do: the XLA:CPU flag, TF without GPUs, DSN_SAAL_CPU_KERNELS


def run_worker(args, devices, timeout=900, env_extra=None):
  """Runs tests/train_worker.py in a fresh process with `devices` CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
  env.update(env_extra or {})
  return subprocess.run([sys.executable, os.path.join(HERE, "train_worker.py"), *args], env=env,
                        capture_output=True, text=True, timeout=timeout)


def concurrently(*calls):
  """Runs each zero-argument callable in its own thread; their results in order (the first error is raised).

  For independent subprocess runs: each spends much of its time in single-threaded imports, so two
  overlap well on a 2-core machine and the pytest process only waits.
  """
  with futures.ThreadPoolExecutor(len(calls)) as pool:
    return [f.result() for f in [pool.submit(c) for c in calls]]


def init_variables(model, input_shape, seed: int = 0, **init_kwargs):
  """`model.init` on zeros of `input_shape`, compiled as one program with the rbg key.

  The same initialisers; op by op, and with threefry keys, XLA:CPU takes several times longer
  (threefry compiles ~3x slower for every leaf).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  init = jax.jit(lambda key, x: model.init(key, x, **init_kwargs))
  return init(jax.random.key(seed, impl="rbg"), jnp.zeros(input_shape))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def multiprocess_env(devices_per_process: int = 2) -> dict[str, str]:
  """Environment for train_worker.py processes joined by jax.distributed on localhost."""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
              PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))


def train(workdir, out=None, devices=1, fault=None, **kwargs):
  """One tiny in-memory training run in a subprocess; `fault` as train_worker.install_fault takes it."""
  args = ["train", f"--workdir={workdir}"] + ([f"--out={out}"] if out else [])
  args += ([f"--fault={fault}"] if fault else []) + [f"--{k}={v}" for k, v in kwargs.items()]
  return run_worker(args, devices)


def latest_steps(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit())


def assert_same_state(a, b):
  """Every array of two final states equal, bit for bit (same machine, same program)."""
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="session")
def covid19_ct_dir():
  """The real COVID19-CT folder (upstream layout); tests that need it skip, saying where it was looked for."""
  from dsn_saal_jax.data import builders  # pylint: disable=g-import-not-at-top
  path = builders.default_manual_dir("covid19_ct")
  if path is None or not os.path.isdir(path):
    pytest.skip(f"COVID-CT not found (looked at {path or '<repo>/../shared/data/covid19_ct'}); set "
                f"${builders.COVID19_CT_ENV} to its upstream folder to run this test")
  return path


@pytest.fixture(scope="session")
def covid19_ct_tfds(covid19_ct_dir, tmp_path_factory) -> str:
  """A TFDS data_dir holding the real COVID19-CT, built once for the session (builder config 'original',
  what lung_mask=False reads): decoding its 746 PNG slices is most of a build."""
  from dsn_saal_jax.data import builders  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("covid19_ct_tfds"))
  builders.prepare(builders.Covid19Ct(data_dir=data_dir, config="original"), covid19_ct_dir)
  return data_dir


def _train_reference(tmp):
  return tmp, train(tmp / "work", out=tmp / "final.npz")


@pytest.fixture(scope="session")
def reference_started(tmp_path_factory):
  """_train_reference's future: the reference run's process, in a background thread."""
  with futures.ThreadPoolExecutor(1) as pool:  # leaving the block (end of the session) waits for it
    yield pool.submit(_train_reference, tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="session", autouse=True)
def _start_the_reference_run_early(request):
  """Starts the reference run with the session's first test when any selected test needs it, so that its
  process (~20 s, mostly single-threaded imports and compiles) runs alongside the modules before its first
  user (test_checkpoint) instead of in front of it."""
  if any("reference" in item.fixturenames for item in request.session.items):
    request.getfixturevalue("reference_started")


@pytest.fixture(scope="session")
def reference(reference_started):
  """An uninterrupted run: final parameters and its workdir."""
  tmp, proc = reference_started.result()
  assert proc.returncode == 0, proc.stderr[-4000:]
  return np.load(tmp / "final.npz"), tmp / "work"
