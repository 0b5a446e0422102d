"""Trains (or resumes) one run: `python launch/train.py --config=configs/default.py --workdir=/tmp/run`.

Config overrides: `--config=configs/covid19_diag.py:baseline,ce` or `--config.learning_rate=0.01`.
Multi-host: add `--distributed` (auto-detects Cloud TPU pods and SLURM) or give
`--coordinator_address`, `--num_processes` and `--process_id` explicitly.
The console shows one line per epoch; `--verbosity=1` adds every logged step
and the libraries' INFO lines (see dsn_saal_jax/console.py).
Exit status (dsn_saal_jax/cli.py): 0 trained, 1 failed (a damaged checkpoint; a crash), 2 usage error
(a bad flag, a config value, init checkpoint or data folder the run cannot use, a report folder holding
a user's files: one `Error:` line with the fix), 143 preempted (SIGTERM; rerun to resume).
"""

import sys

from dsn_saal_jax import cli

cli.setup(sys.argv)  # first: TensorFlow reads its log level once, when it loads; XLA its flags when JAX starts

# pylint: disable=wrong-import-position
import jax
from absl import app, flags, logging

from dsn_saal_jax import reporting, train

FLAGS = flags.FLAGS
cli.define_config_flag("Config file (configs/*.py[:variant]).")
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and reports go here; rerun to resume.")
cli.define_multihost_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cli.initialize_multihost()
  logging.debug("Process %d of %d; config:\n%s", jax.process_index(), jax.process_count(), FLAGS.config)
  cli.run_job(lambda: train.train_and_evaluate(FLAGS.config, FLAGS.workdir), reporting.ReportDirError)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
