"""Real servers for tests, started on loopback on free ports and stopped afterwards."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class OrthancServer:
    aet: str
    dicom_port: int
    http_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def get_file(self, path: str):
        """A DICOM file from the REST API, as a file-like object for pydicom."""
        return io.BytesIO(self.get(path))

    def post_json(self, path: str, body):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())


@contextmanager
def orthanc(workdir: Path, aet: str = "ORTHANC", modalities: dict | None = None):
    """An Orthanc PACS with its own storage in ``workdir``; yields an `OrthancServer`."""
    exe = shutil.which("Orthanc")
    if exe is None:
        raise RuntimeError("Orthanc is not installed (Debian package orthanc; deploy/test.sh installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    server = OrthancServer(aet, free_port(), free_port())
    config = {
        "Name": "test-pacs",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "DicomAet": aet,
        "DicomPort": server.dicom_port,
        "HttpPort": server.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomModalities": modalities or {},
        "Plugins": [],
        "StorageCompression": False,
        "HttpServerEnabled": True,
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = open(workdir / "orthanc.log", "wb")
    proc = subprocess.Popen([exe, str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.get_json("/system")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start; see {workdir / 'orthanc.log'}") from None
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
