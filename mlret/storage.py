"""Every path a user gives, local or on Google Cloud Storage: `etils.epath` over gcsfs, and the storage pre-flight.

`path(p)` turns a user path (a local path, `~`-relative or relative, or `gs://bucket/prefix`) into an
`epath.Path`; `gs://` paths read and write through gcsfs (epath's fsspec backend: TensorFlow is not installed),
orbax writes its arrays there through tensorstore. Nothing falls back to a local folder: a `gs:/x` with one slash,
or any other `scheme://`, is an error naming the field.

`configure()` turns off gcsfs's listings cache (a checkpoint folder other processes write must list what is there
now) and derives what the libraries need from the standard `STORAGE_EMULATOR_HOST` variable (a local GCS
emulator such as fake-gcs-server): tensorstore reads `TENSORSTORE_GCS_HTTP_URL` only; gcsfs gets the endpoint and
anonymous credentials through fsspec's config; and gcsfs's gRPC probe of the bucket type (its "experimental"
zonal / hierarchical-namespace support, `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`), which the emulator does not serve and
which waits 60 s per bucket, is turned off. Without the variable nothing changes: real GCS, application-default
credentials. `path()` calls it; entry points call it before anything else touches storage.

`check_storage(fields)` is the pre-flight: for every bucket a run will touch it checks, within seconds, that the
endpoint answers, that credentials exist, that the bucket exists and (for the fields a run writes) that an object
can be written and deleted, and raises a ConfigError naming the field, the bucket and what to do.

`Staged` is a file that a writer appends to: GCS objects cannot be appended to and a gcsfs upload becomes visible
only when it is closed, so the file is written locally and copied whole to its place on `flush()`.

No storage wait is unbounded (docs/robustness.md, "Storage faults"). Two layers bound every request, one bounds
every operation of a run:
  - gcsfs (listings, metadata, small files, logs, data files): no bytes for `request_timeout_s` fails the request
    (aiohttp's connect and read timeouts; gcsfs's own default is none at all), and gcsfs retries 408 / 429 / 5xx,
    resets and timeouts 6 times in all with 1, 2, 4, 8, 16 s (+ up to 1 s) between tries;
  - tensorstore (checkpoint arrays): curl gives up on a transfer that moves less than 1 byte/s for
    `request_timeout_s` or does not connect within it, and tensorstore retries with its own back-off (1-32 s, up
    to 32 tries);
  - `bounded(op, path)` / `watch(...)`: mlret's operations (checkpoint save, commit, listing and restore, metric
    and log uploads, file copies, downloads) have `op_timeout_s` in all, retries included. A watchdog thread ends
    the process when one outlasts it, whatever thread is stuck: the one-line error names the operation and the
    path, the exit status is `EXIT_STORAGE` (75, EX_TEMPFAIL: "try again"), and a checkpoint in flight is never
    committed, so the previous one stays the newest complete step. An operation that fails (retries spent) raises
    `StorageError`, one line with the operation and the path; `mlret.train` exits with the same status.
`set_policy()` sets both bounds (mlret.train: from `config.storage`); `deadline()` arms the watchdog for other
bounded waits (the SIGTERM grace period).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import itertools
import logging
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import fsspec
import fsspec.config
from etils import epath
from etils.epath import backend

from mlret.errors import ConfigError

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
GCS_ENDPOINT = "https://storage.googleapis.com"
PROBE_TIMEOUT_S = 5.0
CACHE_ENV, DEFAULT_CACHE = "MLRET_GCS_CACHE", "~/.cache/mlret/gcs"  # local copies of gs:// folders
EXIT_STORAGE = 75  # EX_TEMPFAIL: a storage operation failed or stalled; a restart resumes from the last checkpoint

log = logging.getLogger("mlret.storage")


def is_gcs(p: str | os.PathLike[str]) -> bool:
    return os.fspath(p).startswith("gs://")


def _check_scheme(p: str, field: str) -> None:
    if "://" in p and not p.startswith("gs://"):
        raise ConfigError(f"{field}: {p!r}: only local paths and gs://bucket/... are supported")
    if p.startswith("gs:") and not p.startswith("gs://"):
        raise ConfigError(f"{field}: {p!r} is not a GCS path (gs://bucket/prefix, two slashes) and would become a "
                          "local folder named 'gs:'; write it as gs://...")
    if p.startswith("gs://") and not p[len("gs://"):].split("/")[0]:
        raise ConfigError(f"{field}: {p!r} names no bucket (gs://bucket/prefix)")


def path(p: str | os.PathLike[str], field: str = "path") -> epath.Path:
    """A user path as an absolute `epath.Path`: `gs://...` as given, a local one with `~` expanded and made
    absolute. `field` names the config field or flag in the error for a malformed path."""
    s = os.fspath(p)
    _check_scheme(s, field)
    if is_gcs(s):
        configure()
        return epath.Path(s)
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def join(base: str | os.PathLike[str], p: str | os.PathLike[str], field: str = "path") -> epath.Path:
    """`p` if it is absolute (a gs:// path or an absolute / ~ local one), else `base / p`."""
    s = os.fspath(p)
    if is_gcs(s) or os.path.isabs(os.path.expanduser(s)) or "://" in s:
        return path(s, field)
    return path(base, field) / s


def bucket_of(p: str | os.PathLike[str]) -> str:
    return os.fspath(p)[len("gs://"):].split("/")[0]


# ---------------------------------------------------------------------------------------------------- emulator


def emulator_url() -> str | None:
    """STORAGE_EMULATOR_HOST as a URL (http:// added when it is a bare host:port), or None."""
    host = os.environ.get(EMULATOR_ENV, "").strip()
    if not host:
        return None
    return host if "://" in host else f"http://{host}"


def configure() -> None:
    """gcsfs without a listings cache and with the request timeout of `set_policy`; tensorstore's transfers
    bounded the same way; tensorstore and gcsfs pointed at STORAGE_EMULATOR_HOST when it is set.

    Cheap and idempotent; a variable the user set already (TENSORSTORE_GCS_HTTP_URL, ...) is left alone."""
    url = emulator_url()
    if url is not None:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read when gcsfs is imported
    # tensorstore's curl transport reads these when it starts (its first request): no connection, or less than a
    # byte a second, for this long fails the request, which tensorstore then retries (without them: no limit).
    t = str(max(1, round(POLICY.request_timeout_s)))
    for key, value in (("TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS", t), ("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", t),
                       ("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")):
        if os.environ.get(key) in (None, _SET_BY_US.get(key)):  # the user's own setting wins; ours follows the policy
            os.environ[key] = _SET_BY_US[key] = value
    _configure_gcsfs(url)
    _gcsfs_timeout(POLICY.request_timeout_s)


_SET_BY_US: dict[str, str] = {}


@functools.cache
def _gcsfs_timeout(seconds: float) -> None:
    import aiohttp  # lazy: gs:// only (aiohttp, gcsfs and google.auth load on the first gs:// path)

    # Not a total: a large file may take long; no byte for `seconds` (connecting or reading) is a stall. gcsfs
    # hands this to every aiohttp request and retries the timeout like any transient error.
    fsspec.config.conf.setdefault("gcs", {})["requests_timeout"] = aiohttp.ClientTimeout(
        total=None, connect=seconds, sock_connect=seconds, sock_read=seconds)


@functools.cache
def _configure_gcsfs(url: str | None) -> None:
    # No listings cache: a folder another process (another host, a later run) writes into, such as a checkpoint
    # directory, must list what is there now, not what this process saw before.
    fsspec.config.conf.setdefault("gcs", {}).update(use_listings_cache=False)
    if url is None:
        return
    import gcsfs.core  # lazy: gs:// only

    fsspec.config.conf["gcs"].update(endpoint_url=url, token="anon")
    # gcsfs imported before configure() ran exposes its probing subclass: register the plain file system.
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)


