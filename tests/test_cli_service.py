"""The service commands: `idaics echo`, `send`, `worker`, `jobs`, `demo`; configuration and
retention."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.cli import main
from node.config import Settings, load_settings
from node.db import Instance, Job, State, utcnow
from node.demo import ResultReceiver
from node.phantom.generate import SERIES_DIR
from node.service import Node
from tests.servers import NodeProcess, node_config, to_toml
from tests.test_service import jobs, wait_job


def test_a_receive_only_node_and_a_separate_worker_with_the_commands(phantom, tmp_path, capsys):
    pacs = ResultReceiver(tmp_path / "pacs")
    pacs.start()
    home = tmp_path / "node"
    dest = {"name": "local", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}
    cfg, values = node_config(
        home, workers={"count": 0}, destinations=[dest], routes={"MODALITY": ["local"]}
    )
    node = NodeProcess(cfg, home, values["receiver"]["port"], "IDAICS").start()
    address = f"IDAICS@127.0.0.1:{node.port}"
    try:
        assert main(["echo", address, "--calling-aet", "MODALITY"]) == 0
        assert "status 0x0000 (success)" in capsys.readouterr().out
        assert main(["echo", address, "--calling-aet", "STRANGER"]) == 1
        assert (
            main(["send", str(phantom.folder / SERIES_DIR), address, "--calling-aet", "MODALITY"])
            == 0
        )
        assert "150 instances stored" in capsys.readouterr().out
        wait_job(
            home, lambda j: j.state is State.QUEUED, 60
        )  # no worker on the receiving node: it waits
        time.sleep(1)
        assert jobs(home)[-1].state is State.QUEUED

        # a worker elsewhere, against the same database and spool
        env = {**os.environ, "IDAICS_CONFIG": str(cfg)}
        run = subprocess.run(
            [sys.executable, "-m", "node.cli", "worker", "--once"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        (job,) = jobs(home)
        assert job.state is State.DONE, job.reason
        assert len([p for p in pacs.files if p.name.startswith("SEG-")]) == 1

        assert main(["--config", str(cfg), "jobs", "list"]) == 0
        listed = capsys.readouterr().out
        assert "DONE" in listed and "MODALITY" in listed
        assert main(["--config", str(cfg), "jobs", "show", "1"]) == 0
        shown = capsys.readouterr().out
        assert "L4-L5" in shown and "delivery 1 to local" in shown and "SENDING->DONE" in shown
        assert main(["--config", str(cfg), "jobs", "resend", "1"]) == 0
        assert "1 of 1 deliveries sent now" in capsys.readouterr().out
        assert len([p for p in pacs.files if p.name.startswith("SEG-")]) == 2
        assert main(["--config", str(cfg), "jobs", "retry", "1"]) == 0
        assert jobs(home)[-1].state is State.QUEUED
        assert main(["--config", str(cfg), "jobs", "show", "99"]) == 2
    finally:
        node.stop()
        pacs.stop()


def test_demo_runs_the_whole_node_on_loopback(tmp_path, capsys):
    assert main(["demo", "--home", str(tmp_path / "demo"), "--slices", "150"]) == 0
    out = capsys.readouterr().out
    assert "job 1: DONE" in out and "L5-S1" in out
    # two key images (axial and sagittal) per level in the table
    levels = re.findall(r"^\s*(?:T12|L\d)-(?:L\d|S1)\b", out, flags=re.M)
    assert len(levels) >= 5
    assert f"received at DEMO_PACS: {2 * len(levels)} key images, 1 SEG, 1 SR" in out


def test_routes_send_each_caller_to_its_destinations_and_bad_names_are_refused(tmp_path):
    dests = [{"name": n, "ae_title": n.upper(), "host": "h", "port": 104} for n in ("a", "b")]
    s = Settings(
        home=tmp_path, destinations=dests, routes={"CT1": ["a", "b"]}, default_destinations=["b"]
    )
    assert [d.name for d in s.destinations_for("CT1")] == ["a", "b"]
    assert [d.name for d in s.destinations_for("OTHER")] == ["b"]
    with pytest.raises(ValueError, match="unknown destination"):
        Settings(home=tmp_path, destinations=dests, default_destinations=["c"])
    with pytest.raises(ValueError, match="not a valid AE title"):
        Settings(home=tmp_path, receiver={"ae_title": "A\\B"})
    with pytest.raises(ValueError, match="unknown output object"):
        Settings(home=tmp_path, outputs={"objects": ["seg", "pdf"]})


def test_the_configuration_file_and_environment_variables(tmp_path, monkeypatch):
    path = tmp_path / "node.toml"
    path.write_text(
        to_toml({"home": str(tmp_path), "receiver": {"port": 11999, "ae_title": "FROMFILE"}})
    )
    monkeypatch.setenv("IDAICS_RECEIVER__PORT", "12000")
    s = load_settings(path)
    assert (s.receiver.ae_title, s.receiver.port) == ("FROMFILE", 12000)  # the environment wins
    assert (
        s.spool_dir == tmp_path / "spool"
        and s.database_url == f"sqlite:///{tmp_path / 'idaics.db'}"
    )
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")
    assert (
        load_settings(Path(__file__).parents[1] / "config" / "node.toml").receiver.ae_title
        == "IDAICS"
    )


def test_retention_removes_spooled_instances_of_old_done_jobs(tmp_path):
    s = Settings(
        home=tmp_path, retention={"delete_instances_after_hours": 1}, web={"enabled": False}
    )
    node = Node(s)
    files = []
    with node.sessions() as db:
        for i, age_h in enumerate((2, 0)):
            f = s.spool_dir / "incoming" / "1.2" / f"1.2.{i}" / "1.dcm"
            f.parent.mkdir(parents=True)
            f.write_bytes(b"x")
            files.append(f)
            job = Job(
                state=State.DONE,
                study_uid="1.2",
                series_uid=f"1.2.{i}",
                calling_aet="M",
                called_aet="I",
                stage_seconds={},
                state_since=utcnow() - dt.timedelta(hours=age_h),
            )
            job.received = [
                Instance(sop_instance_uid="1", sop_class_uid="1.2", path=str(f), size=1)
            ]
            db.add(job)
        db.commit()
    node.clean_up()
    assert not files[0].exists() and not files[0].parent.exists() and files[1].exists()
    with node.sessions() as db:
        old, new = db.query(Job).order_by(Job.id).all()
        assert old.instances_deleted and not new.instances_deleted
        assert old.events[-1].event == "instances removed"
    node.engine.dispose()


def test_temporary_files_of_unfinished_writes_are_removed_and_recent_ones_kept(tmp_path):
    s = Settings(home=tmp_path, web={"enabled": False})
    node = Node(s)
    folder = s.spool_dir / "incoming" / "1.2" / "1.2.3"
    folder.mkdir(parents=True)
    old, recent, kept = folder / ".1.dcm.11.22.tmp", folder / ".2.dcm.11.22.tmp", folder / "3.dcm"
    for f in (old, recent, kept):
        f.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    os.utime(kept, (an_hour_ago, an_hour_ago))
    node.clean_up()  # also run when the node starts
    assert not old.exists() and recent.exists() and kept.exists()
    node.engine.dispose()


def test_received_files_without_a_row_are_removed_at_start_and_recorded_ones_kept(tmp_path):
    s = Settings(home=tmp_path, web={"enabled": False})
    node = Node(s)
    folder = s.spool_dir / "incoming" / "1.2" / "1.2.3"
    folder.mkdir(parents=True)
    recorded, unrecorded, recent = folder / "1.dcm", folder / "2.dcm", folder / "3.dcm"
    for f in (recorded, unrecorded, recent):
        f.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    for f in (recorded, unrecorded):
        os.utime(f, (an_hour_ago, an_hour_ago))
    node.remove_unrecorded()  # a database that knows no instance judges no file
    assert unrecorded.exists()
    with node.sessions() as db:
        job = Job(
            state=State.DONE,
            study_uid="1.2",
            series_uid="1.2.3",
            calling_aet="M",
            called_aet="I",
            stage_seconds={},
        )
        job.received = [
            Instance(sop_instance_uid="1", sop_class_uid="1.2", path=str(recorded), size=1)
        ]
        db.add(job)
        db.commit()
    node.remove_unrecorded()
    assert recorded.exists() and recent.exists() and not unrecorded.exists()
    node.engine.dispose()


def test_a_job_whose_results_do_not_fit_waits_for_disk_space_without_spending_attempts(
    tmp_path, monkeypatch
):
    import errno

    import node.worker as worker
    from node.db import make_engine, make_sessions
    from node.jobs import claim

    s = Settings(home=tmp_path, web={"enabled": False}, receiver={"min_free_mb": 10})
    sessions = make_sessions(make_engine(s.database_url))
    with sessions() as db:
        db.add(
            Job(
                state=State.QUEUED,
                study_uid="1.2",
                series_uid="1.2.9",
                calling_aet="M",
                called_aet="I",
                stage_seconds={},
            )
        )
        db.commit()
        job = claim(db, "w:1")

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(worker, "process_job", full)
    assert worker.run_claimed(s, sessions, None, job, "w:1") is False
    with sessions() as db:
        j = db.get(Job, job.id)
        assert (
            j.state is State.QUEUED
            and j.attempts == 0
            and j.reason.startswith("waiting for disk space")
        )
    monkeypatch.setattr(worker.spool, "free_mb", lambda _p: 5.0)
    assert worker.disk_full(s)  # below the floor no job is claimed
    monkeypatch.setattr(worker.spool, "free_mb", lambda _p: 500.0)
    assert not worker.disk_full(s)

    def broken(*_a, **_k):
        raise RuntimeError("first line\nsecond line of a long message")

    monkeypatch.setattr(worker, "process_job", broken)
    with sessions() as db:
        job = claim(db, "w:1")
    assert worker.run_claimed(s, sessions, None, job, "w:1") is True
    with sessions() as db:
        j = db.get(Job, job.id)
        assert (
            j.state is State.QUEUED
            and j.attempts == 1
            and j.reason == "attempt 1: RuntimeError: first line"
        )


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("node.config", ("highdicom", "scipy", "cv2", "torch", "node.analysis.study")),
        ("node.export.scu", ("pydantic", "highdicom", "scipy", "torch")),
        ("node.cli", ("pydicom", "pydantic", "numpy", "torch")),
    ],
)
def test_the_start_up_paths_load_nothing_heavy(module, heavy):
    """What `idaics --help`, `idaics echo` and the configuration import: not the analysis,
    and for echo not the configuration's pydantic (tests/bench/bench_startup.py times them)."""
    code = f"import sys, {module}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} loads {out.stdout.strip()}"
