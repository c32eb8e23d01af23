#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# launch/tpu_pod.sh: set up every worker of a Cloud TPU VM (a single host or a pod slice) and train on all.
#
#   launch/tpu_pod.sh --tpu NAME [--zone Z] [--project P] [options] [--] TRAIN_ARGS...
#
# First, on this machine, `python -m mlret.compile --topology T TRAIN_ARGS` compiles the run's train step for the
# pod's topology with the XLA:TPU compiler (libtpu, no TPU): a config that cannot fit in HBM or that the compiler
# rejects stops here, before anything reaches the pod (--skip-compile-check skips it). Then three steps, each one
# `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...`, so every worker does the same thing at once:
#   1. code: the local working tree (tracked and untracked-but-not-ignored files, `git ls-files`) is packed and
#      copied to every worker (`tpu-vm scp --worker=all`), or, with --repo URL, every worker clones URL and checks
#      out one commit (--ref; default: the local HEAD commit, which must be pushed), never a moving branch;
#   2. install: a virtualenv `.venv` in the remote directory, `pip install -e ".[tpu]"` (jax[tpu] brings the
#      libtpu that matches its jaxlib);
#   3. train: `python -m mlret.train TRAIN_ARGS` on every worker; jax.distributed finds the other workers and the
#      process ids itself on a TPU VM, so no coordinator flags are passed.
# TRAIN_ARGS are the same on every worker; paths in them are relative to the remote directory. The workdir must
# be storage every worker reaches (gs://... or a shared mount): orbax writes one checkpoint from all hosts.
#
# Options:
#   --dry-run (or DRY_RUN=1)  print the local commands and what every worker runs; run nothing
#   --tpu NAME (or TPU_NAME)  --zone Z (or ZONE; else gcloud's compute/zone)  --project P (or PROJECT)
#   --worker W          workers to target (default: all; 0 or 1,3 for debugging)
#   --remote-dir DIR    where the code goes on each worker, relative to the home directory (default: mlret)
#   --repo URL [--ref REF]   ship the code by git clone instead of copying the local tree
#   --python PY         the worker's Python >= 3.11 that creates the virtualenv (default: python3)
#   --topology T (or MLRET_TPU_TOPOLOGY)  the pod's TPU topology for the compile check, e.g. v5e:4x4, v4:2x2x2
#   --num-slices N      slices of a multi-slice run (default 1; the config's mesh.dcn_data must match)
#   --skip-compile-check   do not compile locally first (the local Python is $PYTHON, default python, with libtpu)
#   --skip-setup        only train (code and virtualenv already on the workers)
#   --setup-only        only ship the code and install
#   --detach            train under nohup, logs in DIR/train.log on each worker; the ssh session may end
#   --stop              send SIGTERM to the training process on every worker (it checkpoints and exits)
#   --max-restarts N    restart training on a worker whose run ended with a status a restart cures (75 storage,
#                       76 a dead peer, killed by a signal: launch/env.sh mlret_restartable), at most N times
#                       (default: MLRET_MAX_RESTARTS, else 3; 0: never); every worker restarts, so the pod resumes
#                       together from the last complete checkpoint
# Environment: MLRET_TPU_COLLECTIVE_FLAGS=1 and LIBTPU_INIT_ARGS (see launch/env.sh); MLRET_MODEL and
# MLRET_DATA_DIR are forwarded to the workers.
set -euo pipefail
MLRET_LAUNCHER=launch/tpu_pod.sh
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=env.sh
source "$root/launch/env.sh"

tpu=${TPU_NAME:-}
zone=${ZONE:-}
project=${PROJECT:-}
worker=all
remote_dir=mlret
repo=""
ref=""
python=python3
topology=${MLRET_TPU_TOPOLOGY:-}
num_slices=1
compile_check=1
do_setup=1
do_train=1
detach=0
stop=0
max_restarts=${MLRET_MAX_RESTARTS:-3}
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --tpu) tpu=${2:?--tpu needs a name}; shift ;;
        --zone) zone=${2:?--zone needs a zone}; shift ;;
        --project) project=${2:?--project needs a project id}; shift ;;
        --worker) worker=${2:?--worker needs all or a list}; shift ;;
        --remote-dir) remote_dir=${2:?--remote-dir needs a path}; shift ;;
        --repo) repo=${2:?--repo needs a git URL}; shift ;;
        --ref) ref=${2:?--ref needs a commit or tag}; shift ;;
        --python) python=${2:?--python needs an interpreter}; shift ;;
        --topology) topology=${2:?--topology needs a topology such as v5e:4x4}; shift ;;
        --num-slices) num_slices=${2:?--num-slices needs a number}; shift ;;
        --skip-compile-check) compile_check=0 ;;
        --skip-setup) do_setup=0 ;;
        --setup-only) do_train=0 ;;
        --detach) detach=1 ;;
        --max-restarts) max_restarts=${2:?--max-restarts needs a number}; shift ;;
        --max-restarts=*) max_restarts=${1#--max-restarts=} ;;
        --stop) stop=1 do_setup=0 do_train=0 ;;
        --) shift; break ;;
        *) break ;;
    esac
    shift
done
[[ -n $tpu ]] || mlret_die "no TPU name: pass --tpu NAME (or set TPU_NAME)"
cd "$root"
if ((do_train)); then mlret_check_train_args "$@"; fi

