#!/bin/bash
# Issue 16's study: does learning SAAL's alpha and beta on a held-out meta set (update_rule=meta) make
# the loss adapt to imbalance, where SGD on the training loss (joint, the paper's) does not?
# COVID19-CT, the covid19_ct_cpu protocol (DSN backbone), official split and 10% of the COVID slices,
# seeds 0-2. Every arm with update_rule=meta trains on the training split minus its meta set (10%,
# stratified); the others train on all of it, the data a user has. Finished runs are skipped.
#   RUNS=/tmp/dsn_saal_meta results/covid19_ct_meta/run_study.sh
set -euo pipefail
RUNS=${RUNS:-/tmp/dsn_saal_meta}
CFG=configs/covid19_ct_cpu.py
GRID="--table=table6 --covid_fractions=1,0.1"
for seed in 0 1 2; do
  # Fixed-weight comparators: CE, class-balanced CE (Cui et al.), logit-adjusted CE (Menon et al.).
  python launch/sweep.py --config=$CFG --workdir=$RUNS/fixed $GRID --methods=dsn:ce,dsn:cb,dsn:la --seeds=$seed
  # DSN-SAAL trained as the paper trains it (joint), with the paper's sigmoid alpha and with alpha on a
  # log10 scale (1 - alpha = 10^-r; a sigmoid alpha has no gradient at init, see docs/design.md).
  python launch/sweep.py --config=$CFG --workdir=$RUNS/joint_sigmoid $GRID --methods=dsn:saal --seeds=$seed
  python launch/sweep.py --config=$CFG --config.saal.alpha_param=log10 --workdir=$RUNS/joint_log10 $GRID \
    --methods=dsn:saal --seeds=$seed
  # The bilevel (meta) update of alpha and beta, with either parametrization, and Meta-Weight-Net.
  for alpha in sigmoid log10; do
    python launch/sweep.py --config=$CFG --config.saal.update_rule=meta --config.saal.alpha_param=$alpha \
      --workdir=$RUNS/meta_$alpha $GRID --methods=dsn:saal --seeds=$seed
  done
  python launch/sweep.py --config=$CFG --config.saal.update_rule=meta --workdir=$RUNS/meta_mwn $GRID \
    --methods=dsn:mwn --seeds=$seed
done
