"""The study's app registry: Flower Hub's ``fetch-fab`` answered from an apps folder.

Flower 1.41's SuperLink fetches ``flwr run @publisher/app==x.y.z`` from
``$FLWR_SUPERGRID_API_URL/hub/fetch-fab`` (default Flower Hub, api.flower.ai) and hands
the returned signatures to SuperNodes, which verify them against their
``--trusted-entities``. This server answers that one request from an apps folder
written by :mod:`radfed.deploy.signing`, so a study signs its own code without
Flower Hub. The coordinator entrypoint runs it on the loopback of the SuperLink's
container and points ``FLWR_SUPERGRID_API_URL`` at it; it holds no secrets (signing
happens offline) and is never exposed.

Routes: ``POST /hub/fetch-fab`` with ``{"app_id": "@p/n", "app_version": "x.y.z"}`` ->
``{"fab_url": ..., "verifications": [...]}`` (404 with the available versions when
unknown), and ``GET /fab/SHA256`` -> the bundle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from radfed.deploy.signing import available_versions, find_app

log = logging.getLogger(__name__)

FETCH = "/hub/fetch-fab"
MAX_REQUEST = 64 * 1024


class _Handler(BaseHTTPRequestHandler):
    server: AppRegistry

    def log_message(self, format: str, *args: Any) -> None:
        log.info("registry: " + format, *args)

    def _send(self, status: HTTPStatus, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, data: Any) -> None:
        self._send(status, json.dumps(data).encode())

    def do_POST(self) -> None:
        if self.path != FETCH:
            self._json(HTTPStatus.NOT_FOUND, {"detail": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            if length > MAX_REQUEST:
                raise ValueError("request too large")
            body = json.loads(self.rfile.read(length) or b"{}")
            app_id, version = str(body["app_id"]), body.get("app_version")
        except (ValueError, KeyError, TypeError) as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"detail": f"bad request: {exc}"})
            return
        app = find_app(self.server.apps, app_id, version)
        if app is None:
            versions = available_versions(self.server.apps, app_id)
            log.warning("registry: no signed app %s==%s (have %s)", app_id, version, versions)
            self._json(HTTPStatus.NOT_FOUND, {"detail": {"available_app_versions": versions}})
            return
        digest = hashlib.sha256(app.fab.read_bytes()).hexdigest()
        self._json(
            HTTPStatus.OK,
            {"fab_url": f"{self.server.url}/fab/{digest}", "verifications": app.verifications()},
        )

    def do_GET(self) -> None:
        digest = self.path.rsplit("/", 1)[-1]
        if not self.path.startswith("/fab/") or len(digest) != 64:
            self._json(HTTPStatus.NOT_FOUND, {"detail": "not found"})
            return
        for fab in Path(self.server.apps).glob("*/*/*.fab"):
            data = fab.read_bytes()
            if hashlib.sha256(data).hexdigest() == digest:
                self._send(HTTPStatus.OK, data, "application/octet-stream")
                return
        self._json(HTTPStatus.NOT_FOUND, {"detail": "no such bundle"})


class AppRegistry(ThreadingHTTPServer):
    """Serves ``apps`` on ``host:port`` (port 0: a free one) in a daemon thread."""

    daemon_threads = True

    def __init__(self, apps: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.apps = Path(apps)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL to put in ``FLWR_SUPERGRID_API_URL``."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> AppRegistry:
        self._thread = threading.Thread(target=self.serve_forever, name="app-registry")
        self._thread.daemon = True
        self._thread.start()
        log.info("app registry for %s at %s", self.apps, self.url)
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
