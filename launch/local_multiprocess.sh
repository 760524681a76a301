#!/usr/bin/env bash
# Multi-host rehearsal on one machine: N CPU processes (gloo collectives), each with D virtual devices,
# form one global mesh of N*D devices. Exercises per-host data sharding and multi-host checkpointing.
#   launch/local_multiprocess.sh 2 2 configs/quickstart.py /tmp/mp_run --config.max_steps=20
#   launch/local_multiprocess.sh 2 2 configs/eval_quickstart.py /tmp/mp_eval --config.checkpoint=/tmp/mp_run
set -euo pipefail
nproc_=${1:?number of processes}; devices=${2:?devices per process}; config=${3:?config}; workdir=${4:?workdir}
shift 4
port=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < nproc_; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
    python -m therapy_rl.main --config "$config" --workdir "$workdir" --cpu_collectives=gloo \
    --distributed --coordinator_address "127.0.0.1:$port" --num_processes "$nproc_" --process_id "$i" "$@" \
    > "$workdir.proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