def filesystem() -> Any:
    """The gcsfs file system epath uses for gs:// paths (one per process, configured by `configure()`)."""
    configure()
    return backend.fsspec_backend.fs("gs://")


# ---------------------------------------------------------------------------------------------------- bounds


@dataclasses.dataclass
class Policy:
    """How long storage may take (`config.storage`; docs/robustness.md)."""

    request_timeout_s: float = 30.0  # one HTTP request with no byte moving (gcsfs and tensorstore), per try
    op_timeout_s: float = 600.0  # one operation of mlret (a checkpoint save, an upload), every retry included


POLICY = Policy()
# tensorstore (and orbax through it) report storage failures as ValueError / RuntimeError with an absl status.
_STATUS = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED|INTERNAL|DATA_LOSS|"
                     r"PERMISSION_DENIED|UNAUTHENTICATED|UNKNOWN|FAILED_PRECONDITION|OUT_OF_RANGE)\b")


def set_policy(*, request_timeout_s: float | None = None, op_timeout_s: float | None = None) -> None:
    """Set the bounds (before the first storage request: gcsfs and tensorstore read them when they start)."""
    if request_timeout_s is not None:
        POLICY.request_timeout_s = float(request_timeout_s)
    if op_timeout_s is not None:
        POLICY.op_timeout_s = float(op_timeout_s)
    configure()


