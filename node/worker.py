"""Workers: claim a queued job, analyse its series, write the DICOM results and queue their
deliveries (the node's sender, `node.export.sender`, sends them).

Each worker is a process that loads the model once and keeps it warm. While it runs a job
it beats a heartbeat into the job's row; a job whose worker dies is queued again by the
node (see `node.jobs.requeue_stale`). `idaics worker` runs workers alone, against a shared
database and spool, so that GPU hosts can be added.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from node import cases, logs
from node.analysis.report import write_json, write_previews
from node.analysis.study import analyze_volume
from node.analysis.volume import VolumeError, load_series
from node.config import Settings
from node.db import Job, State, WorkerStatus, actor, host_name, make_engine, make_sessions, utcnow
from node.export.delivery import queue_deliveries
from node.inference.model import DiscModel, ModelError, load_model
from node.ingest import spool
from node.ingest.series import is_seg
from node.jobs import claim, heartbeat, predecessor, transition
from node.outputs import build_outputs, write_outputs
from node.outputs.build import DicomOutputs, warm_up
from node.outputs.sr import build_not_analysed_sr
from node.registry import Registry
from node.shadow import run_shadow

log = logging.getLogger(__name__)


def _die_with_parent(parent: int | None) -> None:
    """Ask Linux to kill this process when its parent dies (a killed node leaves no orphan).

    A parent that died before the request (while this process was still starting) is seen
    by the parent pid having changed: the process then ends at once, before any job. A
    watchdog thread checks the same once a second where the request is not available.
    """
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the watchdog alone
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent is None:
        return
    if os.getppid() != parent:
        os._exit(0)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="idaics-parent-watch", daemon=True).start()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers; look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def dead_here(worker: str) -> bool:
    """Whether a worker named "host:pid" ran on this host and its process is gone."""
    host, _, pid = worker.rpartition(":")
    return host == host_name() and pid.isdigit() and not pid_alive(int(pid))


class _Heartbeat:
    def __init__(self, sessions: sessionmaker, job_id: int, worker: str, every: float) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(sessions, job_id, worker, every), daemon=True
        )

    def _run(self, sessions: sessionmaker, job_id: int, worker: str, every: float) -> None:
        while not self.stop.wait(every):
            try:
                with sessions() as s:
                    heartbeat(s, job_id, worker)
            except SQLAlchemyError as exc:  # the database may be busy; the next beat tries again
                log.warning("heartbeat of job %s: %s", job_id, exc)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def previous_reports(outputs_dir: Path) -> list:
    """The SR(s) an earlier job of the series wrote, which a new analysis replaces."""
    import pydicom

    out = []
    for path in sorted((outputs_dir / "dicom").glob("sr*.dcm")):
        try:
            out.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            log.warning("could not read the earlier report %s: %s", path, exc)
    return out


def process_job(
    settings: Settings, sessions: sessionmaker, model: DiscModel, job_id: int, worker: str
) -> None:
    """Analyse one claimed (RUNNING) job and hand its results to the sender; a series of SEGs
    is read as radiologists' corrections instead (`node.cases`)."""
    with sessions() as s:
        job = s.get(Job, job_id)
        paths = [Path(i.path) for i in job.received]
        correction = is_seg({i.sop_class_uid for i in job.received})
        before = predecessor(s, job)
        previous = (
            previous_reports(Path(before.outputs_dir))
            if before is not None and before.outputs_dir
            else []
        )
    if correction and settings.corrections.enabled:
        cases.take(settings, sessions, job_id, worker)
        return
    out = spool.outbox(settings.spool_dir, job_id)
    try:
        vol = load_series(paths)
        result = analyze_volume(vol, model)
    except VolumeError as exc:
        report_not_analysed(
            settings, sessions, model, job_id, worker, State.SKIPPED, f"cannot analyse: {exc}"
        )
        return
    outputs = build_outputs(
        result, vol, model.card, settings.outputs.settings(socket.gethostname()), previous
    )
    if out.exists():
        shutil.rmtree(out)
    write_outputs(outputs, out / "dicom")
    write_json(result, out / "result.json")
    write_previews(result, vol, out / "previews", model.card.windowing, model.card.views)
    with sessions() as s:
        job = s.get(Job, job_id)
        if job.state is not State.RUNNING or job.worker != worker:
            log.warning("job %s was taken from this worker while it ran; results discarded", job_id)
            return
        live = result.to_dict()
        job.result = {
            **live,
            "objects": [n for n, _ in outputs.datasets()],
            "output_timings_s": {k: round(v, 3) for k, v in outputs.timings.items()},
        }
        job.outputs_dir = str(out)
        queue_deliveries(
            s, job, settings, worker
        )  # the sender delivers them; this worker analyses on
        s.commit()
    shadow = Registry(settings).shadow()
    if shadow is not None and shadow.resolve() != model.card.folder.resolve():
        run_shadow(sessions, job_id, vol, live, shadow, settings.workers.device)  # never sent


