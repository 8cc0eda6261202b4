"""The node end to end with real processes on loopback: Orthanc as the PACS, dcmtk's storescu
and echoscu as the modality, `idaics serve` in between."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode

from node.config import Settings
from node.db import Job, State, WorkerStatus, make_engine, make_sessions
from node.ingest.scp import OUT_OF_RESOURCES, Receiver
from node.ingest.spool import SpoolError, instance_path
from node.phantom.generate import SERIES_DIR
from tests.dicom_readers import report_comments
from tests.servers import NodeProcess, dcmtk, free_port, node_config, orthanc, postgres
from tests.test_outputs import enhanced_ct

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
#: The phantom converted to one multi-frame instance and labelled Enhanced CT Image Storage:
#: the receiver and the loader read the same per-frame functional groups from either class.
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def start_node(home: Path, pacs, **overrides) -> tuple[NodeProcess, dict]:
    dest = {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
    path, cfg = node_config(home, destinations=[dest], default_destinations=["pacs"], **overrides)
    node = NodeProcess(path, home, cfg["receiver"]["port"], cfg["receiver"]["ae_title"]).start()
    return node, cfg


def jobs(home: Path) -> list[Job]:
    engine = make_engine(f"sqlite:///{home / 'idaics.db'}")
    with make_sessions(engine)() as s:
        out = s.query(Job).order_by(Job.id).all()
        for j in out:  # load what the tests look at before the session closes
            _ = (j.deliveries, j.events, j.received)
    engine.dispose()
    return out


def wait_job(home: Path, until, timeout: float = 180, index: int = -1) -> Job:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        js = jobs(home)
        if js and until(js[index]):
            return js[index]
        time.sleep(0.3)
    raise AssertionError(
        f"job did not get there in {timeout} s: {[(j.id, j.state, j.reason) for j in jobs(home)]}"
    )


def storescu(node: NodeProcess, path: Path, aet: str = "MODALITY") -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            dcmtk("storescu"),
            "-aet",
            aet,
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            "-R",
            "+sd",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def echoscu(node: NodeProcess, aet: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", aet, "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def in_pacs(pacs, study_uid: str, modality: str) -> list[Dataset]:
    found = pacs.post_json(
        "/tools/find",
        {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": modality}},
    )
    return [pydicom.dcmread(pacs.get_file(f"/instances/{i}/file")) for i in found]


def test_a_study_from_the_modality_comes_back_to_the_pacs_as_seg_and_sr(
    phantom, pacs, tmp_path, shared_data, monkeypatch
):
    # 5.5 mm slices accepted, so that the real head CT below reaches the analysis
    node, _ = start_node(tmp_path / "node", pacs, series={"max_slice_thickness_mm": 6.0})
    try:
        sent = storescu(node, phantom.folder / SERIES_DIR)
        assert sent.returncode == 0, sent.stderr[-2000:]
        job = wait_job(node.home, lambda j: j.state in (State.DONE, State.FAILED, State.SKIPPED))
        assert job.state is State.DONE, (job.reason, node.log()[-3000:])
        assert job.instances == 150 and job.calling_aet == "MODALITY"
        assert set(job.stage_seconds) >= {"RECEIVING", "QUEUED", "RUNNING", "SENDING"}
        study = phantom.truth["study_instance_uid"]
        ct_series = pydicom.dcmread(next((phantom.folder / SERIES_DIR).iterdir())).SeriesInstanceUID
        (seg,) = in_pacs(pacs, study, "SEG")
        (sr,) = in_pacs(pacs, study, "SR")
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        assert ct_series in {x.SeriesInstanceUID for x in evidence}
        assert len(in_pacs(pacs, study, "OT")) == 2 * len(job.result["levels"])
        levels = {lv["level"] for lv in job.result["levels"]}
        assert {lv["level"] for lv in phantom.truth["levels"]} <= levels
        # what the node wrote is its own: spool folders 0700, instances, results and database 0600
        spooled = Path(job.received[0].path)
        for path in (
            spooled,
            spooled.parent,
            node.home / "idaics.db",
            next(node.home.rglob("sr.dcm")),
        ):
            assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))

        # the same study again: every instance is a duplicate, no new job
        again = storescu(node, phantom.folder / SERIES_DIR)
        assert again.returncode == 0  # each Success came after its instance was recorded
        assert [j.id for j in jobs(node.home)] == [job.id]

        # a SEG of a study the node never analysed is received, then skipped with the reason
        # (a SEG of one it did is a radiologist's correction: tests/test_cases.py)
        seg_file = shared_data / "real" / "third_party_seg_sr" / "liver.dcm"
        assert storescu(node, seg_file).returncode == 0
        skipped = wait_job(node.home, lambda j: j.id != job.id and j.state is State.SKIPPED, 60)
        assert "which the node has not analysed" in skipped.reason, skipped.reason

        # a CT series the node cannot analyse (a head CT of two slice spacings): SKIPPED with the
        # reason, and a report in the PACS that says so (no SEG)
        head = shared_data / "real" / "ge_head_ct_gantry_tilt"
        head_study = pydicom.dcmread(next(head.iterdir()), stop_before_pixels=True).StudyInstanceUID
        assert storescu(node, head).returncode == 0
        refused = wait_job(
            node.home,
            lambda j: (
                j.study_uid == head_study and j.state in (State.DONE, State.FAILED, State.SKIPPED)
            ),
            120,
        )
        assert refused.state is State.SKIPPED and "slice spacing varies" in refused.reason, (
            refused.reason
        )
        (report,) = in_pacs(pacs, head_study, "SR")
        assert report.SeriesDescription == "IDAICS report: series not analysed"
        assert refused.reason in report_comments(report)[0] and not in_pacs(pacs, head_study, "SEG")
        assert [d.state.value for d in refused.deliveries] == ["SENT"]

        # an unknown calling AE is refused at association; a known one is served
        refused = echoscu(node, "STRANGER")
        assert refused.returncode != 0 and "Rejected" in (refused.stdout + refused.stderr)
        assert echoscu(node, "MODALITY").returncode == 0

        # a dataset that cannot be parsed gets 0xC000, and the node goes on serving
        assert send_malformed(node, monkeypatch) == 0xC000
        assert echoscu(node, "MODALITY").returncode == 0
        assert (
            "could not understand an instance from IDAICS_TEST: element (0010,0010) is cut off"
            in node.log()
        )

        # the same study as one Enhanced CT instance: received, analysed, results in the PACS
        enh = enhanced_ct(phantom.folder / SERIES_DIR, ENHANCED_CT)
        assert store(node, enh) == 0x0000
        final = (State.DONE, State.FAILED, State.SKIPPED)
        ej = wait_job(
            node.home, lambda j: j.series_uid == enh.SeriesInstanceUID and j.state in final
        )
        assert ej.state is State.DONE, ej.reason
        refs = {
            s.ReferencedSeriesSequence[0].SeriesInstanceUID for s in in_pacs(pacs, study, "SEG")
        }
        assert refs == {ct_series, enh.SeriesInstanceUID}
    finally:
        node.stop()


def wait_until(ready, timeout: float = 30.0) -> None:
    """Wait for an event the test cannot be told of otherwise (polled, never a fixed sleep)."""
    t_end = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > t_end:
            raise AssertionError(f"not there in {timeout} s")
        time.sleep(0.05)


def store(node: NodeProcess, ds: Dataset, aet: str = "IDAICS_TEST") -> int:
    ae = AE(ae_title=aet)
    ae.dimse_timeout = 300  # one large multi-frame instance, on a busy machine
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def send_malformed(node: NodeProcess, monkeypatch) -> int:
    """A C-STORE whose dataset is cut off inside its last element: valid UIDs, then a patient
    name that claims 32766 bytes and has 8. pynetdicom's encoder is replaced for this one
    message, since a well-behaved SCU library would not encode such a dataset."""
    import pynetdicom.association

    uid = "1.2.826.0.1.3680043.8.498.1"
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        "1.2.826.0.1.3680043.8.498.2",
        "1.2.826.0.1.3680043.8.498.3",
    )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    good = encode(ds, False, True)
    monkeypatch.setattr(
        pynetdicom.association,
        "encode",
        lambda *args, **kwargs: good + b"\x10\x00\x10\x00PN\xfe\x7f" + b"DOE^JOHN",
    )
    try:
        return store(node, ds)
    finally:
        monkeypatch.undo()


def test_a_node_killed_while_it_runs_a_job_finishes_it_after_restart(phantom, pacs, tmp_path):
    home = tmp_path / "node"
    node, _ = start_node(home, pacs)
    try:
        assert storescu(node, phantom.folder / SERIES_DIR).returncode == 0
        running = wait_job(home, lambda j: j.state is State.RUNNING, 120)
        node.kill()
        worker_pid = int(running.worker.rsplit(":", 1)[1])
        from node.worker import pid_alive

        t_end = time.monotonic() + 10
        while pid_alive(worker_pid) and time.monotonic() < t_end:
            time.sleep(0.1)
        assert not pid_alive(worker_pid), "the worker outlived the node"
        assert jobs(home)[-1].state is State.RUNNING  # as the crash left it
        node.start()
        job = wait_job(home, lambda j: j.state in (State.DONE, State.FAILED), 180)
        assert job.state is State.DONE, job.reason
        assert job.attempts == 2 and job.instances == 150 and len(job.received) == 150
        assert "requeued" in [e.event for e in job.events]
        assert all(Path(i.path).is_file() for i in job.received)
        study = phantom.truth["study_instance_uid"]
        assert len(in_pacs(pacs, study, "SEG")) >= 1 and len(in_pacs(pacs, study, "SR")) >= 1
    finally:
        node.stop()


def test_below_the_free_space_floor_the_answer_is_out_of_resources(phantom, tmp_path):
    settings = Settings(
        home=tmp_path, receiver={"host": "127.0.0.1", "port": free_port(), "min_free_mb": 10**9}
    )
    sessions = make_sessions(make_engine(settings.database_url))
    rx = Receiver(settings, sessions, "test")
    rx.start()
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CT_IMAGE)
        assoc = ae.associate("127.0.0.1", settings.receiver.port, ae_title="IDAICS")
        ds = pydicom.dcmread(next((phantom.folder / SERIES_DIR).iterdir()))
        status = assoc.send_c_store(ds)
        assoc.release()
        assert int(status.Status) == OUT_OF_RESOURCES
        assert not (tmp_path / "spool" / "incoming").exists()
    finally:
        rx.stop()


@pytest.mark.parametrize("uid", ["../../etc", "1.2.3/4", "1.2..3", "", "1" * 65, "1.2.3\x00x"])
def test_no_received_value_becomes_a_path_without_being_a_uid(tmp_path, uid):
    with pytest.raises(SpoolError):
        instance_path(tmp_path, "1.2.3", "1.2.4", uid)


def test_the_node_runs_on_postgresql(phantom, pacs, tmp_path):
    with postgres() as url:
        home = tmp_path / "node"
        node, _ = start_node(home, pacs, database_url=url)
        try:
            assert storescu(node, phantom.folder / SERIES_DIR).returncode == 0
            engine = make_engine(url)
            sessions = make_sessions(engine)
            t_end = time.monotonic() + 180
            job = None
            while time.monotonic() < t_end:
                with sessions() as s:
                    job = s.query(Job).order_by(Job.id.desc()).first()
                    if job is not None and job.state in (State.DONE, State.FAILED, State.SKIPPED):
                        break
                time.sleep(0.3)
            engine.dispose()
            assert job is not None and job.state is State.DONE, job and job.reason
            assert not (home / "idaics.db").exists()  # nothing went to the embedded default
            assert len(in_pacs(pacs, phantom.truth["study_instance_uid"], "SR")) >= 1
        finally:
            node.stop()


def test_associations_beyond_the_cap_are_refused(tmp_path):
    settings = Settings(
        home=tmp_path, receiver={"host": "127.0.0.1", "port": free_port(), "max_associations": 2}
    )
    rx = Receiver(settings, make_sessions(make_engine(settings.database_url)), "test")
    rx.start()
    held = []
    try:
        for _ in range(3):
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context("1.2.840.10008.1.1")
            held.append(ae.associate("127.0.0.1", settings.receiver.port, ae_title="IDAICS"))
        assert [a.is_established for a in held] == [True, True, False]
        assert held[2].is_rejected
    finally:
        for a in held:
            if a.is_established:
                a.release()
        rx.stop()


def test_a_series_sent_over_two_associations_completes_only_when_both_are_released(
    phantom, tmp_path
):
    from node.config import SeriesRules
    from node.jobs import complete_series

    settings = Settings(
        home=tmp_path, receiver={"host": "127.0.0.1", "port": free_port(), "min_free_mb": 10}
    )
    sessions = make_sessions(make_engine(settings.database_url))
    rx = Receiver(settings, sessions, "test")
    rx.start()
    rules = SeriesRules(
        quiet_seconds=3600, grace_seconds=0.2
    )  # only the early completion can complete it
    files = sorted((phantom.folder / SERIES_DIR).glob("*.dcm"))

    def connect():
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", settings.receiver.port, ae_title="IDAICS")
        assert assoc.is_established
        return assoc

    def state() -> State:
        time.sleep(
            rules.grace_seconds
        )  # the grace after the last instance, which completion waits for
        with sessions() as s:
            complete_series(s, rules, "test")
            s.commit()
            return s.query(Job).one().state

    def released() -> bool:
        with sessions() as s:
            return s.query(Job).one().association_released

    try:
        a, b = connect(), connect()
        for f in files[75:100]:
            assert b.send_c_store(f).Status == 0
        for f in files[:75]:  # the stack so far is even and has no gap, and a sent the last one
            assert a.send_c_store(f).Status == 0
        a.release()
        wait_until(lambda: len(rx._open) == 1)  # the listener has forgotten a
        assert state() is State.RECEIVING  # b still carries the series
        for f in files[100:]:
            assert b.send_c_store(f).Status == 0
        b.release()
        wait_until(lambda: released())  # the listener has recorded that no association carries it
        assert state() is State.QUEUED
        with sessions() as s:
            assert s.query(Job).one().instances == 150
    finally:
        rx.stop()


def test_a_series_sent_again_in_full_after_a_pause_ends_as_one_analysis_of_all_instances(
    phantom, pacs, tmp_path
):
    """The modality sends half the series, pauses until the node has analysed it, then sends
    the whole series: the last job covers all 150 slices and its report replaces the first."""
    node, _ = start_node(tmp_path / "node", pacs)
    files = sorted((phantom.folder / SERIES_DIR).glob("*.dcm"))
    half = tmp_path / "half"
    half.mkdir()
    for f in files[:75]:
        (half / f.name).symlink_to(f)
    final = (State.DONE, State.FAILED, State.SKIPPED)
    try:
        assert storescu(node, half).returncode == 0
        first = wait_job(node.home, lambda j: j.state in final)
        assert first.instances == 75
        assert storescu(node, phantom.folder / SERIES_DIR).returncode == 0
        last = wait_job(node.home, lambda j: j.id != first.id and j.state in final)
        assert last.state is State.DONE, (last.reason, node.log()[-3000:])
        assert last.instances == 150 and len({i.sop_instance_uid for i in last.received}) == 150
        history = jobs(node.home)
        assert [j.id for j in history] == [first.id, last.id]
        assert any(
            e.event == "superseded" and f"by job {last.id}" in e.detail for e in history[0].events
        )
        assert any(f"supersedes job {first.id}" in (e.detail or "") for e in history[1].events)
        older, newer = (pydicom.dcmread(Path(j.outputs_dir) / "dicom" / "sr.dcm") for j in history)
        in_the_pacs = {
            d.SOPInstanceUID: d for d in in_pacs(pacs, phantom.truth["study_instance_uid"], "SR")
        }
        assert {older.SOPInstanceUID, newer.SOPInstanceUID} <= set(in_the_pacs)
        ref = in_the_pacs[newer.SOPInstanceUID].PredecessorDocumentsSequence[0]
        sop = ref.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert sop.ReferencedSOPInstanceUID == older.SOPInstanceUID
    finally:
        node.stop()


@pytest.mark.parametrize("after_s", [0.5, 3.0])
def test_a_node_killed_early_leaves_no_process_behind(tmp_path, after_s):
    """kill -9 of the node while its workers are still starting: none of them lives on, and
    none takes a job (workers are in the node's process group, which must empty)."""
    import os
    import signal
    import sys

    home = tmp_path / "node"
    path, _ = node_config(home)
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "IDAICS_CONFIG": str(path)},
        start_new_session=True,
    )
    time.sleep(after_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 30
    left = True
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            left = False
            break
        time.sleep(0.2)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, "a process of the killed node was still alive 30 s later"


def test_two_worker_hosts_on_one_postgresql_finish_the_job_of_the_one_that_died(
    phantoms, pacs, tmp_path
):
    """Scale-out: the node (listener and scheduler, no worker of its own) and two worker
    processes with their own host names share one PostgreSQL and one spool. The first host is
    killed in the middle of the job; the second finishes it; one set of results is sent."""
    import os
    import signal
    import sys

    study = phantoms[1]
    final = (State.DONE, State.FAILED, State.SKIPPED)

    def start_worker(path: Path, host: str) -> subprocess.Popen:
        env = {**os.environ, "IDAICS_CONFIG": str(path), "IDAICS_HOST_NAME": host}
        return subprocess.Popen(
            [sys.executable, "-m", "node.cli", "worker"],
            env=env,
            start_new_session=True,
            stdout=open(path.parent / f"{host}.log", "ab"),
            stderr=subprocess.STDOUT,
        )

    with postgres() as url:
        dest = {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        home = tmp_path / "node"
        path, cfg = node_config(
            home,
            database_url=url,
            destinations=[dest],
            default_destinations=["pacs"],
            workers={"count": 0, "heartbeat_seconds": 1.0, "stale_after_seconds": 4.0},
        )
        node = NodeProcess(path, home, cfg["receiver"]["port"], cfg["receiver"]["ae_title"]).start()
        sessions = make_sessions(make_engine(url))

        def the_job() -> Job | None:
            with sessions() as s:
                job = s.query(Job).order_by(Job.id.desc()).first()
                if job is not None:
                    _ = (job.events, job.deliveries)
                return job

        def wait(until, timeout: float = 240) -> Job:
            t_end = time.monotonic() + timeout
            while time.monotonic() < t_end:
                job = the_job()
                if job is not None and until(job):
                    return job
                time.sleep(0.2)
            raise AssertionError(
                f"no job got there: {the_job() and (the_job().state, the_job().reason)}"
            )

        a = start_worker(path, "host-a")
        b = None
        try:
            with sessions() as s:  # host-a is ready before the study arrives, so it takes the job
                t_end = time.monotonic() + 120
                while not s.query(WorkerStatus).filter(WorkerStatus.name.like("host-a:%")).count():
                    assert time.monotonic() < t_end, "host-a never came up"
                    time.sleep(0.3)
                    s.expire_all()
            assert storescu(node, study.folder / SERIES_DIR).returncode == 0
            running = wait(lambda j: j.state is State.RUNNING)
            assert running.worker.startswith("host-a:")
            os.killpg(a.pid, signal.SIGKILL)  # the host dies mid-job
            a.wait(10)
            b = start_worker(path, "host-b")
            done = wait(lambda j: j.state in final)
            assert done.state is State.DONE, (done.reason, node.log()[-2000:])
            assert (
                done.id == running.id and done.worker.startswith("host-b:") and done.attempts == 2
            )
            assert any(e.event == "requeued" and "host-a:" in (e.detail or "") for e in done.events)
            assert [d.state.value for d in done.deliveries] == ["SENT"]
            uid = study.truth["study_instance_uid"]
            assert len(in_pacs(pacs, uid, "SEG")) == 1 and len(in_pacs(pacs, uid, "SR")) == 1
            with sessions() as s:
                assert s.query(Job).count() == 1
        finally:
            for p in (a, b):
                if p is not None and p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            node.stop()
