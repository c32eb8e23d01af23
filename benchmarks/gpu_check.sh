#!/usr/bin/env bash
# The GPU check (issue 18): on a fresh H100 / H200 machine with JAX (0.11) and Python 3.12 and no network, in
# about 8 minutes:
#   1. install what its image lacks from the wheels carried with the tree (wheels/, made by
#      benchmarks/gpu_wheels.sh) into /tmp/mlret-site;
#   2. the parity tests on the GPU: the random XLM-R / BERT encoders against transformers (tests/test_model_parity.py)
#      and packed-vs-padded XLM-R embeddings (tests/test_packing.py), float32 at full matmul precision (no TF32);
#      the real-MiniLM tests stay on the CPU (its 88 MB of weights do not travel);
#   3. the train-step benchmark: the XLM-R base architecture with random weights (transformers' init, seed 0: the
#      real weights are not available offline), bfloat16 compute, global batch 512, remat, lengths 64/256, one hard
#      negative, MLQA-R hybrid batches, with and without packing, each with XLA's attention and with cuDNN's fused
#      attention (config.model.attention=cudnn); target >= 50% MFU of the measured bf16 matmul peak;
#   4. its docs/benchmarks.md section, and every log, are copied to $OUT (the device tool brings them back).
#
# Prepare here (PyPI and the data at hand), then run there with both folders carried:
#     bash benchmarks/gpu_wheels.sh && bash benchmarks/gpu_assets.sh
#     bash benchmarks/gpu_check.sh                 # device tool: carry ["wheels", "gpu_assets"]
# Rehearse on a CPU (MiniLM at tiny sizes, XLA attention only, nothing written to docs/; checks that the wheel set
# installs for Python 3.12, the test selection and the benchmark's flags):
#     bash benchmarks/gpu_check.sh --dry-run
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MLRET_DATA_DIR=$PWD/gpu_assets/data MLRET_SHARED_DATA=$PWD/gpu_assets/data
export MLRET_MINILM_PATH=$PWD/gpu_assets/minilm-tokenizer
for need in wheels gpu_assets/data/mlqa-r gpu_assets/minilm-tokenizer; do
  [ -e "$need" ] || { echo "gpu_check: $need is missing; run benchmarks/gpu_wheels.sh and gpu_assets.sh" >&2; exit 2; }
done
start=$(date +%s)
stage() { echo "=== $1 ($(( $(date +%s) - start )) s in)"; }

stage "1. wheels"
if [ $DRY = 1 ]; then
  # Here the venv already has everything: check only that the carried set installs for the GPU's Python.
  platforms=()
  for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  python3 -m pip install -q --no-index --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" --target "$(mktemp -d)" wheels/*.whl || exit 1
  export JAX_PLATFORMS=cpu
  # MiniLM instead of the XLM-R base architecture: its weights + AdamW state (4.5 GB) are too much for a shared CPU.
  BENCH=(--models minilm --device cpu --batch 4 --query-len 32 --passage-len 64 --steps 1 --warmup 0 --attention xla)
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mlret-site \
      wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/mlret-site:$PWD JAX_PLATFORMS=cuda
  BENCH=(--models xlmr-base --device gpu --steps 5 --warmup 1 --attention xla,cudnn --packing-rows-multiple 32 --write)
fi
export PYTHONPATH=${PYTHONPATH:-}:$PWD
python3 -c "import jax, flax, grain, tensorflow_datasets, ml_collections, scann; print('jax', jax.__version__, \
jax.devices(), 'flax', flax.__version__, 'grain', grain.__version__)" 2>&1 | tee "$OUT/env.log" || exit 1
nvidia-smi >> "$OUT/env.log" 2>&1 || true

stage "1b. the GPU's target config (for mlret.compile's deviceless GPU compile on a CPU machine)"
# Issue 25 item 6: the GpuTargetConfigProto read from this GPU; commit it as benchmarks/gpu_specs/<name>.txtpb and
# `python -m mlret.compile --topology gpu:1x1xN --gpu_target_config` covers this GPU from then on, without one.
if [ $DRY = 0 ]; then
  python3 - "$OUT/gpu_target_config.txtpb" <<'PY' 2>&1 | tee -a "$OUT/env.log"
import datetime, sys
import jax
from jax._src.lib import _jax as xc
devices = jax.devices()
text = xc.get_topology_for_devices(devices).target_config
head = (f"# GpuTargetConfigProto read from {devices[0].device_kind} ({len(devices)} visible) on "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, by benchmarks/gpu_check.sh:\n"
        "# python -c \"import jax; from jax._src.lib import _jax as xc; "
        "print(xc.get_topology_for_devices(jax.devices()).target_config)\"\n")
open(sys.argv[1], "w").write(head + text)
print("target config of", devices[0].device_kind, "->", sys.argv[1], f"({len(text)} characters)")
PY
else
  echo "dry run: no GPU, no target config to read"
fi

stage "2. parity tests"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 180 python3 -m pytest -q -p no:cacheprovider \
    tests/test_model_parity.py tests/test_packing.py -k "random or xlmr" 2>&1 | tee "$OUT/parity.log"
parity=${PIPESTATUS[0]}

stage "3. train step, XLM-R base, with and without packing, XLA and cuDNN attention"
timeout 330 python3 benchmarks/train_step.py --packing both --no-torch "${BENCH[@]}" 2>&1 \
    | tee "$OUT/train_step.log"
bench=${PIPESTATUS[0]}

stage "4. results"
[ $DRY = 0 ] && cp docs/benchmarks.md "$OUT/benchmarks.md"
echo "parity tests rc=$parity, train-step benchmark rc=$bench, $(( $(date +%s) - start )) s" | tee "$OUT/summary.log"
[ "$parity" = 0 ] && [ "$bench" = 0 ]
