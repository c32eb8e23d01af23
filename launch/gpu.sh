#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# launch/gpu.sh: train on the GPUs of this machine.
#
#   launch/gpu.sh [--dry-run] [--per-gpu] [--gpus 0,1,...] [--port P] [--] TRAIN_ARGS...
#
# TRAIN_ARGS go to `python -m mlret.train` unchanged, e.g. `--config configs/x.py --workdir runs/x
# --config.data.global_batch=256`. Default: one process drives every visible GPU (JAX's default; the mesh spans
# them all). --per-gpu: one process per GPU, each seeing only its own GPU (CUDA_VISIBLE_DEVICES), joined by
# jax.distributed through a coordinator on 127.0.0.1:P; if one process fails the others are stopped, and a
# SIGTERM to this script is passed on to every process so that each checkpoints.
#
# Options:  --dry-run (or DRY_RUN=1)  print each process's command and environment, run nothing
#           --gpus LIST    the GPUs to use (default: CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists)
#           --port P       coordinator port for --per-gpu (default: MLRET_PORT, else 12355)
# Environment: PYTHON (default python), MLRET_XLA_FLAGS (extra XLA flags); the rest is in launch/env.sh.
set -euo pipefail
MLRET_LAUNCHER=launch/gpu.sh
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=env.sh
source "$root/launch/env.sh"

per_gpu=0
gpu_list=""
port=${MLRET_PORT:-12355}
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --per-gpu) per_gpu=1 ;;
        --gpus) gpu_list=${2:?--gpus needs a list such as 0,1}; shift ;;
        --gpus=*) gpu_list=${1#--gpus=} ;;
        --port) port=${2:?--port needs a number}; shift ;;
        --port=*) port=${1#--port=} ;;
        --) shift; break ;;
        *) break ;;
    esac
    shift
done
cd "$root"
mlret_check_train_args "$@"

if [[ -z $gpu_list ]]; then
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        gpu_list=$CUDA_VISIBLE_DEVICES
    elif ((per_gpu)); then
        command -v nvidia-smi >/dev/null ||
            mlret_die "--per-gpu: no nvidia-smi to list the GPUs; pass --gpus 0,1,... or set CUDA_VISIBLE_DEVICES"
        gpu_list=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
    fi
fi

# Inside a Slurm allocation (salloc, srun --pty) jax.distributed would detect Slurm and join a job-wide
# cluster; this launcher is for this machine only, so its processes do not see the Slurm job.
unset_slurm=()
if [[ -n ${SLURM_JOB_ID:-} ]]; then unset_slurm=(-u SLURM_JOB_ID); fi

mlret_gpu_env
if ((!per_gpu)); then
    [[ -n $gpu_list ]] && MLRET_ENV+=("CUDA_VISIBLE_DEVICES=$gpu_list")
    mlret_train_argv "${PYTHON:-python}" "$@"
    if mlret_dry_run; then
        mlret_print_cmd "process 0 of 1" env "${unset_slurm[@]}" "${MLRET_ENV[@]}" "${MLRET_ARGV[@]}"
        exit 0
    fi
    exec env "${unset_slurm[@]}" "${MLRET_ENV[@]}" "${MLRET_ARGV[@]}"
fi

IFS=, read -r -a gpus <<<"$gpu_list"
n=${#gpus[@]}
((n > 0)) || mlret_die "--per-gpu: no GPUs found; pass --gpus 0,1,..."
base_env=("${MLRET_ENV[@]}")
pids=()
stop_all() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
}
# Preemption or Ctrl-C reaches this script: pass SIGTERM on so that every process checkpoints, then keep waiting.
trap stop_all TERM INT
for ((i = 0; i < n; i++)); do
    MLRET_ENV=("${base_env[@]}" "CUDA_VISIBLE_DEVICES=${gpus[i]}" "JAX_LOCAL_DEVICE_IDS=0")
    mlret_train_argv "${PYTHON:-python}" "$@"
    mlret_multihost_flags "127.0.0.1:$port" "$n" "$i"
    if mlret_dry_run; then
        mlret_print_cmd "process $i of $n" env "${unset_slurm[@]}" "${MLRET_ENV[@]}" "${MLRET_ARGV[@]}"
    else
        env "${unset_slurm[@]}" "${MLRET_ENV[@]}" "${MLRET_ARGV[@]}" &
        pids+=($!)
    fi
done
mlret_dry_run && exit 0

# The first process to fail stops the rest: a jax.distributed peer whose partner died hangs for minutes.
# (Polling rather than `wait -n`, which needs bash >= 5.1 to say which process ended.)
status=0
running=("${pids[@]}")
while ((${#running[@]})); do
    still=()
    for p in "${running[@]}"; do
        if kill -0 "$p" 2>/dev/null; then still+=("$p"); continue; fi
        rc=0
        wait "$p" || rc=$?
        if ((rc != 0 && status == 0)); then
            status=$rc
            mlret_note "a training process (pid $p) exited with status $rc; stopping the others"
            stop_all
        fi
    done
    running=("${still[@]}")
    if ((${#running[@]})); then sleep 1; fi
done
exit "$status"
