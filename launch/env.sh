# shellcheck shell=bash
# launch/env.sh: the multi-host environment of every mlret launcher, in one place.
#
# Sourced by launch/gpu.sh, launch/slurm.sbatch (in the batch step and again inside every Slurm task) and
# launch/tpu_pod.sh (on the launching machine; TPU workers get the resulting variables inline in their command).
# Sourcing it defines variables and functions and runs nothing. What lives here and nowhere else:
#   - the XLA / NCCL / libtpu flags for collectives,
#   - how a process finds the coordinator, its process id and its GPUs (the `--coordinator_address`,
#     `--num_processes`, `--process_id` flags of `python -m mlret.train`, and JAX_LOCAL_DEVICE_IDS),
#   - the dry-run printer, so that what a dry run prints is the very argv a real run executes.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    # Empty arrays under `set -u` and `read -d ''` need bash 4.4; macOS ships 3.2 as /bin/bash.
    printf 'launch/env.sh: error: bash %s is too old; the launchers need bash >= 4.4 (macOS: brew install bash)\n' \
        "$BASH_VERSION" >&2
    exit 2
fi

# The module every launcher runs; the same on every host.
MLRET_TRAIN_MODULE=mlret.train

# XLA flags for GPU collectives. The latency-hiding scheduler lets XLA overlap the gradient all-reduce and the
# passage-embedding all-gather with compute (NVIDIA JAX-Toolbox sets it by default). Unknown flags abort XLA at
# start-up, so the set is small and tests/test_launch.py checks that the installed jaxlib accepts it.
# MLRET_XLA_FLAGS and a pre-set XLA_FLAGS are appended after these, so a user's value wins.
MLRET_GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"

# libtpu flags for async collectives under data parallelism, as MaxText sets them for v4/v5 pods. Opt-in
# (MLRET_TPU_COLLECTIVE_FLAGS=1): libtpu aborts on a flag its version does not know, and they were not run on a
# TPU here. A user's LIBTPU_INIT_ARGS is appended and wins.
MLRET_TPU_LIBTPU_ARGS="--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true \
--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true"

# Filled by the functions below: the environment assignments (K=V) and the argv of one training process.
MLRET_ENV=()
MLRET_ARGV=()

mlret_die() {
    printf '%s: error: %s\n' "${MLRET_LAUNCHER:-launch/env.sh}" "$*" >&2
    exit 2
}

mlret_note() {
    printf '%s: %s\n' "${MLRET_LAUNCHER:-launch/env.sh}" "$*" >&2
}

# True when the launcher should print instead of run: DRY_RUN=1 (or any value but 0/empty), or --dry-run,
# which the launchers turn into DRY_RUN=1.
mlret_dry_run() {
    [[ -n ${DRY_RUN:-} && ${DRY_RUN} != 0 ]]
}

# mlret_print_cmd LABEL WORD...: one line, "[LABEL] " and the words quoted so that a shell reads them back
# as the same argv (copy-paste runs it).
mlret_print_cmd() {
    local label=$1
    shift
    printf '[%s]' "$label"
    printf ' %q' "$@"
    printf '\n'
}

# mlret_check_train_args ARG...: the arguments for `python -m mlret.train` must name a config file that exists
# (relative to the current directory, which the launchers set to the repository root). A `:arg` suffix
# (ml_collections' `--config=configs/x.py:arg`) is not part of the path.
mlret_check_train_args() {
    local config="" prev=""
    local a
    for a in "$@"; do
        case $a in
            --config=*) config=${a#--config=} ;;
            --coordinator_address* | --num_processes* | --process_id*)
                mlret_die "$a: the launcher sets --coordinator_address, --num_processes and --process_id itself" ;;
        esac
        if [[ $prev == --config ]]; then config=$a; fi
        prev=$a
    done
    [[ -n $config ]] || mlret_die "no --config: pass the training arguments, e.g. --config configs/demo.py --workdir DIR"
    [[ -f ${config%%:*} ]] || mlret_die "--config ${config}: ${config%%:*} is not a file under $(pwd)"
}

