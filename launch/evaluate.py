"""Evaluates a trained workdir: metrics.json and PNG plots into WORKDIR/report/SPLIT_CHECKPOINT/.

  python launch/evaluate.py --config=configs/default.py --workdir=/tmp/run --split=test --checkpoint=best

Use the same --config (and overrides) as for training; a checkpoint of a
different model is refused.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from dsn_saal_jax import checkpointing, metrics, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file used for training.", lock_config=True)
flags.DEFINE_string("workdir", None, "Workdir of the trained run.")
flags.DEFINE_string("split", "test", "Split to evaluate (test, validation).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "best = by the validation metric; latest = last saved.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (TPU pod / SLURM).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if FLAGS.distributed:
    train.initialize_distributed()
  try:
    result = train.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.split, FLAGS.checkpoint)
  except checkpointing.CheckpointDamagedError as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps({k: result[k] for k in metrics.SUMMARY_KEYS}, indent=2))


if __name__ == "__main__":
  app.run(main)
