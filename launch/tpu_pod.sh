#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: one process per TPU host, joined by jax.distributed.
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [CONFIG] [extra launch/train.py flags...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b /mnt/shared/runs/diag configs/covid19_diag.py --config.batch_size=64
#
# WORKDIR and config.data_dir must be one directory every host sees (e.g. a Filestore/NFS
# mount): process 0 builds the TFDS data there and all processes read their own shard of it,
# and Orbax writes one checkpoint jointly. jax.distributed.initialize() needs no arguments on
# TPU VMs. Rerunning the same command resumes from the latest checkpoint in WORKDIR.
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}; WORKDIR=${3:?shared workdir}; CONFIG=${4:-configs/covid19_diag.py}
shift $(( $# < 4 ? $# : 4 ))
REPO_DIR=dsn_saal_jax

# Same code on every host.
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all "$(dirname "$0")/.." "$TPU_NAME":"$REPO_DIR"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e; cd $REPO_DIR
  python3 -m pip install -q -e '.[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python3 launch/train.py --distributed --config=$CONFIG --workdir=$WORKDIR $*"