def report_not_analysed(
    settings: Settings,
    sessions: sessionmaker,
    model: DiscModel,
    job_id: int,
    worker: str,
    final: State,
    reason: str,
) -> None:
    """End a job that could not be analysed in ``final`` (SKIPPED or FAILED) with ``reason``,
    after sending its destinations an SR that says so (where the SR is among the objects):
    in PACS the series then has an answer, not the look of one still waiting."""
    with sessions() as s:
        job = s.get(Job, job_id)
        paths = [Path(i.path) for i in job.received]
        dests = settings.destinations_for(job.calling_aet)
    headers = []
    for p in paths:
        try:
            headers.append(pydicom.dcmread(p, stop_before_pixels=True))
        except (OSError, InvalidDicomError) as exc:
            log.warning("job %s: %s not read for the report: %s", job_id, p.name, exc)
    objects = settings.outputs.settings(socket.gethostname())
    written = False
    if headers and dests and "sr" in objects.objects:
        try:
            sr = build_not_analysed_sr(headers, reason, objects, model.card.name)
            out = spool.outbox(settings.spool_dir, job_id)
            if out.exists():
                shutil.rmtree(out)
            write_outputs(DicomOutputs(None, sr, (), ()), out / "dicom")
            written = True
        except (
            ValueError,
            AttributeError,
            OSError,
        ) as exc:  # e.g. instances without a study's attributes
            log.warning("job %s: no report of the reason could be made: %s", job_id, exc)
    with sessions() as s:
        job = s.get(Job, job_id)
        if job.state is not State.RUNNING or job.worker != worker:
            return
        if not written:
            transition(s, job, final, worker, reason)
        else:
            job.result = {
                "analysed": False,
                "final_state": final.value,
                "reason": reason,
                "objects": ["sr.dcm"],
            }
            job.outputs_dir = str(spool.outbox(settings.spool_dir, job_id))
            job.reason = reason
            queue_deliveries(s, job, settings, worker)
        s.commit()


NO_SPACE_WAIT_S = 30.0
#: OSError numbers that mean the disk is full: the job waits for space, its attempts not spent.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def run_claimed(
    settings: Settings, sessions: sessionmaker, model: DiscModel, job: Job, worker: str
) -> bool:
    """Run a claimed job; an unexpected error queues it again, or fails it after the last attempt.
    Returns False when the results did not fit on the spool's disk (the job is queued again
    without spending an attempt, and workers claim nothing until space returns)."""
    with logs.job(job.id), _Heartbeat(sessions, job.id, worker, settings.workers.heartbeat_seconds):
        try:
            process_job(settings, sessions, model, job.id, worker)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                return _failed(settings, sessions, model, job, worker, exc)
            log.error(
                "job %s: no space for its results on the spool's disk (%s); queued again",
                job.id,
                exc,
            )
            with sessions() as s:
                j = s.get(Job, job.id)
                if j.state is State.RUNNING:
                    j.attempts = max(0, (j.attempts or 1) - 1)
                    transition(
                        s,
                        j,
                        State.QUEUED,
                        worker,
                        "waiting for disk space: the results did not fit "
                        f"on the spool's disk ({exc.strerror or exc})",
                    )
                    s.commit()
            return False
        except Exception as exc:
            return _failed(settings, sessions, model, job, worker, exc)
    return True


