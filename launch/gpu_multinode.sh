#!/usr/bin/env bash
# One process per GPU host. Run this on every host with the same COORDINATOR (host:port of host 0),
# NUM_HOSTS and a distinct HOST_ID, e.g. from a SLURM step:
#   srun --nodes=2 --ntasks-per-node=1 launch/gpu_multinode.sh configs/sft_mesc.py /shared/runs/sft
# Each process sees its local GPUs; jax.distributed.initialize() joins them into one global mesh.
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir (shared filesystem)}; shift 2
coordinator=${COORDINATOR:-${SLURM_LAUNCH_NODE_IPADDR:-127.0.0.1}:12355}
num_hosts=${NUM_HOSTS:-${SLURM_NTASKS:-1}}
host_id=${HOST_ID:-${SLURM_PROCID:-0}}
exec python -m therapy_rl.main --config "$config" --workdir "$workdir" \
  --distributed --coordinator_address "$coordinator" --num_processes "$num_hosts" --process_id "$host_id" "$@"
