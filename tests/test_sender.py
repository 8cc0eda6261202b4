"""The sender: a PACS that stalls holds only its own threads; the other destinations' results
and the workers' analyses go on meanwhile."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.config import Settings
from node.db import Delivery, DeliveryState, Job, State, make_engine, make_sessions
from node.export.delivery import queue_deliveries
from node.export.sender import Sender
from node.phantom.generate import SERIES_DIR
from tests.servers import NodeProcess, dcmtk, free_port, node_config
from tests.test_service import jobs, storescu, wait_job


@contextmanager
def stalled_pacs():
    """A peer that accepts TCP connections and never answers (a hung PACS); yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        server.close()


@contextmanager
def storescp(folder: Path, aet: str = "GOOD"):
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", aet, "-od", str(folder), "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t_end = time.monotonic() + 20
        while time.monotonic() < t_end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def result(outbox: Path) -> None:
    """A job's outbox holding one small SR, as a worker leaves it."""
    (outbox / "dicom").mkdir(parents=True)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.34", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(outbox / "dicom" / "sr.dcm", enforce_file_format=True)


def test_a_stalled_destination_holds_only_its_own_share_of_the_sender(tmp_path):
    with stalled_pacs() as hung, storescp(tmp_path / "received") as good:
        settings = Settings(
            destinations=[
                {"name": "hung", "ae_title": "HUNG", "host": "127.0.0.1", "port": hung},
                {"name": "good", "ae_title": "GOOD", "host": "127.0.0.1", "port": good},
            ],
            default_destinations=["hung", "good"],
            home=tmp_path,
            sending={
                "threads": 3,
                "per_destination": 1,
                "poll_seconds": 0.1,
                "timeout_s": 60,
                "backoff_seconds": 60,
            },
        )
        sessions = make_sessions(make_engine(f"sqlite:///{tmp_path / 'idaics.db'}"))
        with sessions() as s:
            for k in range(4):
                job = Job(
                    state=State.RUNNING,
                    study_uid=f"1.2.{k}",
                    series_uid=f"1.2.{k}.1",
                    calling_aet="CT",
                    called_aet="IDAICS",
                    outputs_dir=str(tmp_path / f"out{k}"),
                    attempts=1,
                )
                result(tmp_path / f"out{k}")
                s.add(job)
                s.flush()
                queue_deliveries(
                    s, job, settings, "w:1"
                )  # the hung destination's first, in every job
            s.commit()
        sender = Sender(sessions, settings, "sender:1")
        sender.start()
        try:
            t_end = time.monotonic() + 60
            while time.monotonic() < t_end:
                with sessions() as s:
                    good_states = [d.state for d in s.query(Delivery).filter_by(destination="good")]
                if good_states == [DeliveryState.SENT] * 4:
                    break
                time.sleep(0.1)
            assert good_states == [DeliveryState.SENT] * 4
            assert len(list((tmp_path / "received").iterdir())) == 4
            with sessions() as s:
                hung_rows = (
                    s.query(Delivery).filter_by(destination="hung").order_by(Delivery.id).all()
                )
                # every good send finished while the first try to the hung PACS is still waiting
                # for an answer, and it is the only one: one thread of three, as configured
                assert [d.attempts for d in hung_rows] == [0, 0, 0, 0]
                assert [d.held_by for d in hung_rows] == ["sender:1", None, None, None]
                assert {j.state for j in s.query(Job)} == {State.SENDING}
            assert sender.busy() == {"hung": 1}
        finally:
            sender.stop()


def test_a_stalled_pacs_does_not_hold_the_worker_back(phantoms, tmp_path):
    """With one worker, the second series is analysed while the first one's results still wait
    for a PACS that never answers: workers queue deliveries, the sender sends them. The node
    then stops at once, its sends aborted, and keeps both deliveries to try again."""
    with stalled_pacs() as hung:
        home = tmp_path / "node"
        path, cfg = node_config(
            home,
            destinations=[{"name": "hung", "ae_title": "HUNG", "host": "127.0.0.1", "port": hung}],
            default_destinations=["hung"],
            sending={"timeout_s": 120},
        )
        node = NodeProcess(path, home, cfg["receiver"]["port"], cfg["receiver"]["ae_title"]).start()
        try:
            for study in phantoms[:2]:
                assert storescu(node, study.folder / SERIES_DIR).returncode == 0
            second = wait_job(node.home, lambda j: j.state is State.SENDING, 240, index=1)
            first = jobs(node.home)[0]
            assert first.state is State.SENDING and second.state is State.SENDING
            # the first job's delivery is still on its first try (no try has ended)
            assert [d.attempts for d in first.deliveries] == [0] and first.deliveries[
                0
            ].held_by is not None
            assert "RUNNING" in second.stage_seconds
        finally:
            node.stop()
        # the node stopped on SIGTERM by itself (its sends to the hung PACS aborted), not
        # killed when its stop timed out; both deliveries are still to be sent
        assert node.proc is not None and node.proc.returncode == 0, node.proc.returncode
        assert [[d.state for d in j.deliveries] for j in jobs(node.home)] == [
            [DeliveryState.PENDING],
            [DeliveryState.PENDING],
        ]
