"""Fault injection for the labeling tests: an S3 server that fails on cue, and Ray processes found and killed.

`FaultyS3` is moto's S3 API on 127.0.0.1, like the `s3_server` fixture, with three faults a test can cue:
`stop()` takes the server down the way a crash does (the port refuses connections and every open connection
is cut), `start()` brings it back on the same port with the same objects, and `hold(match)` stops requests
that match at the door: the test learns that the client reached that point (`Hold.reached`) and the request
never reaches the store. That makes "kill the driver while it is in the middle of X" deterministic.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

import psutil
from werkzeug.serving import ThreadedWSGIServer

HOLD_TIMEOUT_S = 600  # a held request gives up waiting for its release after this long
SIGNED_BY = re.compile(r"Credential=([^/]+)/")  # the access key id in a SigV4 Authorization header
REAP_S = 10  # how long to wait for killed processes to be gone


@dataclass(frozen=True)
class Request:
    """What a fault needs to know about an S3 request."""

    method: str
    path: str  # /bucket/key, unquoted
    query: str
    copy: bool  # a server-side copy (CopyObject): how S3 output is published
    key_id: str  # the access key id it was signed with ('' if unsigned)


@dataclass
class Hold:
    """Requests matching `match` wait at the door until `release()`, then get a 503 without being served."""

    match: Callable[[Request], bool]
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    held: list[Request] = field(default_factory=list)

    def release(self) -> None:
        self.released.set()


class _Server(ThreadedWSGIServer):
    """werkzeug's threaded server, remembering its open connections so that `cut()` can reset them."""

    def __init__(self, *args, **kwargs):
        self.connections: set[socket.socket] = set()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self.connections.discard(request)
        super().shutdown_request(request)

    def cut(self) -> None:
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class FaultyS3:
    """moto's S3 on 127.0.0.1:`port` that can crash, come back and hold requests; `requests` logs all served."""

    def __init__(self, port: int):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.app = DomainDispatcherApplication(create_backend_app)
        self.holds: list[Hold] = []
        self.requests: list[Request] = []
        self.refused = 0  # requests answered 503 by a hold
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __call__(self, environ, start_response):
        signed = SIGNED_BY.search(environ.get("HTTP_AUTHORIZATION", ""))
        request = Request(environ["REQUEST_METHOD"], unquote(environ.get("PATH_INFO", "")),
                          environ.get("QUERY_STRING", ""), "HTTP_X_AMZ_COPY_SOURCE" in environ,
                          signed.group(1) if signed else "")
        for hold in self.holds:
            if not hold.released.is_set() and hold.match(request):
                hold.held.append(request)
                hold.reached.set()
                hold.released.wait(HOLD_TIMEOUT_S)
                self.refused += 1
                start_response("503 Service Unavailable", [("Content-Length", "0")])
                return [b""]
        self.requests.append(request)
        return self.app(environ, start_response)

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import MotoRequestHandler

        self._server = _Server("127.0.0.1", self.port, self, handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Go down like a crashed server: refuse new connections and reset the open ones."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.cut()
        self._thread.join()
        self._server = None

    def hold(self, match: Callable[[Request], bool]) -> Hold:
        hold = Hold(match)
        self.holds.append(hold)
        return hold

    def close(self) -> None:
        for hold in self.holds:
            hold.release()
        self.stop()


def titled(marker: str, root: int | None = None) -> list[psutil.Process]:
    """Live descendants of process `root` (default: this one) whose title (Ray sets `ray::...`) holds `marker`."""
    found = []
    for process in psutil.Process(root or os.getpid()).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if marker in " ".join(process.cmdline()):
                found.append(process)
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a `ser` driver, then everything it started (embedded Ray), as when its machine is lost."""
    children = psutil.Process(process.pid).children(recursive=True)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=REAP_S)
