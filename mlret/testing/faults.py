"""Fault injection for robustness tests, as loop hooks (`mlret.loop.Hook`).

`InjectNaN(steps)`: poisoned batches on chosen steps. A poisoned batch carries one token id past any vocabulary;
the embedding lookup (`jnp.take`, which fills out-of-range rows with NaN) turns it into NaN embeddings, so the loss
and the gradients of that step are NaN exactly as with a real corrupt batch (a tokenizer and a model with different
vocabularies, a bad record). The train step's non-finite guard must then skip the update, the loop must count and
log it, and N in a row must stop the run with the last good checkpoint intact (tests/test_faults.py).

`KillAfterStep(n)`: after step n, wait for the pending checkpoint writes and SIGKILL this process (the resume tests'
"crash at a known moment"; `python -m mlret.testing.train` arms it from MLRET_TEST_SIGKILL_AFTER_STEP).

`FaultProxy(upstream, rules, seed)`: a loopback HTTP proxy in front of a GCS server (the emulator) that forwards
every request and, by rule, answers some of them with a fault instead: an HTTP status (429, 503, 403, ...), a
connection reset, a slow answer, or a stall (the request is read and never answered, until the proxy stops). A rule
picks requests by method and path (regular expressions on the decoded path, e.g. `checkpoints/10/`), skips the
first `after` matches, then hits `count` of them in a row (a burst) with `probability` each, drawn from one
`random.Random(seed)`: the same rules and seed give the same schedule. Clients reach it as they reach the
emulator, through STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL (tensorstore); upload `Location`
headers are rewritten to point back at the proxy. `python -m mlret.testing.faults --upstream URL --rules JSON`
serves one from the command line (scripts/storage_faults.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import http.server
import json
import logging
import os
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence

import numpy as np

from mlret.loop import Hook, Loop

log = logging.getLogger("mlret.testing")

# Larger than any vocabulary, and still an int32.
POISON_TOKEN_ID = 2**30
KILL_ENV = "MLRET_TEST_SIGKILL_AFTER_STEP"


def parse_steps(spec: str, field: str = "--inject_nan_steps") -> frozenset[int]:
    """'5,6,7' -> {5, 6, 7}; '' -> {}. Steps are numbered as logged (the step whose update uses the batch)."""
    steps = set()
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"{field}={spec!r}: {part!r} is not a step number >= 1 (use e.g. '5,6,7')")
        steps.add(int(part))
    return frozenset(steps)


def poison_batch(local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A copy of this process's batch slice whose first query carries an out-of-vocabulary token id."""
    out = {k: np.array(v, copy=True) for k, v in local.items()}
    out["query_ids"][0, 0] = POISON_TOKEN_ID
    return out


