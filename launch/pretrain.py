"""Self-supervised pretraining: `python launch/pretrain.py --config=configs/pretrain.py --workdir=/tmp/ssl`.

Writes `<workdir>/backbone`, which `launch/train.py --config.init_checkpoint=<workdir>/backbone` starts from.
Data: config.dataset's training split, or `--config.pretrain.folder=DIR` of unlabeled PNG/JPEG/DICOM slices.
Rerunning the same command resumes (after SIGTERM too); multi-host flags as launch/train.py's.
Exit status as launch/train.py's: 0 done, 1 a damaged checkpoint or a crash, 2 usage error (one `Error:`
line), 143 preempted.
"""

import sys

from dsn_saal_jax import console

console.setup(sys.argv)  # first: TensorFlow reads its log level once, when it loads

# pylint: disable=wrong-import-position
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dsn_saal_jax import checkpointing, config_lib, pretrain, runtime
from dsn_saal_jax.data.builders import DatasetError

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
USAGE_EXIT_CODE = 2  # as launch/train.py's: a config value or data folder the run cannot use


def main(argv):
  del argv
  if FLAGS.distributed or FLAGS.coordinator_address:
    runtime.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.debug("Process %d of %d; config:\n%s", jax.process_index(), jax.process_count(), FLAGS.config)
  try:
    pretrain.pretrain_and_save(FLAGS.config, FLAGS.workdir)
  except runtime.Preempted as e:
    logging.warning("%s", e)
    sys.exit(PREEMPTED_EXIT_CODE)
  except checkpointing.CheckpointDamagedError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(FAILED_EXIT_CODE)
  except (config_lib.ConfigError, DatasetError) as e:  # PretrainInputError is a ConfigError
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