# mlret_gpu_env: reset MLRET_ENV to what every GPU process gets.
mlret_gpu_env() {
    local xla=$MLRET_GPU_XLA_FLAGS
    [[ -n ${XLA_FLAGS:-} ]] && xla+=" $XLA_FLAGS"
    [[ -n ${MLRET_XLA_FLAGS:-} ]] && xla+=" $MLRET_XLA_FLAGS"
    MLRET_ENV=("XLA_FLAGS=$xla" "NCCL_DEBUG=${NCCL_DEBUG:-WARN}")
}

# mlret_tpu_env: reset MLRET_ENV to what every TPU worker gets; the MLRET_* variables that configs read are
# forwarded, since a worker's login shell does not have the launching machine's environment.
mlret_tpu_env() {
    # jax finds the workers itself (no --num_processes): ask mlret.train for its dead-peer supervisor explicitly.
    MLRET_ENV=(MLRET_SUPERVISE=1)
    local libtpu=""
    if [[ ${MLRET_TPU_COLLECTIVE_FLAGS:-0} != 0 ]]; then libtpu=$MLRET_TPU_LIBTPU_ARGS; fi
    [[ -n ${LIBTPU_INIT_ARGS:-} ]] && libtpu+="${libtpu:+ }$LIBTPU_INIT_ARGS"
    [[ -n $libtpu ]] && MLRET_ENV+=("LIBTPU_INIT_ARGS=$libtpu")
    local v
    for v in MLRET_MODEL MLRET_DATA_DIR; do
        [[ -n ${!v:-} ]] && MLRET_ENV+=("$v=${!v}")
    done
    return 0
}

# Exit statuses of `python -m mlret.train` that a restart cures (docs/robustness.md): 75 storage failed or stalled,
# 76 a peer process of a multi-process run died (mlret/supervise.py), and death by a signal other than SIGTERM /
# SIGINT (128+n: SIGKILL from the OOM killer, SIGABRT). Not: 0 done, 143 / 130 stopped on purpose (a preemption
# takes the machine), 2 a config mistake, 3 a damaged checkpoint with on_damaged="stop", 1 an error of the program.
mlret_restartable() {
    local rc=$1
    ((rc == 75 || rc == 76 || (rc > 128 && rc != 130 && rc != 143)))
}

# mlret_run_restarting MAX CMD...: run CMD; while it ends with a restartable status (mlret_restartable), run it
# again, at most MAX more times (MLRET_RESTART_DELAY seconds apart, default 10). Every restart resumes from the
# last complete checkpoint. Returns the last status. With MLRET_PID_FILE set, CMD's pid is written there at each
# start (tpu_pod.sh --stop signals it); SIGTERM / SIGINT to this shell are passed on to CMD and end the loop.
mlret_run_restarting() {
    local max=$1 n=0 rc pid stopping=0
    shift
    while :; do
        "$@" &
        pid=$!
        [[ -n ${MLRET_PID_FILE:-} ]] && echo "$pid" >"$MLRET_PID_FILE"
        trap 'stopping=1; kill -TERM "$pid" 2>/dev/null' TERM INT
        rc=0
        wait "$pid" || rc=$?
        while kill -0 "$pid" 2>/dev/null; do # wait returns early when a trapped signal arrives
            rc=0
            wait "$pid" || rc=$?
        done
        trap - TERM INT
        if ((stopping)) || ! mlret_restartable "$rc"; then
            return "$rc"
        fi
        if ((n >= max)); then
            mlret_note "exit status $rc after $n restart(s): the limit (MLRET_MAX_RESTARTS=$max) is reached; giving up"
            return "$rc"
        fi
        n=$((n + 1))
        mlret_note "exit status $rc: restart $n of at most $max in ${MLRET_RESTART_DELAY:-10} s (resumes from the last complete checkpoint)"
        sleep "${MLRET_RESTART_DELAY:-10}"
    done
}

# mlret_train_argv PYTHON ARG...: MLRET_ARGV = the training command with the given arguments.
mlret_train_argv() {
    local python=$1
    shift
    MLRET_ARGV=("$python" -m "$MLRET_TRAIN_MODULE" "$@")
}

# mlret_multihost_flags COORDINATOR NUM_PROCESSES PROCESS_ID: append the flags that make mlret.train call
# jax.distributed.initialize with explicit values (auto-detection is only used on TPU VMs).
mlret_multihost_flags() {
    MLRET_ARGV+=("--coordinator_address=$1" "--num_processes=$2" "--process_id=$3")
}