class InjectNaN(Hook):
    """Poison the batches of `steps` (numbered as logged)."""

    def __init__(self, steps: frozenset[int]) -> None:
        self.steps = steps

    def batch(self, loop: Loop, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if loop.step + 1 not in self.steps:
            return local
        log.warning("inject_nan_steps: poisoning the batch of step %d", loop.step + 1)
        return poison_batch(local)


class KillAfterStep(Hook):
    """After step `step`: every hook's pending work done (checkpoint writes), then SIGKILL to this process."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    @classmethod
    def from_env(cls) -> KillAfterStep | None:
        value = os.environ.get(KILL_ENV, "")
        return cls(int(value)) if value else None

    def after_step(self, loop: Loop) -> None:
        if loop.step == self.step:
            loop.wait()
            log.warning("%s=%d: killing this process with SIGKILL", KILL_ENV, self.step)
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------- fault proxy

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host",
        "content-length"}


@dataclasses.dataclass
class FaultRule:
    """Which requests get which fault. action: "status" (answer `status` with a GCS-style JSON error), "reset"
    (close the connection with a TCP reset, nothing answered), "slow" (wait `delay_s`, then forward), "stall" (read
    the request, never answer: the connection stays open until the proxy stops)."""

    action: str
    path: str = ""  # regular expression searched in the decoded request path and query (uploads: with name=)
    method: str = ""  # regular expression matched against the method ("" : any; e.g. "POST|PUT" for writes)
    status: int = 503
    delay_s: float = 0.0
    after: int = 0  # let this many matching requests through first
    count: int | None = None  # then fault this many (None: every one after)
    probability: float = 1.0
    matched: int = dataclasses.field(default=0, repr=False)
    fired: int = dataclasses.field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ("status", "reset", "slow", "stall"):
            raise ValueError(f"FaultRule.action={self.action!r}: one of status, reset, slow, stall")

    @classmethod
    def from_dict(cls, d: Mapping) -> FaultRule:
        return cls(**{k: v for k, v in d.items() if k not in ("matched", "fired")})

    def matches(self, method: str, path: str) -> bool:
        return (not self.method or re.fullmatch(self.method, method) is not None) and re.search(self.path, path) \
            is not None


class FaultProxy(http.server.ThreadingHTTPServer):
    """See the module docstring. `url` is what clients use; `events` lists (time, method, path, action) of every
    request ("forward" or the fault); `stalled` is set once a request has been stalled."""

    daemon_threads = True

    def __init__(self, upstream: str, rules: Sequence[FaultRule | Mapping] = (), seed: int = 0,
                 port: int = 0) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rules = [r if isinstance(r, FaultRule) else FaultRule.from_dict(r) for r in rules]
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.events: list[tuple[float, str, str, str]] = []
        self.stalled = threading.Event()
        self.release = threading.Event()  # set by stop(): stalled requests give up their connections
        super().__init__(("127.0.0.1", port), _FaultHandler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def set_rules(self, rules: Sequence[FaultRule | Mapping], seed: int | None = None) -> None:
        with self.lock:
            self.rules = [r if isinstance(r, FaultRule) else FaultRule.from_dict(r) for r in rules]
            if seed is not None:
                self.rng = random.Random(seed)
            self.stalled.clear()

    def decide(self, method: str, path: str) -> FaultRule | None:
        """The first rule that fires on this request (None: forward it), and record the request."""
        with self.lock:
            hit = None
            for rule in self.rules:  # every rule counts the requests it matches, whichever fires
                if not rule.matches(method, path):
                    continue
                rule.matched += 1
                if hit is not None or rule.matched <= rule.after or (rule.count is not None
                                                                    and rule.fired >= rule.count):
                    continue
                if rule.probability < 1.0 and self.rng.random() >= rule.probability:
                    continue
                rule.fired += 1
                hit = rule
            self.events.append((time.time(), method, path, hit.action if hit else "forward"))
            return hit

    def faults(self) -> list[tuple[float, str, str, str]]:
        with self.lock:
            return [e for e in self.events if e[3] != "forward"]

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a client that gave up
            super().handle_error(request, client_address)

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _FaultHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(out)
                out.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._body()
        path = urllib.parse.unquote(self.path)
        if "uploadType=multipart" in path:  # the object's name is in the body's JSON part, not in the URL
            m = re.search(rb'"name"\s*:\s*"([^"]+)"', body[:4096])
            if m:
                path += "&name=" + m.group(1).decode("utf-8", "replace")
        rule = self.server.decide(self.command, path)
        if rule is not None and rule.action == "stall":
            self.server.stalled.set()
            self.server.release.wait()
            self.close_connection = True
            return
        if rule is not None and rule.action == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if rule is not None and rule.action == "status":
            msg = {429: "The rate of change requests to the object is too high (injected).",
                   503: "Service Unavailable (injected)."}.get(rule.status, f"injected fault {rule.status}")
            data = json.dumps({"error": {"code": rule.status, "message": msg,
                                         "errors": [{"message": msg, "reason": "injected"}]}}).encode()
            self._reply(rule.status, [("Content-Type", "application/json")], data)
            return
        if rule is not None and rule.action == "slow":
            time.sleep(rule.delay_s)
        self._forward(body)

    def _forward(self, body: bytes) -> None:
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn.request(self.command, self.path, body=body if body or self.command in ("POST", "PUT", "PATCH")
                         else None, headers=headers)
            r = conn.getresponse()
            data = r.read()
            out = []
            for k, v in r.getheaders():
                if k.lower() in _HOP:
                    continue
                if k.lower() == "location":  # resumable uploads: come back through the proxy
                    v = v.replace(f"{up.scheme}://{up.netloc}", self.server.url)
                out.append((k, v))
            self._reply(r.status, out, data)
        finally:
            conn.close()

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def log_message(self, *args: object) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m mlret.testing.faults --upstream URL [--port P] [--seed S] --rules JSON`: serve a FaultProxy,
    print its URL, and run until killed."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rules", default="[]", help="a JSON list of FaultRule fields")
    a = ap.parse_args(argv)
    proxy = FaultProxy(a.upstream, json.loads(a.rules), a.seed, a.port)
    print(proxy.url, flush=True)
    proxy.serve_forever()


if __name__ == "__main__":
    main()