class StorageError(OSError):
    """A storage operation failed (its retries spent) or outlasted its bound: one line with the operation and the
    path. `mlret.train` exits with `EXIT_STORAGE`; the last complete checkpoint is the one to resume from."""


@dataclasses.dataclass
class _Watch:
    op: str
    path: str
    deadline: float
    timeout: float
    done: Callable[[], bool] | None
    exit_code: int
    message: str | Callable[[], str]


class _Watchdog:
    """One daemon thread that ends the process when a watched wait outlasts its deadline (os._exit: a thread stuck
    in a request cannot be interrupted, and the interpreter would wait for it at exit)."""

    def __init__(self) -> None:
        self._watches: dict[int, _Watch] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def arm(self, watch: _Watch) -> int:
        with self._lock:
            key = next(self._ids)
            self._watches[key] = watch
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlret-storage-watchdog", daemon=True)
                self._thread.start()
        return key

    def disarm(self, key: int) -> None:
        with self._lock:
            self._watches.pop(key, None)

    def active(self) -> list[_Watch]:
        with self._lock:
            return list(self._watches.values())

    def _run(self) -> None:
        while True:
            time.sleep(0.2)
            now = time.monotonic()
            for key, w in list(self._watches.items()):
                try:
                    finished = w.done is not None and w.done()
                except Exception:  # noqa: BLE001 (a failed background operation reports itself where it is waited)
                    finished = True
                if finished:
                    self.disarm(key)
                elif now > w.deadline:
                    _die(w)


_WATCHDOG = _Watchdog()


def _die(w: _Watch) -> None:
    text = w.message() if callable(w.message) else w.message
    text = text or (f"storage: {w.op} {w.path} did not finish within {w.timeout:.0f} s "
                    "(config.storage.op_timeout_s); exiting: a checkpoint in flight stays uncommitted, the last "
                    "complete checkpoint is loadable, and a restart resumes from it")
    log.error("%s", text)
    print(f"mlret: {text}", file=sys.stderr, flush=True)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(w.exit_code)


def deadline(op: str, path: str | os.PathLike[str], timeout: float, *, done: Callable[[], bool] | None = None,
             exit_code: int = EXIT_STORAGE, message: str | Callable[[], str] = "") -> int:
    """Arm the watchdog: unless `disarm(key)` comes first (or `done()` turns true: checked every 0.2 s), the
    process exits with `exit_code` after `timeout` seconds, saying `message` (default: the operation, the path
    and the bound). Returns the key for `disarm`."""
    return _WATCHDOG.arm(_Watch(op, os.fspath(path), time.monotonic() + timeout, timeout, done, exit_code, message))


def disarm(key: int) -> None:
    _WATCHDOG.disarm(key)


def in_flight() -> list[str]:
    """'<operation> <path>' of every bounded operation in progress (for a message about a stalled exit)."""
    return [f"{w.op} {w.path}" for w in _WATCHDOG.active()]


