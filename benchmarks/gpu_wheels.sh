#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on a fresh GPU machine (Python 3.12, x86-64 manylinux,
# JAX preinstalled, no network there) into wheels/ (gitignored), on a machine with PyPI access:
#
#     bash benchmarks/gpu_wheels.sh            # then carry wheels/ with the tree (the device tool's `carry`)
#
# Only what the GPU image lacks (grain, tensorflow-datasets, array-record, ml-collections, scann and their
# missing dependencies: the image list in the device notes, checked against each wheel's Requires-Dist), plus flax / optax / orbax-checkpoint at the versions CI tests, so the GPU runs the same
# library code. --no-deps: every wheel is named here, one version each. Sdist-only packages (promise) are built
# into pure-Python wheels here. The folder must stay under the device tool's 64 MiB carry limit (with the tree):
# the script prints its size and fails above 56 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
out=wheels
mkdir -p "$out"
binary=(grain==0.2.18 array-record==0.8.6 tensorflow-datasets==4.9.10 ml-collections==1.1.0 scann==1.4.2
        flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 dm-tree==0.1.10 immutabledict==4.3.1
        simple-parsing==0.1.9 docstring-parser==0.18.0 tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2
        portpicker==1.6.0 googleapis-common-protos==1.76.0)
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$out" "${binary[@]}"
python3 -m pip wheel --no-deps -w "$out" promise==2.3
mib=$(du -sm "$out" | cut -f1)
echo "$out: $(ls "$out" | wc -l) wheels, ${mib} MiB"
if [ "$mib" -gt 56 ]; then echo "wheels/ is over 56 MiB: it and the tree would not fit the 64 MiB carry" >&2; exit 1; fi
