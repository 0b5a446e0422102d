"""Self-supervised pretraining: `python launch/pretrain.py --config=configs/pretrain.py --workdir=/tmp/ssl`.

Writes `<workdir>/backbone`, which `launch/train.py --config.init_checkpoint=<workdir>/backbone` starts from.
Data: config.dataset's training split, or `--config.pretrain.folder=DIR` of unlabeled PNG/JPEG/DICOM slices.
Rerunning the same command resumes (after SIGTERM too); multi-host flags as launch/train.py's.
"""

import sys

from dsn_saal_jax import console

console.setup(sys.argv)  # first: TensorFlow reads its log level once, when it loads

# pylint: disable=wrong-import-position
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dsn_saal_jax import checkpointing, pretrain, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/pretrain*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and the backbone go here; rerun to resume.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (TPU pod / SLURM auto-detection).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for explicit multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for explicit multi-process runs.")
flags.DEFINE_integer("process_id", None, "This process's index, for explicit multi-process runs.")
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_CODE = 143
FAILED_EXIT_CODE = 1


def main(argv):
  del argv
  if FLAGS.distributed or FLAGS.coordinator_address:
    train.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.debug("Process %d of %d; config:\n%s", jax.process_index(), jax.process_count(), FLAGS.config)
  try:
    pretrain.pretrain_and_save(FLAGS.config, FLAGS.workdir)
  except train.Preempted as e:
    logging.warning("%s", e)
    sys.exit(PREEMPTED_EXIT_CODE)
  except (pretrain.PretrainInputError, checkpointing.CheckpointDamagedError) as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(FAILED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
