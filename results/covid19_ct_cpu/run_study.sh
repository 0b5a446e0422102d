#!/bin/bash
# Trains every run of the COVID19-CT CPU study into $RUNS and writes the tables there.
# Finished runs are skipped, so rerunning resumes; results/covid19_ct_cpu/collect.sh then
# copies the small per-run files here and regenerates tables and plots from them.
set -euo pipefail
RUNS=${RUNS:-/tmp/dsn_saal_study}
CFG=configs/covid19_ct_cpu.py
for seed in 0 1 2; do
  # The four methods on the official split (paper Table 8's question: does DSN / SAAL help?).
  python launch/sweep.py --config=$CFG --workdir=$RUNS/main --table=table5 \
    --methods=baseline:ce,dsn:ce,baseline:saal,dsn:saal --seeds=$seed
  # SAAL exactly as Eq. 10 (unnormalized class weights).
  python launch/sweep.py --config=$CFG --config.saal.normalize_weights=false --workdir=$RUNS/unnormalized \
    --table=table5 --methods=dsn:saal --seeds=$seed
done
for seed in 0 1 2; do
  # The imbalance protocol (paper Table 6): 25% and 10% of the COVID training slices kept.
  python launch/sweep.py --config=$CFG --workdir=$RUNS/main --table=table6 \
    --methods=baseline:ce,dsn:saal --covid_fractions=1,0.25,0.1 --seeds=$seed
done