# mlret_slurm_port: the coordinator port. MLRET_PORT if set; else derived from the job id in 61440-65535 (above
# Linux's ephemeral range, and different for two jobs sharing a node), the rule jax's own Slurm detection uses.
mlret_slurm_port() {
    if [[ -n ${MLRET_PORT:-} ]]; then
        printf '%s\n' "$MLRET_PORT"
    else
        printf '%s\n' $((61440 + ${SLURM_JOB_ID:?SLURM_JOB_ID is not set: not inside a Slurm job} % 4096))
    fi
}

# mlret_slurm_task ARG...: run (or, in a dry run, print) one Slurm task's training process. Reads the Slurm task
# environment (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NUM_NODES, CUDA_VISIBLE_DEVICES or
# SLURM_GPUS_ON_NODE) and MLRET_COORDINATOR (exported by launch/slurm.sbatch).
#   - one task per node: the process drives every GPU of its node. jax's Slurm detection would otherwise
#     restrict it to GPU SLURM_LOCALID (= 0), so JAX_LOCAL_DEVICE_IDS lists them all.
#   - several tasks per node: one GPU per process. Each task sees exactly one GPU (CUDA_VISIBLE_DEVICES), so that
#     XLA and NCCL open no context on the others, and that GPU is local device 0.
mlret_slurm_task() {
    local pid=${SLURM_PROCID:?SLURM_PROCID is not set: run this inside srun}
    local local_id=${SLURM_LOCALID:?SLURM_LOCALID is not set: run this inside srun}
    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?neither SLURM_JOB_NUM_NODES nor SLURM_NNODES is set}}
    local ntasks=${SLURM_NTASKS:-$nodes}
    local coordinator=${MLRET_COORDINATOR:?MLRET_COORDINATOR is not set: launch/slurm.sbatch exports it}
    ((ntasks % nodes == 0)) ||
        mlret_die "SLURM_NTASKS=$ntasks over $nodes nodes is uneven: use --ntasks-per-node (1 or the GPUs per node)"
    local per_node=$((ntasks / nodes))
    local gpus=()
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"; fi

    mlret_gpu_env
    if ((per_node == 1)); then
        local n=${#gpus[@]}
        if ((n == 0)); then n=${SLURM_GPUS_ON_NODE:-0}; fi
        if ((n == 0)) && command -v nvidia-smi >/dev/null; then n=$(nvidia-smi --list-gpus | wc -l); fi
        ((n > 0)) || mlret_die "task $pid: cannot count this node's GPUs (no CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE or nvidia-smi): request them with --gpus-per-node"
        local ids
        ids=$(seq -s, 0 $((n - 1)))
        MLRET_ENV+=("JAX_LOCAL_DEVICE_IDS=$ids")
    else
        local gpu
        if ((${#gpus[@]} == 1)); then
            gpu=${gpus[0]} # Slurm already bound one GPU to this task (--gpus-per-task=1 / --gpu-bind)
        elif ((${#gpus[@]} > 1)); then
            ((local_id < ${#gpus[@]})) ||
                mlret_die "task $pid: local id $local_id but only ${#gpus[@]} GPUs ($CUDA_VISIBLE_DEVICES): --ntasks-per-node must equal the GPUs per node"
            gpu=${gpus[local_id]}
        else
            gpu=$local_id
        fi
        MLRET_ENV+=("CUDA_VISIBLE_DEVICES=$gpu" "JAX_LOCAL_DEVICE_IDS=0")
    fi
    mlret_train_argv "${PYTHON:-python}" "$@"
    mlret_multihost_flags "$coordinator" "$ntasks" "$pid"
    if mlret_dry_run; then
        mlret_print_cmd "process $pid on ${SLURMD_NODENAME:-$(hostname)}" env "${MLRET_ENV[@]}" "${MLRET_ARGV[@]}"
    else
        # exec: the training process itself receives Slurm's SIGTERM (preemption, time limit) and checkpoints.
        exec env "${MLRET_ENV[@]}" "${MLRET_ARGV[@]}"
    fi
}
