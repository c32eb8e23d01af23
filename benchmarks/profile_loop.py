"""Where the training loop's main thread spends its time, from a py-spy profile of `mlret.train`.

    pip install py-spy   # a profiler, not a dependency of mlret
    py-spy record --idle -r 10 -f raw -o /tmp/train.raw -- python -m mlret.train --config configs/smoke.py \
        --workdir /tmp/prof --config.train.steps=12 --config.train.log_every=1 \
        --config.checkpoint.every=1000 --config.mesh.simulated_cpu_devices=0
    python benchmarks/profile_loop.py /tmp/train.raw

py-spy samples every thread's Python stack (`--idle`: blocked threads too); this script keeps the main
thread's samples inside `mlret.train.train` and sorts each into what the loop was doing: waiting for the
devices (the `device_get` of the previous step's metrics, or the host copy a checkpoint save makes of the
state, both of which return when the step is done), waiting for the next batch (`next` on the Grain iterator),
building the global batch and dispatching the step, tracing + compiling the step, checkpoint / logging work,
and setup (model loading, state init, imports). A loop with no host overhead spends all its steady-state time
waiting for the devices.
"""

from __future__ import annotations

import argparse
import collections
import re

CATEGORIES = [  # (name, test on the frames below train()), first match wins
    ("trace + compile the step",
     lambda fs: any(re.search(r"\b(compile|trace_to_jaxpr|lower)\b", f) for f in fs)),
    ("wait for the devices (metrics device_get / checkpoint copy)",
     lambda fs: any("device_get" in f or "transfer_arrays_to_host" in f for f in fs)),
    ("wait for the next batch (Grain iterator next)",
     lambda fs: any("__next__" in f or "record_next_duration" in f for f in fs[:3])),
    ("setup (imports, model, state, iterator, evaluators)",
     lambda fs: any(re.search(r"load_dual_encoder|build_train_step|Trainer\.(init_state|abstract_state)|"
                              r"make_train_iterator|_find_and_load|_handle_fromlist|"
                              r"Checkpointer\.(__init__|restore)|MetricWriter\.__init__|build_evaluators|"
                              r"make_mesh",
                              f) for f in fs)),
    ("global batch (host -> device) + step dispatch",
     lambda fs: any("global_batch" in f or "pjit" in f for f in fs)),
    ("checkpoint save / close (host work)", lambda fs: any("Checkpointer" in f for f in fs)),
    ("logging (metrics.jsonl, TensorBoard, progress)",
     lambda fs: any(re.search(r"MetricLog\.metrics|MetricWriter\.write", f) for f in fs)),
]


def breakdown(path: str) -> tuple[collections.Counter, int]:
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        at = [i for i, f in enumerate(frames) if re.match(r"train \(.*mlret/train\.py:\d+\)", f)]
        if not at:
            continue
        below = frames[at[-1] + 1:]
        name = next((c for c, test in CATEGORIES if test(below)), "other")
        counts[name] += int(n)
        total += int(n)
    return counts, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw", help="py-spy record -f raw output")
    p.add_argument("--rate", type=float, default=10.0, help="the -r rate given to py-spy (samples/s)")
    args = p.parse_args()
    counts, total = breakdown(args.raw)
    if not total:
        raise SystemExit(f"{args.raw}: no main-thread samples inside mlret.train.train (was it a py-spy "
                         "-f raw profile of python -m mlret.train?)")
    loop = {k: v for k, v in counts.items() if not k.startswith(("setup", "trace"))}
    loop_total = sum(loop.values())
    print(f"{total} samples in train() ({total / args.rate:.0f} s); steady-state loop: {loop_total} "
          "samples\n")
    print("| activity | samples | share of train() | share of the loop |")
    print("|---|---|---|---|")
    for name, n in counts.most_common():
        share = f"{n / loop_total:.1%}" if name in loop else "-"
        print(f"| {name} | {n} | {n / total:.1%} | {share} |")


if __name__ == "__main__":
    main()
