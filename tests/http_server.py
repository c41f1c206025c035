"""A small GDC-like HTTP server on 127.0.0.1 for download tests.

Speaks the parts of the GDC API nucseg uses: ``POST /files`` (filters ignored except the project,
paging by ``from``/``size``) and ``GET /data/{id}`` with Range and If-Range support (a strong ETag from
the content and a Last-Modified date from the file). Fault injection: HTTP 500s, connections dropped
mid-body, wrong bytes (md5 mismatch), slow responses, no validators, If-Range ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FileServer:
    def __init__(self, files: dict[str, Path], catalogue: list[dict] | None = None):
        """``files``: id -> file served at /data/{id}; ``catalogue``: GDC file hits for POST /files."""
        self.files = files
        self.catalogue = catalogue or []
        self.fail_next = 0          # answer this many requests with HTTP 500
        self.drop_after: int | None = None  # close the next body after this many bytes
        self.corrupt: set[str] = set()      # ids served with one byte flipped
        self.delay = 0.0                    # seconds before each response
        self.slow_next = 0                  # this many responses wait slow_seconds first
        self.slow_seconds = 0.0
        self.validators = True              # send ETag and Last-Modified
        self.honour_if_range = True         # False: serve the range even when If-Range names another version
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server.requests.append({"path": self.path, "body": body})
                if self.path.rstrip("/") != "/files":
                    self.send_error(404)
                    return
                project = _project_of(body.get("filters", {}))
                hits = [h for h in server.catalogue
                        if project is None or h["cases"][0]["project"]["project_id"] == project]
                start, size = int(body.get("from", 0)), int(body.get("size", 10))
                page = hits[start:start + size]
                payload = json.dumps({"data": {"hits": page, "pagination": {
                    "count": len(page), "total": len(hits), "size": size, "from": start,
                    "page": start // max(size, 1) + 1, "pages": -(-len(hits) // max(size, 1))}},
                    "warnings": {}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                        "if_range": self.headers.get("If-Range")})
                time.sleep(server.delay)
                if server.slow_next > 0:
                    server.slow_next -= 1
                    time.sleep(server.slow_seconds)
                if server.fail_next > 0:
                    server.fail_next -= 1
                    self.send_error(500, "injected failure")
                    return
                name = self.path.rsplit("/", 1)[-1]
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name].read_bytes()
                if name in server.corrupt:
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                etag = f'"{hashlib.md5(data).hexdigest()}"'
                modified = formatdate(server.files[name].stat().st_mtime, usegmt=True)
                start = 0
                m = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if_range = self.headers.get("If-Range")
                if m and if_range and server.honour_if_range and if_range not in (etag, modified):
                    m = None  # RFC 9110 13.1.5: another version: ignore Range, send the whole file
                if m:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                if server.validators:
                    self.send_header("ETag", etag)
                    self.send_header("Last-Modified", modified)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_after is not None:
                    cut, server.drop_after = server.drop_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def hit(file_id: str, path: Path, file_name: str, project: str) -> dict:
        """A GDC files hit for ``path`` as the real endpoint returns it."""
        data = path.read_bytes()
        return {"id": file_id, "file_id": file_id, "file_name": file_name, "md5sum": hashlib.md5(data).hexdigest(),
                "file_size": len(data), "experimental_strategy": "Diagnostic Slide",
                "cases": [{"submitter_id": file_name[:12], "project": {"project_id": project}}]}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _project_of(filters: dict) -> str | None:
    for clause in filters.get("content", []):
        content = clause.get("content", {})
        if content.get("field") == "cases.project.project_id":
            return content["value"][0]
    return None
