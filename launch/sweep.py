"""Runs a paper experiment grid and writes its mean +/- std table (Markdown and JSON).

  python launch/sweep.py --config=configs/covid19_diag.py --workdir=/runs/table6 --table=table6
  python launch/sweep.py --config=configs/sars_cov2_ct.py --workdir=/runs/table9 --table=table9
  python launch/sweep.py --config=configs/covid19_diag.py --workdir=/runs/table5 --table=table5 --seeds=0,1,2
  python launch/sweep.py --config=configs/covid19_diag.py --workdir=/runs/table4 --table=table4

Methods are model:loss pairs (on the config's backbone) or backbone:model:loss; fractions, seeds and folds default to the paper's
grid for the table. Rerunning skips finished runs and resumes the rest; --aggregate_only
rebuilds the table from saved runs without training.
"""

import sys

from dsn_saal_jax import cli

cli.setup(sys.argv)  # first: TensorFlow reads its log level once, when it loads; XLA its flags when JAX starts

# pylint: disable=wrong-import-position
from absl import app, flags

from dsn_saal_jax import sweep, train

FLAGS = flags.FLAGS
cli.define_config_flag("Base config file (configs/*.py[:variant]).")
flags.DEFINE_string("workdir", None, "Root directory: one sub-workdir per run, tables at the top.")
flags.DEFINE_enum("table", "table6", sorted(sweep.TABLE_DEFAULTS), "Paper table layout (and default grid).")
flags.DEFINE_list("methods", None, "model:loss or backbone:model:loss, e.g. baseline:ce,resnet50:dsn:ce.")
flags.DEFINE_list("covid_fractions", None, "COVID training fractions, e.g. 1,0.25,0.1.")
flags.DEFINE_list("seeds", None, "Seeds, e.g. 0,1,2.")
flags.DEFINE_list("folds", None, "Folds, e.g. 0,1,2,3,4 (sars_cov2_ct).")
flags.DEFINE_bool("aggregate_only", False, "Train nothing: rebuild the table from saved runs (error if any is missing).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  grid = dict(sweep.TABLE_DEFAULTS[FLAGS.table])
  if FLAGS.methods:
    grid["methods"] = [tuple(m.split(":")) for m in FLAGS.methods]
    for m in grid["methods"]:
      if len(m) not in (2, 3):
        cli.error(f"--methods entries are model:loss or backbone:model:loss, got {':'.join(m)!r}.")
  if FLAGS.covid_fractions:
    grid["covid_fractions"] = [float(f) for f in FLAGS.covid_fractions]
  if FLAGS.seeds:
    grid["seeds"] = [int(s) for s in FLAGS.seeds]
  if FLAGS.folds:
    grid["folds"] = [int(k) for k in FLAGS.folds]
  runs = sweep.plan(**grid)
  with cli.usage_errors():
    md, _ = sweep.run_sweep(FLAGS.config, FLAGS.workdir, runs, FLAGS.table,
                            None if FLAGS.aggregate_only else train.train_and_evaluate)
  print(open(md).read())


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