@contextlib.contextmanager
def bounded(op: str, path: str | os.PathLike[str], timeout: float | None = None) -> Iterator[None]:
    """The block is storage operation `op` on `path`: the process exits (`EXIT_STORAGE`) if it outlasts `timeout`
    (default `POLICY.op_timeout_s`), and an error from it becomes a one-line `StorageError` naming both."""
    key = deadline(op, path, POLICY.op_timeout_s if timeout is None else timeout)
    try:
        yield
    except StorageError:
        raise
    except (OSError, TimeoutError, RuntimeError, ValueError) as e:
        if isinstance(e, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
            raise  # an answer, not a failure: callers handle it
        if not isinstance(e, (OSError, TimeoutError)) and not _STATUS.search(str(e)):
            raise  # not a storage failure (a programming error, a bad argument)
        raise StorageError(f"storage: {op} {os.fspath(path)} failed: {_first_line(e)}") from e
    finally:
        disarm(key)


def watch(op: str, path: str | os.PathLike[str], done: Callable[[], bool], timeout: float | None = None) -> int:
    """Bound background work (an asynchronous checkpoint commit): the process exits if `done()` is not true
    within `timeout` (default `POLICY.op_timeout_s`)."""
    return deadline(op, path, POLICY.op_timeout_s if timeout is None else timeout, done=done)


# ---------------------------------------------------------------------------------------------------- pre-flight


def _endpoint() -> str:
    return emulator_url() or GCS_ENDPOINT


def _reachable(url: str) -> str | None:
    """None if a TCP connection to the endpoint opens within PROBE_TIMEOUT_S, else why not."""
    parsed = urllib.parse.urlsplit(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def _credentials_problem() -> str | None:
    """None when Google application-default credentials exist (or the emulator needs none), else why not."""
    if emulator_url() is not None:
        return None
    import google.auth  # lazy: gs:// only
    import google.auth.exceptions  # lazy: gs:// only

    try:
        google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
    except google.auth.exceptions.DefaultCredentialsError as e:
        return str(e).splitlines()[0]
    return None


def _fail(field: str, p: str, what: str, todo: str) -> ConfigError:
    return ConfigError(f"{field}: {p}: {what} (endpoint {_endpoint()}); {todo}. Nothing was loaded or compiled, "
                       "and nothing is written to a local folder instead")


def _probe_fs() -> Any:
    """A gcsfs instance of its own for the checks: one try per request and a short timeout (the file system the
    run uses retries for minutes, which is right for a transient error, not for a wrong bucket)."""
    configure()
    import gcsfs.core  # lazy: gs:// only

    url = emulator_url()
    kwargs = {"endpoint_url": url, "token": "anon"} if url else {}
    return gcsfs.core.GCSFileSystem(skip_instance_cache=True, requests_timeout=PROBE_TIMEOUT_S, **kwargs)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _check_one(fs: Any, field: str, p: str, write: bool) -> None:
    bucket = bucket_of(p)
    try:
        fs.call("GET", "b/{}", bucket, json_out=True)
    except FileNotFoundError as e:
        raise _fail(field, p, f"the bucket {bucket!r} does not exist", f"create it (gcloud storage buckets create "
                    f"gs://{bucket}) or fix the path") from e
    except OSError as e:  # gcsfs: 403 Forbidden
        if not write:  # reading the bucket's metadata may be denied while reading objects is allowed
            return
        raise _fail(field, p, f"this account may not access the bucket {bucket!r} ({_first_line(e)})",
                    "grant it roles/storage.objectAdmin on the bucket, or use a bucket it may write") from e
    if not write:
        return
    probe = f"{p.rstrip('/')[len('gs://'):]}/.mlret-preflight-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"mlret pre-flight write check")
        fs.rm_file(probe)
    except OSError as e:
        raise _fail(field, p, f"cannot write to the bucket {bucket!r} ({_first_line(e)})",
                    "grant this account roles/storage.objectAdmin (create and delete objects) on the bucket, or "
                    "use one it may write") from e


def check_storage(fields: Iterable[tuple[str, str, bool]]) -> None:
    """Pre-flight of the GCS paths among `fields` = (config field or flag, path, whether the run writes there).

    Local paths and empty ones are skipped (their own checks report them). Raises ConfigError, within seconds,
    for an unreachable endpoint, missing credentials, a missing bucket or a bucket the run may not write."""
    todo = []
    for field, p, write in fields:
        p = os.fspath(p) if p else ""
        if not p:
            continue
        _check_scheme(p, field)
        if is_gcs(p):
            todo.append((field, p, write))
    if not todo:
        return
    field, p, _ = todo[0]
    why = _credentials_problem()
    if why is not None:
        raise _fail(field, p, f"no Google Cloud credentials ({why})",
                    "run `gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to a "
                    "service-account key, or run on a VM whose service account may use the bucket")
    why = _reachable(_endpoint())
    if why is not None:
        hint = (f"is the emulator running? ({EMULATOR_ENV}={os.environ.get(EMULATOR_ENV)})" if emulator_url()
                else "check the network / proxy of this machine")
        raise _fail(field, p, f"the storage endpoint does not answer ({why})", hint)
    fs = _probe_fs()
    seen = set()
    for field, p, write in todo:
        if (p, write) not in seen:
            seen.add((p, write))
            _check_one(fs, field, p, write)


# ---------------------------------------------------------------------------------------------------- staged files


class Staged:
    """A local file that a writer appends to, copied whole to `target` (local or gs://) by `flush()`.

    For a local target the staging file is the target itself and `flush()` does nothing; for gs:// it lives in a
    temporary folder (removed by `close()`, which does not flush), seeded with the target's content if `keep`."""

    def __init__(self, target: epath.Path, *, keep: bool = True) -> None:
        self.target = target
        self.remote = is_gcs(target)
        self._tmp = None
        if self.remote:
            self._tmp = epath.Path(tempfile.mkdtemp(prefix="mlret-staged-"))
            self.local = self._tmp / target.name
            if keep:
                with bounded("read", target):
                    if target.exists():
                        self.local.write_bytes(target.read_bytes())
        else:
            self.local = target
        self.local.parent.mkdir(parents=True, exist_ok=True)

    def flush(self) -> None:
        if self.remote:
            with bounded("upload", self.target):
                self.target.write_bytes(self.local.read_bytes())

    def close(self) -> None:
        """Remove the temporary staging folder (flush first: what was not flushed is lost)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def append_to(target: epath.Path, data: bytes) -> None:
    """Append `data` to a file, local or gs:// (a GCS object is rewritten whole: there is no append)."""
    with bounded("append", target):
        old = target.read_bytes() if target.exists() else b""
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(old + data)


def walk(root: epath.Path) -> Iterator[tuple[epath.Path, list[str], list[str]]]:
    """`root.walk()` with every folder as a full path (gcsfs lists gs:// folders without their `gs://`)."""
    for folder, dirs, files in root.walk():
        name = os.fspath(folder)
        if is_gcs(root) and not is_gcs(name):
            folder = epath.Path("gs://" + name.lstrip("/"))
        yield folder, list(dirs), list(files)


def rglob(root: epath.Path, pattern: str) -> list[epath.Path]:
    """`root.rglob(pattern)` for local and gs:// folders alike (epath refuses `**` on GCS: this walks the listing
    once instead), files and folders whose path below `root` matches `pattern` (fnmatch; `/` allowed)."""
    if not is_gcs(root):  # epath's own rglob refuses `**` on every backend: walk the local folder with pathlib
        return [epath.Path(p) for p in pathlib.Path(os.fspath(root)).rglob(pattern)]
    out = []
    for folder, dirs, files in walk(root):
        for name in (*dirs, *files):
            p = folder / name
            rel = os.fspath(p.relative_to(root))
            if fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel, f"*/{pattern}"):
                out.append(p)
    return out


def copy_file(src: epath.Path, dst: epath.Path) -> None:
    """`src` streamed to `dst` (local or gs://, either side; `dst`'s folder made), overwriting; a GCS object
    appears only when its upload completes."""
    with bounded("copy", f"{src} -> {dst}"):
        dst.parent.mkdir(parents=True, exist_ok=True)
        with src.open("rb") as fin, dst.open("wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 24)


def move_dir(src: epath.Path, dst: epath.Path) -> None:
    """Move a folder (local: one rename; gs://: every object copied, then deleted), `dst`'s parent made."""
    with bounded("move", f"{src} -> {dst}"):
        if is_gcs(src):
            fs = filesystem()
            fs.mv(os.fspath(src)[len("gs://"):], os.fspath(dst)[len("gs://"):], recursive=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(os.fspath(src), os.fspath(dst))


def sync_dir(local: epath.Path, target: epath.Path) -> None:
    """Copy every file below `local` to the same relative place below `target` (whole files, overwriting)."""
    with bounded("listing", local):
        todo = [root / name for root, _, files in walk(local) for name in files]
    for src in todo:
        copy_file(src, target / src.relative_to(local))


def local_mirror(src: str | os.PathLike[str], cache_root: str | os.PathLike[str] | None = None) -> epath.Path:
    """Where `download_dir` keeps the local copy of a gs:// path: `<cache_root>/<bucket>/<prefix>` (default
    cache root: $MLRET_GCS_CACHE, else ~/.cache/mlret/gcs)."""
    root = epath.Path(os.path.expanduser(os.fspath(cache_root or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)))
    return root / os.fspath(src)[len("gs://"):]


def download_dir(src: epath.Path, cache_root: str | os.PathLike[str] | None = None) -> epath.Path:
    """A gs:// folder copied to its `local_mirror`, for libraries that read only local files (tokenizers,
    safetensors, ArrayRecord). Files already there with the same size are not fetched again. Returns the local
    folder."""
    local = local_mirror(src, cache_root)
    with bounded("listing", src):
        if not src.is_dir():
            raise FileNotFoundError(f"{src}: no such folder on GCS")
        todo = [folder / name for folder, _, files in walk(src) for name in files]
    for f in todo:
        _fetch(f, local / f.relative_to(src))
    return local


def download_file(src: epath.Path, cache_root: str | os.PathLike[str] | None = None) -> epath.Path:
    """One gs:// file copied to its `local_mirror` (as `download_dir` copies a folder's files: not fetched again
    when the copy there has the same size). Returns the local file."""
    with bounded("read", src):
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such file on GCS")
    local = local_mirror(src, cache_root)
    _fetch(src, local)
    return local


def _fetch(src: epath.Path, dst: epath.Path) -> None:
    """`src` copied to `dst` unless `dst` has its size already; through a `.part` name, so that an interrupted
    copy never stands under the final name."""
    with bounded("read", src):
        if dst.exists() and dst.stat().length == src.stat().length:
            return
    part = dst.parent / f".{dst.name}.part"
    copy_file(src, part)
    part.rename(dst)
