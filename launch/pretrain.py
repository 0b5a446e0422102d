"""Self-supervised pretraining: `python launch/pretrain.py --config=configs/pretrain.py --workdir=/tmp/ssl`.

Writes `<workdir>/backbone`, which `launch/train.py --config.init_checkpoint=<workdir>/backbone` starts from.
Data: config.dataset's training split, or `--config.pretrain.folder=DIR` of unlabeled PNG/JPEG/DICOM slices.
Rerunning the same command resumes (after SIGTERM too); multi-host flags as launch/train.py's.
Exit status as launch/train.py's: 0 done, 1 a damaged checkpoint or a crash, 2 usage error (one `Error:`
line), 143 preempted.
"""

import sys

from dsn_saal_jax import cli

cli.setup(sys.argv)  # first: TensorFlow reads its log level once, when it loads; XLA its flags when JAX starts

# pylint: disable=wrong-import-position
import jax
from absl import app, flags, logging

from dsn_saal_jax import pretrain

FLAGS = flags.FLAGS
cli.define_config_flag("Config file (configs/pretrain*.py[:variant]).")
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and the backbone go here; rerun to resume.")
cli.define_multihost_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cli.initialize_multihost()
  logging.debug("Process %d of %d; config:\n%s", jax.process_index(), jax.process_count(), FLAGS.config)
  cli.run_job(lambda: pretrain.pretrain_and_save(FLAGS.config, FLAGS.workdir))  # PretrainInputError: a ConfigError


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
