"""OHIF, the radiologist's web viewer, served offline in front of an Orthanc's DICOMweb.

The viewer is npm's prebuilt `@ohif/app` (`dist/`; deploy/test.sh puts it under
`.cache/ohif/VERSION/`), served by a small HTTP server on loopback that gives the page the
cross-origin isolation headers it wants, replaces `app-config.js` with one data source on
the page's own origin, and passes `/dicom-web/` through to Orthanc: nothing is loaded from
elsewhere.
"""

from __future__ import annotations

import mimetypes
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.servers import free_port

OHIF_VERSION = "3.13.2"
ROOT = Path(__file__).resolve().parents[1]

APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  maxNumberOfWebWorkers: 2,
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (test PACS)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""

ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")


def ohif_dist() -> Path:
    """Where OHIF's prebuilt `dist/` is (``IDAICS_OHIF_DIST`` overrides)."""
    dist = Path(
        os.environ.get("IDAICS_OHIF_DIST", ROOT / ".cache" / "ohif" / OHIF_VERSION / "dist")
    )
    if not (dist / "index.html").is_file():
        raise RuntimeError(
            f"OHIF {OHIF_VERSION} not found at {dist}: deploy/test.sh fetches it with npm pack"
        )
    return dist


def _handler(dist: Path, pacs: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for k, v in {**headers, **ISOLATION, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path.startswith("/dicom-web/"):
                return self._proxy()
            if path == "/app-config.js":
                return self._send(200, APP_CONFIG.encode(), {"Content-Type": "text/javascript"})
            file = (dist / path.lstrip("/")).resolve()
            if not file.is_relative_to(dist) or not file.is_file():
                file = dist / "index.html"  # the viewer's own routes (/viewer?...) are the page
            kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            self._send(200, file.read_bytes(), {"Content-Type": kind})

        def _proxy(self) -> None:
            req = urllib.request.Request(
                pacs + self.path,
                headers={k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")},
            )
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    body, status = r.read(), r.status
                    headers = {k: v for k, v in r.headers.items() if k.lower() == "content-type"}
            except urllib.error.HTTPError as e:
                body, status = e.read(), e.code
                headers = {"Content-Type": e.headers.get("Content-Type", "text/plain")}
            self._send(status, body, headers)

    return Handler


@dataclass(frozen=True)
class Viewer:
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def study_url(self, study_uid: str) -> str:
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"


@contextmanager
def ohif(pacs_url: str) -> Iterator[Viewer]:
    """OHIF on a free loopback port, reading the Orthanc at ``pacs_url`` through its DICOMweb."""
    dist = ohif_dist().resolve()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(dist, pacs_url))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="ohif", daemon=True)
    thread.start()
    try:
        yield Viewer(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
