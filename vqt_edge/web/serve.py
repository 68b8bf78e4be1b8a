"""`vqt-edge web --serve SITE`: the static site on localhost, with the headers the WASM build needs.

`.wasm` as application/wasm (streaming compilation), `.mjs` as JavaScript, and cross-origin isolation
(COOP same-origin + COEP require-corp) so onnxruntime-web may use threads (SharedArrayBuffer). Bound
to 127.0.0.1 only: the page needs no network, and the photos are read by the tab, never uploaded.
"""

from __future__ import annotations

import functools
import http.server
import sys
import threading
from pathlib import Path

from vqt_edge.errors import UserError

MIME = {
    ".wasm": "application/wasm",
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".json": "application/json",
    ".onnx": "application/octet-stream",
    ".safetensors": "application/octet-stream",
    ".html": "text/html",
}


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME}  # noqa: RUF012

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:
        pass  # one line per file is noise; errors still reach the page


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a closed tab is no error
            super().handle_error(request, client_address)


def make_server(site: Path, port: int = 8026) -> http.server.ThreadingHTTPServer:
    """A server for `site` on 127.0.0.1:`port` (0: any free port; `server.server_address[1]` says which)."""
    if not (site / "index.html").is_file() or not (site / "site.json").is_file():
        raise UserError(
            f"{site}: not a `vqt-edge web` site (no index.html / site.json); write one with --bundle B --out SITE"
        )
    handler = functools.partial(_Handler, directory=str(site))
    try:
        return _Server(("127.0.0.1", port), handler)
    except OSError as e:
        raise UserError(f"cannot listen on 127.0.0.1:{port} ({e.strerror}); choose another --port") from None


def serve_in_thread(site: Path, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Start serving in a daemon thread (tests, benchmarks); returns the server and the page's URL."""
    server = make_server(site, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"
