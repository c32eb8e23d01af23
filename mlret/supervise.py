"""A dead peer of a multi-process run as one line and its own exit status (docs/robustness.md, "A dead worker").

jax's coordination service is what notices a dead process: every process sends it heartbeats, and
`jax.distributed.initialize(heartbeat_timeout_seconds=config.runtime.peer_timeout_s)` sets how long a silent one
is given. When a process dies, the service tells every other process, whose jax client then ends it at once from
a C++ thread: `LOG(QFATAL)`, "Terminating process because the JAX distributed service detected fatal errors",
a C++ stack trace and SIGABRT (status 134), wherever its Python code was waiting (a collective, a checkpoint
barrier, an evaluation). When process 0 dies, the service dies with it and the others end within about a
second. That exit cannot be caught inside the process (jaxlib's `missed_heartbeat_callback` cannot be given a
Python function: converting its `absl::Status` throws `std::bad_cast`, measured with jax 0.10.2), so
`python -m mlret.train` of a multi-process run replaces itself (`os.execv`, same pid) with this small parent
process (no jax imported), whose child is the training process: the child's stderr passes through the parent,
which withholds jax's report and stack trace (shown with `--verbose`) and, when the child ends that way, prints

    mlret.train: process 1 of 2 lost a peer: jax.distributed reported ... ; exiting with status 76 ...

and exits with `EXIT_PEER` (76, EX_PROTOCOL). Everything else passes through unchanged: the child's output,
its exit status, SIGTERM (forwarded: preemption saves a checkpoint); SIGINT reaches the child from the terminal
itself. The child dies with the parent (`PR_SET_PDEATHSIG`, Linux), so `kill -9` of the parent leaves no orphan.

Supervised: runs given `--num_processes` > 1, or any run with `MLRET_SUPERVISE=1` (launch/tpu_pod.sh, where jax
finds the workers itself); `MLRET_SUPERVISE=0` turns it off.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

EXIT_PEER = 76  # EX_PROTOCOL: a peer process of a multi-process run died; restart them all to resume
_CHILD = "MLRET_SUPERVISED_CHILD"
HOLD_S = 1.0  # how late the child's stderr lines are passed on (see `run`)
# A dead peer shows as jax's coordination-service report (absl/glog lines, "E1206 20:46:22.184820 9474
# coordination_service.cc:1549] ...") and, where the main thread waited in a CPU collective, gloo's own error.
# A peer killed between two messages of a CPU collective can also leave gloo's TCP pair reading the next
# message in place of the one it expected; gloo then aborts ("terminate called after throwing an instance of
# 'gloo::EnforceNotMet' ... [enforce fail at .../gloo/transport/tcp/pair.cc:459] ... Received data size doesn't match
# expected size"), before jax's report comes (seen in CI: the survivor aborted 0.15 s after the kill). Any abort
# from gloo's TCP transport is read as a lost peer; a true collective mismatch would then be reported as one too,
# with gloo's own words in the line, and the launchers' restarts end after MLRET_MAX_RESTARTS.
_PEER_LOST = re.compile(rb"^[EFW]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (coordination_service\S*|client\.h|client\.cc|"
                        rb"preemption_sync_manager\.cc):\d+\]|Gloo \S+ failed: .*(Connection reset by peer|"
                        rb"Connection closed by peer|Broken pipe)|^terminate called after throwing an instance of "
                        rb"'gloo::|\[enforce fail at \S*gloo/transport/tcp/")
_FATAL = b"Terminating process because the JAX distributed service detected fatal errors"


def wanted(argv: list[str], environ: os._Environ[str] | dict[str, str] = os.environ) -> bool:
    """Whether `python -m mlret.train argv` should run as a supervised child (see the module docstring)."""
    if environ.get(_CHILD):
        return False
    mode = environ.get("MLRET_SUPERVISE", "")
    if mode in ("0", "1"):
        return mode == "1"
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--num_processes=") else (
            argv[i + 1] if a == "--num_processes" and i + 1 < len(argv) else None)
        if value is not None:
            try:
                return int(value) > 1
            except ValueError:
                return False  # the child's flag parser says what is wrong with it
    return False


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent dies (Linux; elsewhere the child outlives a killed
    parent and ends when its peers do)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _jax_status(withheld: list[bytes]) -> str:
    """The status jax's fatal line carried, on one line ('UNAVAILABLE: The following tasks are unhealthy (stopped
    sending heartbeats): 1'), or the first withheld line."""
    text = b"".join(withheld).decode(errors="replace")
    i = text.find("absl::Status: ")
    if i < 0:  # no jax report (yet): gloo's own words, else the first line that showed the dead peer
        what = [x for x in withheld if b"what():" in x and b"gloo" in x]
        first = what or [x for x in withheld if _PEER_LOST.search(x)] or withheld[-1:]
        if not first:
            return "no details"
        status = first[0].decode(errors="replace").split("what():", 1)[-1].split("] ", 1)[-1].strip()
        return status if len(status) <= 300 else status[:297] + "..."
    parts = []
    for line in text[i + len("absl::Status: "):].splitlines():
        line = line.strip()
        if not line or line.startswith(("The tasks have crashed", "RPC:", "***", "@", "Additional GRPC")):
            break
        parts.append(line)
    status = re.sub(r" ?\[type\.googleapis\.com/[^\]]*\]", "", " ".join(parts))
    return status if len(status) <= 300 else status[:297] + "..."


