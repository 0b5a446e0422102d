#!/bin/bash
# Regenerates results/covid19_ct_cpu from saved runs, without training.
#   RUNS=/tmp/dsn_saal_study results/covid19_ct_cpu/collect.sh
# 1. Copies each run's small files (config.json, history.jsonl, report/test/metrics.json) from
#    $RUNS (run_study.sh's output; skipped if absent) into results/covid19_ct_cpu/runs/.
# 2. Rebuilds the tables with the project's sweep command: every run there is finished, so the
#    sweep trains nothing and only aggregates (table8, table6 and table4 .md/.json under runs/), each
#    table, printed as well, ending with its arms' paired differences (same seed).
# 3. Redraws the alpha/beta plots from the runs' history.jsonl.
set -euo pipefail
RUNS=${RUNS:-/tmp/dsn_saal_study}
OUT=results/covid19_ct_cpu
CFG=configs/covid19_ct_cpu.py
if [ -d "$RUNS" ]; then
  (cd "$RUNS" && find . \( -name config.json -o -name history.jsonl -o -path '*/report/test/metrics.json' \) \
    -print) | while read -r f; do
    mkdir -p "$OUT/runs/$(dirname "$f")"
    cp "$RUNS/$f" "$OUT/runs/$f"
  done
fi
python launch/sweep.py --aggregate_only --config=$CFG --workdir=$OUT/runs/main --table=table8 \
  --methods=baseline:ce,dsn:ce,baseline:saal,dsn:saal --seeds=0,1,2
python launch/sweep.py --aggregate_only --config=$CFG --workdir=$OUT/runs/main --table=table6 \
  --methods=baseline:ce,dsn:saal --covid_fractions=1,0.25,0.1 --seeds=0,1,2
python launch/sweep.py --aggregate_only --config=$CFG --config.loss_kwargs.saal.normalize_weights=false --workdir=$OUT/runs/unnormalized \
  --table=table8 --methods=dsn:saal --seeds=0,1,2
# Table 4: baseline vs DSN (CE) per backbone. VGG16-BN's rows are the main study's runs; the others
# are narrowed to a quarter of torchvision's width (run_study.sh). Table 8's columns for the same runs.
T4="resnet50:baseline:ce,resnet50:dsn:ce,densenet169:baseline:ce,densenet169:dsn:ce"
for table in table4 table8; do
  python launch/sweep.py --aggregate_only --config=$CFG --config.model.width_scale=0.25 --config.learning_rate=0.003 \
    --workdir=$OUT/runs/table4 \
    --table=$table --methods=$T4 --seeds=0,1,2
done
python launch/sweep.py --aggregate_only --config=$CFG --workdir=$OUT/runs/main --table=table4 \
  --methods=baseline:ce,dsn:ce --seeds=0,1,2
python launch/plot_history.py --out=$OUT/saal_alpha_beta.png \
  --group="normalized w_n (default)=$OUT/runs/main/dsn_saal/covid1_seed*_fold0" \
  --group="Eq. 10 as written=$OUT/runs/unnormalized/dsn_saal/covid1_seed*_fold0"
python launch/plot_history.py --out=$OUT/saal_alpha_beta_imbalanced.png \
  --group="100% COVID=$OUT/runs/main/dsn_saal/covid1_seed*_fold0" \
  --group="25% COVID=$OUT/runs/main/dsn_saal/covid0.25_seed*_fold0" \
  --group="10% COVID=$OUT/runs/main/dsn_saal/covid0.1_seed*_fold0"
