#!/usr/bin/env bash
# Create a Cloud TPU VM, copy this repo to every worker, install it and run one config on all workers.
#
#   launch/tpu_vm.sh create   NAME ZONE ACCELERATOR   # e.g. my-tpu us-central2-b v4-32
#   launch/tpu_vm.sh copy     NAME ZONE               # rsync the working tree to every worker
#   launch/tpu_vm.sh install  NAME ZONE               # pip install -e . with jax[tpu] on every worker
#   launch/tpu_vm.sh run      NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_vm.sh delete   NAME ZONE
#
# On a multi-host slice every worker runs the same command; `--distributed` makes each call
# jax.distributed.initialize(), which discovers the coordinator from the TPU metadata. WORKDIR should be a
# gs:// path (orbax writes it from every host) or a shared filesystem; each host reads only its rows of
# every global batch (jax.process_index()).
set -euo pipefail
cmd=${1:?usage: tpu_vm.sh create|copy|install|run|delete NAME ZONE ...}
name=${2:?TPU name}
zone=${3:?zone}
shift 3
remote_dir=therapy_rl
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }
case "$cmd" in
  create)
    accel=${1:?accelerator type, e.g. v4-8}
    gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" \
      --version "${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}" ;;
  copy)
    here=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$here" --exclude=.git --exclude='*.egg-info' -czf /tmp/therapy_rl_src.tgz .
    gcloud compute tpus tpu-vm scp /tmp/therapy_rl_src.tgz "$name":/tmp/ --zone "$zone" --worker=all
    ssh_all "mkdir -p $remote_dir && tar -C $remote_dir -xzf /tmp/therapy_rl_src.tgz" ;;
  install)
    ssh_all "cd $remote_dir && python3 -m pip install -U pip && python3 -m pip install -e . 'jax[tpu]' \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html" ;;
  run)
    config=${1:?config file}; workdir=${2:?workdir}; shift 2
    ssh_all "cd $remote_dir && python3 -m therapy_rl.main --distributed --config $config --workdir $workdir $*" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