def _failed(
    settings: Settings,
    sessions: sessionmaker,
    model: DiscModel,
    job: Job,
    worker: str,
    exc: Exception,
) -> bool:
    """An unexpected error: queued again, or FAILED (with a report) after the last attempt; the
    reason is one line (the traceback goes to the log)."""
    log.exception("job %s failed on attempt %d", job.id, job.attempts)
    with sessions() as s:
        j = s.get(Job, job.id)
        final, why = False, ""
        if j.state is State.RUNNING:
            why = f"attempt {j.attempts}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            final = j.attempts >= settings.workers.max_attempts
            if not final:
                transition(s, j, State.QUEUED, worker, why)
                s.commit()
    if final:
        report_not_analysed(
            settings, sessions, model, job.id, worker, State.FAILED, f"analysis failed: {why}"
        )
    return True


def disk_full(settings: Settings) -> bool:
    """Below the spool's free-space floor: no job is claimed (its results would not fit)."""
    return spool.free_mb(settings.spool_dir) < settings.receiver.min_free_mb


def work(settings: Settings, stop: threading.Event | None = None, once: bool = False) -> None:
    """The worker loop: claim, run, repeat until ``stop`` is set."""
    stop = stop or threading.Event()
    engine = make_engine(settings.database_url)
    sessions = make_sessions(engine)
    registry = Registry(settings)
    live = registry.live()
    model = load_model(live, settings.workers.device)
    warm_up()  # the DICOM standard's tables the first SEG and SR would read
    name = actor()
    log.info("worker %s ready: model %s on %s", name, model.card.name, model.device)
    seen = 0.0
    full = False
    said = ""  # the last complaint about the registry, said once
    try:
        while not stop.is_set():
            if time.monotonic() - seen > settings.workers.heartbeat_seconds:
                report(sessions, name, model, None)
                seen = time.monotonic()
            if disk_full(settings):
                if not full:
                    log.error(
                        "worker %s claims no job: the spool's disk is below its floor of %d MB",
                        name,
                        settings.receiver.min_free_mb,
                    )
                full = True
                stop.wait(max(settings.workers.poll_seconds, 5.0))
                continue
            full = False
            try:
                now_live = registry.live()
            except ModelError as exc:  # the registry names a model that is gone: keep this one
                if str(exc) != said:
                    log.error("worker %s keeps model %s: %s", name, model.card.name, exc)
                    said = str(exc)
                now_live = live
            if now_live != live:  # promoted or rolled back: the next job runs on it
                log.info("worker %s: the live model is now %s", name, now_live)
                live, model = now_live, load_model(now_live, settings.workers.device)
            with sessions() as s:
                job = claim(s, name)
            if job is None:
                if once:
                    return
                stop.wait(settings.workers.poll_seconds)
                continue
            log.info("worker %s runs job %s (series %s)", name, job.id, job.series_uid)
            report(sessions, name, model, job.id)
            if not run_claimed(settings, sessions, model, job, name):
                stop.wait(NO_SPACE_WAIT_S)  # space may not come back at once
            seen = 0.0
            if once:
                return
    finally:
        report(sessions, name, model, None, stopped=True)


def report(
    sessions: sessionmaker, name: str, model: DiscModel, job_id: int | None, stopped: bool = False
) -> None:
    """Say that this worker is alive, with its model and device, and what it runs."""
    try:
        with sessions() as s:
            row = s.get(WorkerStatus, name) or WorkerStatus(name=name, started_at=utcnow())
            row.last_seen, row.model, row.device = utcnow(), model.card.name, model.device
            row.job_id, row.stopped = job_id, stopped
            s.merge(row)
            s.commit()
    except SQLAlchemyError as exc:  # the health view may be stale; the work goes on
        log.warning("worker status: %s", exc)


def spawn(settings: Settings, name: str | None = None) -> BaseProcess:
    """Start a worker process (spawned, so it loads its own model) at the node's log level."""
    level = logging.getLogger("node").getEffectiveLevel()
    p = mp.get_context("spawn").Process(
        target=worker_process, args=(settings.model_dump_json(), level, os.getpid()), name=name
    )
    p.start()
    return p


def worker_process(
    settings_json: str, log_level: int = logging.INFO, parent: int | None = None
) -> None:
    """Entry point of a worker process started by the node (``parent``: the node's pid)."""
    _die_with_parent(parent)
    logs.setup(min(log_level, logging.INFO), log_level)
    settings = Settings.model_validate_json(settings_json)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops its workers itself
    work(settings, stop)
