"""Real servers for tests, started on loopback on free ports and stopped afterwards."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from node.demo import free_port


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
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())


@contextmanager
def orthanc(
    workdir: Path, aet: str = "ORTHANC", modalities: dict | None = None, extra: dict | None = None
):
    """An Orthanc PACS with its own storage in ``workdir``; yields an `OrthancServer`."""
    exe = shutil.which("Orthanc")
    if exe is None:
        raise RuntimeError(
            "Orthanc is not installed (Debian package orthanc; deploy/test.sh installs it)"
        )
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
        **(extra or {}),
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    with open(workdir / "orthanc.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [exe, str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.get_json("/system")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Orthanc did not start; see {workdir / 'orthanc.log'}"
                    ) from None
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def dcmqi_tool(tool: str) -> str:
    """A dcmqi tool (PyPI dcmqi): next to the running interpreter (a venv that is not
    activated), else on PATH."""
    here = Path(sys.executable).parent / tool
    found = str(here) if here.is_file() else shutil.which(tool)
    if found is None:
        raise RuntimeError(
            f"dcmqi's {tool} not found (pip install dcmqi; deploy/test.sh installs it)"
        )
    return found


DCMTK_BIN = Path("/usr/bin")


def dcmtk(tool: str) -> str:
    """The path of a dcmtk tool (Debian package dcmtk), not pynetdicom's namesake script."""
    path = DCMTK_BIN / tool
    if not path.is_file():
        raise RuntimeError(
            f"dcmtk's {tool} is not installed (Debian package dcmtk; deploy/test.sh installs it)"
        )
    return str(path)


def to_toml(data: dict, prefix: str = "") -> str:
    """A small TOML writer for test configurations (scalars, lists, tables, arrays of tables)."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines, tables, arrays = [], [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{k} = {value(v)}")
    out = "\n".join(lines) + "\n"
    for k, v in tables:
        name = f"{prefix}{k}"
        out += f"\n[{name}]\n" + to_toml(v, name + ".")
    for k, items in arrays:
        for item in items:
            out += f"\n[[{prefix}{k}]]\n" + to_toml(item, f"{prefix}{k}.")
    return out


@dataclass
class NodeProcess:
    """`idaics serve` run as a real process, with its own configuration file."""

    config: Path
    home: Path
    port: int
    ae_title: str
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> NodeProcess:
        import os
        import sys

        env = {**os.environ, "IDAICS_CONFIG": str(self.config)}
        with open(self.home / "serve.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"idaics serve exited: {self.log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"idaics serve did not listen: {self.log()[-3000:]}")

    def log(self) -> str:
        p = self.home / "serve.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would stop it."""
        import signal

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        import os
        import signal

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def node_config(home: Path, **overrides) -> tuple[Path, dict]:
    """A configuration for a test node on loopback; returns its path and its values."""
    cfg = {
        "home": str(home),
        "database_url": "sqlite:///idaics.db",
        "receiver": {
            "ae_title": "IDAICS",
            "host": "127.0.0.1",
            "port": free_port(),
            "allowed_calling_aets": ["MODALITY", "IDAICS_TEST"],
            "min_free_mb": 10,
        },
        "series": {"quiet_seconds": 2.0, "skip_descriptions": ["scout"]},
        "workers": {"count": 1, "heartbeat_seconds": 1.0, "stale_after_seconds": 30.0},
        "sending": {"backoff_seconds": 1.0, "max_attempts": 3},
        "web": {"enabled": False},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    home.mkdir(parents=True, exist_ok=True)
    path = home / "node.toml"
    path.write_text(to_toml(cfg))
    return path, cfg


@contextmanager
def postgres():
    """A PostgreSQL server of the Debian package on a free loopback port; yields its URL."""
    import glob
    import os
    import pwd

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        raise RuntimeError(
            "PostgreSQL is not installed (Debian package postgresql; deploy/test.sh installs it)"
        )
    bin_dir = Path(bins[-1])
    import tempfile

    # its own folder: pytest's temporary folders are private to the test user, and the
    # server runs as the postgres user when the tests run as root
    workdir = Path(tempfile.mkdtemp(prefix="idaics-pg-"))
    data = workdir / "pgdata"
    sock = workdir / "pgsock"
    sock.mkdir()
    port = free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        pw = pwd.getpwnam("postgres")
        for p in (workdir, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *as_user,
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(workdir / "pg.log"),
            "-w",
            "-o",
            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(workdir, ignore_errors=True)
