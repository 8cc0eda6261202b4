"""`idaics demo`: the whole node on loopback, with nothing else installed or running.

It starts a node and a receiving AE (or uses a given PACS), generates a phantom study,
sends it over C-STORE, waits for the job to finish, and prints the per-level table and
where the results are.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from pynetdicom.transport import ThreadedAssociationServer

from node.analysis.report import table
from node.config import Receiver, SeriesRules, Settings, Web
from node.db import FINAL_STATES, Job
from node.export.scu import parse_address, send_files
from node.ingest import spool
from node.phantom.generate import SERIES_DIR, generate_study
from node.service import Node

log = logging.getLogger(__name__)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ResultReceiver:
    """A small storage SCP that keeps what it receives in a folder (the demo's 'PACS')."""

    def __init__(self, folder: Path, ae_title: str = "DEMO_PACS"):
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.files: list[Path] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae = ae
        self.server: ThreadedAssociationServer | None = None

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        path = (
            self.folder
            / spool.check_uid(ds.SeriesInstanceUID, "SeriesInstanceUID")
            / f"{ds.Modality}-{spool.check_uid(ds.SOPInstanceUID, 'SOPInstanceUID')}.dcm"
        )
        spool.write_atomic(path, event.encoded_dataset())
        with self._lock:
            self.files.append(path)
        return 0x0000

    def start(self) -> None:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()


def run_demo(
    home: Path,
    slices: int = 200,
    pacs: str | None = None,
    keep_running: bool = False,
    timeout_s: float = 600,
) -> int:
    home = home.resolve()
    receiver = None
    if pacs:
        dest = parse_address(pacs, name="pacs")
    else:
        receiver = ResultReceiver(home / "received")
        receiver.start()
        dest = parse_address(f"{receiver.ae_title}@127.0.0.1:{receiver.port}", name="demo-pacs")
    settings = Settings(
        home=home,
        database_url="sqlite:///demo.db",
        receiver=Receiver(
            ae_title="IDAICS",
            host="127.0.0.1",
            port=free_port(),
            allowed_calling_aets=["DEMO_CT"],
            min_free_mb=100,
        ),
        series=SeriesRules(quiet_seconds=3),
        web=Web(host="127.0.0.1", port=free_port()),
        destinations=[dest],
        default_destinations=[dest.name],
    )
    node = Node(settings)
    node.start()
    try:
        print(f"node IDAICS listening on 127.0.0.1:{settings.receiver.port}; results go to {dest}")
        if node.web is not None:
            print(f"admin page: {node.web.url}")
        study = home / "studies"
        folder = next(iter(sorted(study.glob("study-*"))), None) if study.is_dir() else None
        if folder is None or len(list((folder / SERIES_DIR).glob("*.dcm"))) != slices:
            print(f"generating a {slices}-slice phantom study ...")
            folder = generate_study(study, 7, 0, slices=slices).folder
        files = sorted((folder / SERIES_DIR).glob("*.dcm"))
        t0 = time.perf_counter()
        send_files(files, parse_address(f"IDAICS@127.0.0.1:{settings.receiver.port}"), "DEMO_CT")
        sent_at = time.perf_counter()
        print(f"sent {len(files)} instances in {sent_at - t0:.1f} s; waiting for the results ...")
        job = None
        while time.perf_counter() - sent_at < timeout_s:
            with node.sessions() as s:
                job = s.query(Job).order_by(Job.id.desc()).first()
                if job is not None and job.state in FINAL_STATES:
                    break
            time.sleep(0.5)
        if job is None or job.state not in FINAL_STATES:
            print("the job did not finish in time; see `idaics jobs list`")
            return 1
        print(
            f"job {job.id}: {job.state.value} {job.reason or ''} ({time.perf_counter() - sent_at:.1f} s after "
            "the last instance was sent)"
        )
        if job.result:
            print(table(job.result))
        print(f"results in the node's outbox: {job.outputs_dir}")
        if receiver is not None:
            time.sleep(0.5)
            kinds: dict[str, int] = {}
            for p in receiver.files:
                kinds[p.name.split("-")[0]] = kinds.get(p.name.split("-")[0], 0) + 1
            names = {"SEG": "SEG", "SR": "SR", "OT": "key images"}
            print(
                f"received at {dest.ae_title}: "
                + ", ".join(f"{n} {names.get(k, k)}" for k, n in sorted(kinds.items()))
                + f", under {receiver.folder}"
            )
        if keep_running:
            print("the node keeps running; Ctrl-C stops it")
            node.stopped.wait()
        return 0 if job.state.value == "DONE" else 1
    finally:
        node.stop()
        if receiver is not None:
            receiver.stop()