def _process_label(argv: list[str]) -> str:
    ids = {k: a.split("=", 1)[1] for a in argv for k in ("--process_id", "--num_processes") if a.startswith(k + "=")}
    if len(ids) == 2:
        return f"process {ids['--process_id']} of {ids['--num_processes']}"
    return "this process"


def become_supervisor() -> None:
    """Replace this process (same pid: launchers' pid files and signals still reach it) with the light
    `python -m mlret.supervise` (no jax), which runs this command line again as its child."""
    sys.stdout.flush(), sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "mlret.supervise", "--", sys.executable, *sys.orig_argv[1:]])


def run(cmd: list[str]) -> int:
    """Run `cmd` (`python [options] -m mlret.train ARGS`) as the supervised child and return the exit status
    for this process: the child's own, or `EXIT_PEER` when jax ended it because a peer died.

    The child's stderr reaches this process's stderr `HOLD_S` late: when a dead peer shows (jax's report, or the
    collective's own error, which may come a moment before it), the lines of that moment are withheld with it
    (shown with --verbose; appended to a local workdir's train.log)."""
    argv = cmd[cmd.index("mlret.train") + 1:] if "mlret.train" in cmd else cmd
    verbose = "--verbose" in argv or "--verbose=true" in argv
    child = subprocess.Popen(cmd, stderr=subprocess.PIPE, env={**os.environ, _CHILD: "1"},
                             preexec_fn=_die_with_parent)
    signal.signal(signal.SIGTERM, lambda sig, frame: child.send_signal(sig))  # preemption: the child checkpoints
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends Ctrl-C to the child too (same group)
    lines: queue.Queue[bytes | None] = queue.Queue()
    assert child.stderr is not None

    def read() -> None:
        for x in iter(child.stderr.readline, b""):
            lines.put(x)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    out = sys.stderr.buffer
    held: collections.deque[tuple[float, bytes]] = collections.deque()
    withheld: list[bytes] = []
    ended = False
    while not ended:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            line = b""
        if line is None:
            ended = True
        elif line:
            if withheld or _PEER_LOST.search(line):
                withheld.extend(text for _, text in held)  # the moment before the report, too
                held.clear()
                withheld.append(line)
            else:
                held.append((time.monotonic(), line))
        while held and (ended or time.monotonic() - held[0][0] >= HOLD_S):
            out.write(held.popleft()[1])
            out.flush()
    code = child.wait()
    fatal = any(_FATAL in line for line in withheld) or (code != 0 and bool(withheld))
    if verbose or not fatal:  # shown (--verbose), or not a dead peer after all: nothing is hidden
        out.write(b"".join(withheld))
        out.flush()
    if not fatal:
        return code if code >= 0 else 128 - code
    log = _local_log(argv)
    if log is not None and withheld:
        with contextlib.suppress(OSError), open(log, "ab") as f:
            f.write(b"mlret.supervise: the training process's last stderr lines:\n" + b"".join(withheld))
    reporter = "jax.distributed" if any(b"absl::Status: " in x or _FATAL in x for x in withheld) else (
        "the CPU collectives (gloo)" if any(b"gloo" in x.lower() for x in withheld) else "jax.distributed")
    print(f"mlret.train: {_process_label(argv)} lost a peer: {reporter} reported "
          f"'{_jax_status(withheld)}'; exiting with status {EXIT_PEER} (a peer is given config.runtime.peer_timeout_s "
          f"to answer; restart every process: the run resumes from the last complete checkpoint"
          f"{f'; details in {log}' if log and not verbose else ''})", file=sys.stderr, flush=True)
    return EXIT_PEER


def _local_log(argv: list[str]) -> str | None:
    """<workdir>/train.log of a local --workdir (the log mlret.train writes), if it exists."""
    for i, a in enumerate(argv):
        workdir = a.split("=", 1)[1] if a.startswith("--workdir=") else (
            argv[i + 1] if a == "--workdir" and i + 1 < len(argv) else None)
        if workdir and "://" not in workdir and os.path.isfile(os.path.join(workdir, "train.log")):
            return os.path.join(workdir, "train.log")
    return None

if __name__ == "__main__":
    if sys.argv[1:2] != ["--"] or len(sys.argv) < 3:
        sys.exit("usage: python -m mlret.supervise -- python -m mlret.train ARGS (started by mlret.train itself)")
    sys.exit(run(sys.argv[2:]))
