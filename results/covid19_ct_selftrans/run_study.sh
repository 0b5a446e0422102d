#!/bin/bash
# Self-Trans on COVID19-CT at the CPU budget of results/covid19_ct_cpu: does a SimCLR-pretrained start
# (configs/pretrain_covid19_ct.py, on the training split's slices only, labels unread) help where
# ImageNet weights are unavailable? Trains into $RUNS; finished runs are skipped, so rerunning resumes.
#   PYTHONPATH=$PWD RUNS=/work/studies/selftrans bash results/covid19_ct_selftrans/run_study.sh
# Arms, seeds 0-2, official split, configs/covid19_ct_cpu.py unchanged otherwise:
#   ssl_init/baseline_ce, ssl_init/dsn_saal: fine-tuned from the seed's pretrained backbone;
#   augment/dsn_saal: random init with config.augment=true.
# The random-init VGG-16 + CE and DSN-SAAL arms are results/covid19_ct_cpu/runs/main's
# (baseline_ce, dsn_saal, covid1_seed{0,1,2}_fold0): the same config and seeds.
set -euo pipefail
RUNS=${RUNS:-/work/studies/selftrans}
export DSN_SAAL_COVID19_CT=${DSN_SAAL_COVID19_CT:-/work/shared/data/covid19_ct}
CFG=configs/covid19_ct_cpu.py
DATA="--config.data_dir=$RUNS/tfds"  # a private TFDS copy: other jobs may rebuild the default one
for seed in 0 1 2; do
  python launch/pretrain.py --config=configs/pretrain_covid19_ct.py:seed=$seed $DATA --workdir=$RUNS/ssl/seed$seed
  python launch/sweep.py --config=$CFG $DATA --config.init_checkpoint=$RUNS/ssl/seed$seed/backbone \
    --workdir=$RUNS/ssl_init --table=table8 --methods=baseline:ce,dsn:saal --seeds=$seed
  python launch/sweep.py --config=$CFG $DATA --config.augment=true --workdir=$RUNS/augment --table=table8 \
    --methods=dsn:saal --seeds=$seed
done
python launch/sweep.py --aggregate_only --config=$CFG --workdir=$RUNS/ssl_init --table=table8 \
  --methods=baseline:ce,dsn:saal --seeds=0,1,2
python launch/sweep.py --aggregate_only --config=$CFG --config.augment=true --workdir=$RUNS/augment \
  --table=table8 --methods=dsn:saal --seeds=0,1,2