gcloud_flags=()
[[ -n $zone ]] && gcloud_flags+=("--zone=$zone")
[[ -n $project ]] && gcloud_flags+=("--project=$project")
gcloud_flags+=("--worker=$worker")

# run_local WORD...: a command on this machine (printed in a dry run).
run_local() {
    if mlret_dry_run; then mlret_print_cmd local "$@"; else "$@"; fi
}

# on_workers SCRIPT: run the bash SCRIPT on the targeted workers (in their home directories), all at once.
on_workers() {
    run_local gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" --command="$1"
    if mlret_dry_run; then printf '[workers %s run] %s\n' "$worker" "$1"; fi
}

q() { printf '%q' "$1"; }

# The compile check: the run's train step compiled here for the pod's topology; nothing is shipped if it fails.
if ((do_train && compile_check)); then
    [[ -n $topology ]] || mlret_die "no --topology: pass the pod's topology (e.g. --topology v5e:4x4) for the local \
compile check, or --skip-compile-check"
    if ! run_local "${PYTHON:-python}" -m mlret.compile --topology "$topology" --num_slices "$num_slices" --no_eval "$@"
    then
        mlret_die "the compile check for $topology failed (above): nothing was copied to the pod; fix the config, or \
pass --skip-compile-check"
    fi
fi

dir=$(q "$remote_dir")

if ((stop)); then
    on_workers "kill -TERM \$(cat $dir/.mlret-train.pid)"
    exit 0
fi

if ((do_setup)); then
    if [[ -n $repo ]]; then
        if [[ -z $ref ]]; then
            ref=$(git -C "$root" rev-parse HEAD 2>/dev/null) ||
                mlret_die "--repo without --ref and $root is no git checkout: pass --ref COMMIT"
            mlret_note "workers check out $ref (the local HEAD): it must be pushed to $repo"
        fi
        on_workers "set -e; if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin; \
else git clone --quiet $(q "$repo") $dir; fi; git -C $dir checkout --quiet --detach $(q "$ref")"
    else
        git -C "$root" rev-parse --git-dir >/dev/null 2>&1 ||
            mlret_die "$root is no git checkout, so the files to copy are unknown: use --repo URL"
        if [[ -n $(git -C "$root" status --porcelain --untracked-files=no) ]]; then
            mlret_note "copying uncommitted changes of $root (the working tree, not HEAD)"
        fi
        if mlret_dry_run; then
            tmp=${TMPDIR:-/tmp}/mlret-src.XXXXXX # mktemp's template: a real run fills in the Xs
        else
            tmp=$(mktemp -d "${TMPDIR:-/tmp}/mlret-src.XXXXXX")
            trap 'rm -rf "$tmp"' EXIT
            # The files a checkout has (tracked, and untracked but not ignored), minus tracked files deleted
            # in the working tree; NUL-separated for tar -T.
            while IFS= read -r -d '' f; do
                if [[ -e $root/$f ]]; then printf '%s\0' "$f"; fi
            done < <(git -C "$root" ls-files -z --cached --others --exclude-standard) >"$tmp/files"
        fi
        tarball=$tmp/mlret-src.tar.gz
        run_local tar -C "$root" --null -T "$tmp/files" -czf "$tarball"
        run_local gcloud compute tpus tpu-vm scp "$tarball" "$tpu:mlret-src.tar.gz" "${gcloud_flags[@]}"
        on_workers "set -e; mkdir -p $dir; tar -xzf mlret-src.tar.gz -C $dir; rm -f mlret-src.tar.gz"
    fi
    py=$(q "$python")
    on_workers "set -e; cd $dir; \
command -v $py >/dev/null || { echo \"\$(hostname): no $py; install Python >= 3.11 (sudo apt-get install -y python3.11 python3.11-venv) and pass --python python3.11\" >&2; exit 1; }; \
$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo \"\$(hostname): $py is older than 3.11, which mlret needs; pass --python python3.11\" >&2; exit 1; }; \
[ -x .venv/bin/python ] || $py -m venv .venv; \
.venv/bin/python -m pip install --quiet --upgrade pip; \
.venv/bin/python -m pip install --quiet -e '.[tpu]'"
fi

if ((do_train)); then
    mlret_tpu_env
    mlret_train_argv .venv/bin/python "$@"
    env_argv=(env "${MLRET_ENV[@]}" "${MLRET_ARGV[@]}")
    train=$(printf '%q ' "${env_argv[@]}")
    train=${train% }
    # The restart loop of launch/env.sh (shipped with the code) writes the training process's pid to the pid file
    # at every start, so that --stop signals exactly it.
    [[ $max_restarts =~ ^[0-9]+$ ]] || mlret_die "--max-restarts $max_restarts: a whole number (0: never restart)"
    looped="source launch/env.sh && MLRET_LAUNCHER=$(q "$MLRET_LAUNCHER") MLRET_PID_FILE=.mlret-train.pid \
mlret_run_restarting $max_restarts $train"
    if ((detach)); then
        on_workers "cd $dir && nohup bash -c $(q "$looped") > train.log 2>&1 < /dev/null &"
    else
        on_workers "cd $dir && $looped"
    fi
fi
