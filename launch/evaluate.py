"""Evaluates a trained workdir on a split of its dataset, or on any labeled folder of CT slices.

  python launch/evaluate.py --config=configs/default.py --workdir=/tmp/run --split=test --checkpoint=best
  python launch/evaluate.py --workdir=/tmp/run --data=/data/hospital_b [--class_map=Healthy:non_covid,Covid:covid]

With --config (the one used for training, with its overrides) the report of
SPLIT goes to WORKDIR/report/SPLIT_CHECKPOINT/; a checkpoint of a different
model is refused. With --data the checkpoint's inference spec is all it needs
(no config, no dataset build): FOLDER is <class>/[<case>/]<slices> or
{train,val,test}/<class>/..., every slice is evaluated (--split picks one split
folder), and the report, plus predictions.csv with a row per file, goes to
--out (default WORKDIR/report/data_<folder>[_<split>]_<checkpoint>/). Folder
names must be the run's class names unless --class_map renames them.

A report folder is replaced on a rerun only while it holds just the files the
report wrote, unchanged (its manifest.json lists them with their sha256). So
--out is refused, before anything is read or written, when it is an existing
file, a folder holding anything else, is or holds or lies inside the folder
evaluated, is or holds the run's own folders (checkpoints/, best/, ...), or
is a split's report (training's report/test/, which sweeps read).

Exit status with --data: 0 every slice evaluated, 1 some files unreadable
(their CSV rows say why; the report covers the rest) or a damaged checkpoint,
2 usage error (bad flags, folder, class map or --out; nothing was written).
"""

import os
import sys

from dsn_saal_jax import cli

cli.setup(sys.argv)  # first: TensorFlow reads its log level once, when it loads; XLA its flags when JAX starts

# pylint: disable=wrong-import-position
from absl import app, flags, logging

from dsn_saal_jax import checkpointing, folder_eval, metrics, predict, reporting, train
from dsn_saal_jax.cli import error

FLAGS = flags.FLAGS
cli.define_config_flag("Config file used for training. With --data: only for checkpoints without an inference "
                       "spec (saved before it existed).")
flags.DEFINE_string("workdir", None, "Workdir of the trained run.")
flags.DEFINE_string("split", None, "Split to evaluate: test (default) or validation; with --data, one split "
                    "folder (train, val, test) of FOLDER, default every slice.")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "best = by the validation metric; latest = last saved.")
flags.DEFINE_string("data", None, "A labeled folder of CT slices to evaluate on instead of the run's dataset.")
flags.DEFINE_string("class_map", None, "With --data: FOLDER:CLASS,... when folder names are not the run's classes.")
flags.DEFINE_string("out", None, "With --data: report folder (default WORKDIR/report/data_<folder>_<checkpoint>).")
flags.DEFINE_integer("batch_size", 32, "With --data: images per forward pass (the last batch is padded).")
flags.DEFINE_integer("gradcam_per_class", 4, "With --data: slices of each class in the Grad-CAM grid.")
cli.define_multihost_flags()
flags.mark_flags_as_required(["workdir"])


def evaluate_data() -> None:
  """--data: the checkpoint's inference spec and the folder, nothing of the training setup."""
  if FLAGS.distributed or FLAGS.coordinator_address:
    error("--data evaluates in one process; drop --distributed and --coordinator_address.")
  if FLAGS.split is not None and FLAGS.split not in folder_eval.SPLITS:
    error(f"--split={FLAGS.split}: with --data pick one of {', '.join(folder_eval.SPLITS)}, or drop it to "
          "evaluate every slice.")
  if FLAGS.batch_size <= 0 or FLAGS.gradcam_per_class <= 0:
    error(f"--batch_size and --gradcam_per_class must be positive, got {FLAGS.batch_size} and "
          f"{FLAGS.gradcam_per_class}.")
  try:
    class_map = folder_eval.parse_class_map(FLAGS.class_map) if FLAGS.class_map is not None else None
  except ValueError as e:
    error(str(e))
  out = FLAGS.out or folder_eval.default_out_dir(FLAGS.workdir, FLAGS.data, FLAGS.checkpoint, FLAGS.split)
  try:
    folder_eval.check_out_dir(out, FLAGS.data, FLAGS.workdir)  # before any work; checked again when writing
    predictor = predict.Predictor.from_workdir(FLAGS.workdir, FLAGS.checkpoint, config=FLAGS.config,
                                               batch_size=FLAGS.batch_size)
    logging.info("Evaluating %s on %s (%s head).", predictor.source, FLAGS.data, predictor.eval_head)
    result = folder_eval.evaluate_folder(
        predictor, FLAGS.data, out, class_map=class_map, split=FLAGS.split,
        gradcam_per_class=FLAGS.gradcam_per_class,
        extra={"checkpoint": FLAGS.checkpoint, "checkpoint_step": int(os.path.basename(predictor.source))})
  except checkpointing.CheckpointDamagedError as e:
    error(str(e), cli.FAILED)
  except (predict.CheckpointError, folder_eval.DatasetError, reporting.ReportDirError) as e:
    error(str(e))
  print(metrics.dumps({k: result[k] for k in metrics.SUMMARY_KEYS}, indent=2))
  print(f"{result['num_examples']} evaluated, {result['num_unreadable']} unreadable, {result['num_skipped']} "
        f"skipped (not images); report and predictions.csv: {out}")
  sys.exit(cli.FAILED if result["num_unreadable"] else 0)


def main(argv):
  if argv[1:]:
    error(f"Unexpected arguments {argv[1:]}; every input is a flag (--data=FOLDER for a folder).")
  if FLAGS.data is not None:
    evaluate_data()
  if FLAGS.config is None:
    error("Pass --data=FOLDER to evaluate on a labeled folder, or --config=<the training config> to evaluate a "
          "split of the run's dataset.")
  for name in ("class_map", "out", "batch_size", "gradcam_per_class"):
    if FLAGS[name].present:
      error(f"--{name} goes with --data=FOLDER.")
  cli.initialize_multihost()
  split = FLAGS.split or "test"
  try:
    with cli.usage_errors(reporting.ReportDirError):
      reporting.check_report_dir(os.path.join(FLAGS.workdir, "report", f"{split}_{FLAGS.checkpoint}"))
      result = train.evaluate(FLAGS.config, FLAGS.workdir, split, FLAGS.checkpoint)
  except checkpointing.CheckpointDamagedError as e:
    error(str(e), cli.FAILED)
  print(metrics.dumps({k: result[k] for k in metrics.SUMMARY_KEYS}, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
