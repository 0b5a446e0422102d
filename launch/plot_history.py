"""Plots alpha, beta_i, the class weights and validation F1 over training for groups of SAAL runs.

  python launch/plot_history.py --out=saal.png \\
    --group="normalized=/runs/main/dsn_saal/covid1_seed*_fold0" \\
    --group="Eq. 10 as written=/runs/unnormalized/dsn_saal/covid1_seed*_fold0"

Each --group is LABEL=GLOB over run workdirs (their history.jsonl); one column per group.
"""

import glob
import sys

from dsn_saal_jax import cli

cli.setup(sys.argv)

# pylint: disable=wrong-import-position
from absl import app, flags

from dsn_saal_jax import reporting, runtime

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("group", None, "LABEL=GLOB of run workdirs; repeat for more columns.")
flags.DEFINE_string("out", None, "Output PNG path.")
flags.mark_flags_as_required(["group", "out"])


def main(argv):
  del argv
  groups = {}
  for spec in FLAGS.group:
    label, sep, pattern = spec.partition("=")
    if not sep:
      cli.error(f"--group must be LABEL=GLOB, got {spec!r}.")
    workdirs = sorted(glob.glob(pattern))
    if not workdirs:
      cli.error(f"--group {label!r}: no run workdir matches {pattern!r}.")
    groups[label] = [runtime.read_history(w) for w in workdirs]
  reporting.plot_saal_history(groups, FLAGS.out)
  print(f"Wrote {FLAGS.out}: " + ", ".join(f"{k} ({len(v)} runs)" for k, v in groups.items()))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
