"""What every launch script shares: process setup, the config and multi-host flags, and how a run ends.

  cli.setup(sys.argv)            # first: the console policy and the host (XLA flag, TF, CPU kernels)
  cli.define_config_flag(...)    # --config, and cli.define_multihost_flags() for --distributed & co.
  app.run(main, flags_parser=cli.parse_flags)

Exit statuses, the same in every script: 0 done, 1 FAILED (a damaged checkpoint, files that failed, a
crash), 2 USAGE (a bad flag, config value, data folder or output: one `Error:` line with the fix, nothing
written), 143 PREEMPTED (SIGTERM; rerun to resume). Flags are defined by the calls, never when this module
is imported: tests/launch_batch.py runs several scripts in one process, each defining its flags afresh.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, NoReturn, Sequence

from absl import flags, logging

from dsn_saal_jax import config_lib, console, host

FAILED, USAGE, PREEMPTED = 1, 2, 143  # PREEMPTED = 128 + SIGTERM: schedulers see the run as interrupted
FLAGS = flags.FLAGS


def setup(argv: Sequence[str]) -> None:
  """The console policy (console.setup, which must run before TensorFlow loads), then `host.setup`."""
  console.setup(argv)
  host.setup()


def error(message: str, status: int = USAGE) -> NoReturn:
  print(f"Error: {message}", file=sys.stderr)
  sys.exit(status)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser for app.run, but a bad flag is a usage error (2) like any other, not absl's 1.

  The place for messages about flags and `--config.KEY` overrides that every launcher shares.
  """
  moved = config_lib.moved_flag_error(argv)  # before absl: ml_collections would fail with a bare AttributeError
  if moved:
    error(moved)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    error(f"{e}\nPass --helpshort for the flags.")
  except (AttributeError, KeyError) as e:  # ml_collections' answer to an override of a field the config lacks
    if not any(arg.startswith("--config.") for arg in argv):
      raise
    detail = e
    while isinstance(detail, Exception) and detail.args:  # AttributeError(KeyError(message))
      detail = detail.args[0]
    detail = " ".join(str(detail).split())
    error(f"A --config.KEY override names a field the config does not have: {detail}")


def define_config_flag(help_text: str) -> None:
  """--config=FILE[:variant] with --config.KEY=VALUE overrides; keys outside the schema are refused."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)


@contextlib.contextmanager
def usage_errors(*kinds: type[Exception]) -> Iterator[None]:
  """Turns ConfigError, DatasetError and `kinds` raised inside into one `Error:` line and exit status 2.

  The one place launchers map a config or input the run cannot use to a usage error: a check that
  applies to every config belongs here or in what it catches.
  """
  from dsn_saal_jax.data.builders import DatasetError  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  try:
    yield
  except (config_lib.ConfigError, DatasetError, *kinds) as e:
    error(str(e))


def define_multihost_flags() -> None:
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (TPU pod / SLURM auto-detection).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for explicit multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes, for explicit multi-process runs.")
  flags.DEFINE_integer("process_id", None, "This process's index, for explicit multi-process runs.")


def initialize_multihost() -> None:
  """jax.distributed.initialize() as the multi-host flags ask; nothing for a one-process run."""
  if FLAGS.distributed or FLAGS.coordinator_address:
    from dsn_saal_jax import runtime  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    runtime.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def run_job(job: Callable[[], object], *usage_kinds: type[Exception]) -> None:
  """Runs a training-like job (train, pretrain): preempted -> 143, damaged checkpoint -> 1, usage -> 2."""
  from dsn_saal_jax import checkpointing, runtime  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  try:
    with usage_errors(*usage_kinds):
      job()
  except runtime.Preempted as e:
    logging.warning("%s", e)
    sys.exit(PREEMPTED)
  except checkpointing.CheckpointDamagedError as e:
    error(str(e), FAILED)
