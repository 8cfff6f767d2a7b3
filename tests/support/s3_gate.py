"""An S3 endpoint that lets through only requests signed with one access key for one region.

    gate = S3Gate(s3_server.port, access_key="AKIAGATE...", region="eu-west-3").start()
    gate.url          # the endpoint clients must use: http://127.0.0.1:PORT
    gate.refused      # ["PUT /bucket/key: key AKIA... region us-east-1", ...]

It forwards every admitted request to the S3 server behind it and answers every other one
with a 403 `InvalidAccessKeyId` error (an unsigned request, another key, another region).
moto itself accepts any credentials; with the gate in front, a process that ignored the
configured credentials or region (and used its environment's, or none) fails, and the
gate names the request.
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.services import free_port

_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/\d{8}/([^/]+)/s3/aws4_request")
_QUERY_CREDENTIAL = re.compile(r"X-Amz-Credential=([^%/&]+)(?:%2F|/)\d{8}(?:%2F|/)([^%/&]+)")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
}
_REFUSAL = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidAccessKeyId</Code>'
    b"<Message>refused by the test's S3 gate: wrong access key or region</Message></Error>"
)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that closes its connection early is no news."""


@dataclass
class S3Gate:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server on `target_port`."""

    target_port: int
    access_key: str
    region: str
    port: int = field(default_factory=free_port)
    refused: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admits(self, method: str, path: str, headers: Any) -> bool:
        """True for a request signed with the gate's key for its region (else recorded)."""
        found = _CREDENTIAL.search(headers.get("Authorization", "")) or _QUERY_CREDENTIAL.search(
            path
        )
        key, region = found.groups() if found else ("(unsigned)", "-")
        if (key, region) == (self.access_key, self.region):
            return True
        self.refused.append(f"{method} {path.split('?')[0]}: key {key} region {region}")
        return False

    def start(self) -> S3Gate:
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the gate records what it refuses."""

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                if not gate.admits(self.command, self.path, self.headers):
                    self._answer(403, {"Content-Type": "application/xml"}, _REFUSAL)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection("127.0.0.1", gate.target_port, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                    kept = {k: v for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP}
                    self._answer(answer.status, kept, data)
                finally:
                    upstream.close()

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                head = self.command == "HEAD"  # keeps the object's Content-Length
                for key, value in headers.items():
                    if head or key.lower() != "content-length":
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

        self._server = _QuietServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
