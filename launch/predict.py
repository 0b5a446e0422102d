"""Classifies CT slices with a trained run: one CSV row per file, optional Grad-CAM overlays.

  python launch/predict.py --workdir=/tmp/run [--checkpoint=best|latest] [--cam=/tmp/cams] SLICES...
  python launch/predict.py --checkpoint=/tmp/run/best/120 --output=preds.csv folder/ slice.dcm

SLICES are PNG/JPEG/DICOM files or folders (searched recursively). They are
preprocessed as the run's training data (see dsn_saal_jax/predict.py); the
checkpoint carries what that takes. Checkpoints saved before it did need the
run's --config.

The CSV is written beside --output and renamed to it when every file is done,
so a file under that name is always complete; a rerun replaces a predictions
CSV this tool wrote. Any other existing --output is refused before anything is
read: a folder, one of the inputs, or a file that is not such a CSV (the easy
slip `--output a.dcm b.dcm` makes a.dcm the output). Long runs log files done,
rate and ETA on stderr.

Exit status: 0 all predicted, 1 some files failed (their rows say why; the
others are predicted), 2 usage error (no inputs, bad checkpoint, an --output
that is refused; nothing was written).
"""

import sys

from dsn_saal_jax import cli

cli.setup(sys.argv)  # first: TensorFlow reads its log level once, when it loads; XLA its flags when JAX starts

# pylint: disable=wrong-import-position
from absl import app, flags, logging

from dsn_saal_jax import checkpointing, predict
from dsn_saal_jax.cli import error as usage_error

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of the trained run.")
flags.DEFINE_string("checkpoint", "best", "With --workdir: best | latest. Without: a checkpoint directory "
                    "(WORKDIR/best/<step>, or WORKDIR/best for its newest step).")
cli.define_config_flag("Training config; only for checkpoints without an inference spec (saved before it "
                       "existed).")
flags.DEFINE_string("output", "predictions.csv", "CSV: path, prediction, prob_<class>..., error.")
flags.DEFINE_string("cam", None, "Folder for one Grad-CAM overlay PNG per file (never over a file it did not write).")
flags.DEFINE_integer("batch_size", 32, "Images per forward pass (the last batch is padded).")
flags.DEFINE_enum("eval_head", None, ["final", "mean"], "Head to predict with; default: the run's.")


def main(argv):
  inputs = argv[1:]
  if not inputs:
    usage_error("Give one or more CT slice files or folders after the flags.")
  if FLAGS.batch_size <= 0:
    usage_error(f"--batch_size must be positive, got {FLAGS.batch_size}.")
  if not FLAGS.workdir and FLAGS.checkpoint in predict.CHECKPOINT_DIRS:
    usage_error(f"--checkpoint={FLAGS.checkpoint} needs --workdir=RUN; or pass --checkpoint=PATH.")
  files, problems = predict.find_inputs(inputs)
  if not files:
    usage_error("No PNG, JPEG or DICOM files in the inputs:\n" + "\n".join(p.error for p in problems))
  try:
    predict.check_output(FLAGS.output, [*inputs, *files])  # before anything is loaded; checked again when writing
    if FLAGS.cam is not None:
      predict.check_cam_dir(FLAGS.cam, files, inputs)
  except predict.OutputError as e:
    usage_error(str(e))
  options = dict(config=FLAGS.config, batch_size=FLAGS.batch_size, eval_head=FLAGS.eval_head)
  try:
    if FLAGS.workdir:
      predictor = predict.Predictor.from_workdir(FLAGS.workdir, FLAGS.checkpoint, **options)
    else:
      predictor = predict.Predictor.from_checkpoint(FLAGS.checkpoint, **options)
  except (predict.CheckpointError, checkpointing.CheckpointDamagedError) as e:
    usage_error(str(e))
  logging.info("Predicting %d files with %s (%s head).", len(files), predictor.source, predictor.eval_head)
  try:
    predicted, failed = predict.write_predictions(predictor, files, FLAGS.output, FLAGS.cam, problems)
  except predict.OutputError as e:
    usage_error(str(e))
  print(f"{predicted} predicted, {failed} failed; CSV: {FLAGS.output}"
        + (f"; Grad-CAM overlays: {FLAGS.cam}" if FLAGS.cam else ""))
  sys.exit(cli.FAILED if failed else 0)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
