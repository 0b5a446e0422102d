"""Trains (or resumes) one run: `python launch/train.py --config=configs/default.py --workdir=/tmp/run`.

Config overrides: `--config=configs/covid19_diag.py:baseline,ce` or `--config.learning_rate=0.01`.
Multi-host: add `--distributed` (auto-detects Cloud TPU pods and SLURM) or give
`--coordinator_address`, `--num_processes` and `--process_id` explicitly.
The console shows one line per epoch; `--verbosity=1` adds every logged step
and the libraries' INFO lines (see dsn_saal_jax/console.py).
Exit status: 0 trained, 1 failed (a damaged checkpoint; a crash), 2 usage error
(a config value or data folder the run cannot use, a report folder holding a
user's files: one `Error:` line with the fix), 143 preempted (SIGTERM; rerun to resume).
"""

import sys

from dsn_saal_jax import console

console.setup(sys.argv)  # first: TensorFlow reads its log level once, when it loads

# pylint: disable=wrong-import-position
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dsn_saal_jax import checkpointing, config_lib, reporting, runtime, train
from dsn_saal_jax.data.builders import DatasetError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and reports go here; rerun to resume.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (TPU pod / SLURM auto-detection).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for explicit multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for explicit multi-process runs.")
flags.DEFINE_integer("process_id", None, "This process's index, for explicit multi-process runs.")
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: schedulers see the run as interrupted, not done.
FAILED_EXIT_CODE = 1
USAGE_EXIT_CODE = 2  # as predict.py's and evaluate.py's: the run was asked for something it cannot do


def main(argv):
  del argv
  if FLAGS.distributed or FLAGS.coordinator_address:
    runtime.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.debug("Process %d of %d; config:\n%s", jax.process_index(), jax.process_count(), FLAGS.config)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except runtime.Preempted as e:
    logging.warning("%s", e)
    sys.exit(PREEMPTED_EXIT_CODE)
  except checkpointing.CheckpointDamagedError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(FAILED_EXIT_CODE)
  except (config_lib.ConfigError, DatasetError, reporting.ReportDirError) as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
