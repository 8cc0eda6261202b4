"""The node: receiver, scheduler, workers and sender wired together, and stopped cleanly.

The scheduler (apscheduler) runs, each in its own thread and never twice at once:
- the completion check (which RECEIVING series are complete), every second;
- the recovery of jobs whose worker died, every ten seconds (and once at start);
- the retention clean-up of spooled instances of DONE jobs, every ten minutes.

The sender (`node.export.sender`) delivers the results that workers queue, in its own threads.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select

from node.config import Settings
from node.db import Instance, Job, State, actor, make_engine, make_sessions, utcnow
from node.export.delivery import release_dead_holds
from node.export.sender import Sender
from node.ingest import spool
from node.ingest.scp import Receiver
from node.jobs import audit, complete_series, requeue_stale
from node.worker import dead_here, spawn

if TYPE_CHECKING:
    from node.web.server import WebServer

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        self.sessions = make_sessions(self.engine)
        self.actor = actor()
        self.receiver = Receiver(settings, self.sessions, self.actor)
        self.sender = Sender(self.sessions, settings, self.actor)
        self.scheduler = BackgroundScheduler(timezone=dt.timezone.utc)
        self.workers: list[BaseProcess] = []
        self.stopped = threading.Event()
        self.web: WebServer | None = None

    # -- scheduled checks ----------------------------------------------------------------
    def check_completion(self) -> None:
        with self.sessions() as s:
            complete_series(
                s,
                self.settings.series,
                self.actor,
                corrections=self.settings.corrections.enabled,
            )
            s.commit()

    def recover(self) -> None:
        w = self.settings.workers
        with self.sessions() as s:
            requeue_stale(s, w.stale_after_seconds, w.max_attempts, self.actor, dead=dead_here)
            release_dead_holds(s, dead_here, self.actor)
            s.commit()

    def clean_up(self) -> None:
        left = spool.remove_leftovers(self.settings.spool_dir)
        if left:
            log.info("removed %d temporary file(s) of writes that never finished", left)
        hours = self.settings.retention.delete_instances_after_hours
        if hours <= 0:
            return
        before = utcnow() - dt.timedelta(hours=hours)
        with self.sessions() as s:
            jobs = (
                s.execute(
                    select(Job).where(
                        Job.state == State.DONE,
                        Job.state_since < before,
                        Job.instances_deleted.is_(False),
                    )
                )
                .scalars()
                .all()
            )
            for job in jobs:
                n = spool.remove_files([i.path for i in job.received])
                job.instances_deleted = True
                audit(s, job, self.actor, "instances removed", f"{n} files, {hours:g} h after DONE")
            s.commit()

    # -- life cycle ----------------------------------------------------------------------
    def start_workers(self) -> None:
        for i in range(self.settings.workers.count):
            self.workers.append(spawn(self.settings, f"idaics-worker-{i + 1}"))

    def remove_unrecorded(self) -> None:
        """Files of instances never acknowledged (no row): a node killed between the write and
        the commit leaves them; their senders had no Success and send them again."""
        with self.sessions() as s:
            recorded = set(s.execute(select(Instance.path)).scalars())
        n = spool.remove_unrecorded(self.settings.spool_dir, recorded)
        if n:
            log.info("removed %d received file(s) that were never recorded (not acknowledged)", n)

    def start(self) -> None:
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        self.clean_up()  # leftovers of a node that was killed
        self.remove_unrecorded()
        self.recover()
        self.receiver.start()
        self.sender.start()
        every = [(self.check_completion, 1), (self.recover, 10), (self.clean_up, 600)]
        for fn, seconds in every:
            self.scheduler.add_job(
                fn,
                "interval",
                seconds=seconds,
                max_instances=1,
                coalesce=True,
                id=fn.__name__,
                misfire_grace_time=seconds * 5,
            )
        self.scheduler.start()
        self.start_workers()
        if self.settings.web.enabled:
            self.start_web()
        log.info(
            "node started: %d worker(s), database %s, spool %s",
            len(self.workers),
            self.engine.url.render_as_string(hide_password=True),
            self.settings.spool_dir,
        )

    def start_web(self) -> None:
        try:
            from node.web.server import WebServer
            from node.web.view import NodeView
        except ImportError:  # the admin page is optional
            return
        self.web = WebServer(
            NodeView(
                self.settings,
                self.sessions,
                receiver_listening=lambda: self.receiver.listening,
                local_workers=self.workers_alive,
            )
        )
        self.web.start()

    def workers_alive(self) -> int:
        return sum(p.is_alive() for p in self.workers)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        log.info("stopping")
        self.receiver.stop()
        log.info("stopping: receiver closed")
        if self.web is not None:
            self.web.stop()
        self.scheduler.shutdown(wait=True)
        log.info("stopping: scheduler done")
        self.sender.stop()
        for p in self.workers:
            p.terminate()
        for p in self.workers:
            p.join(30)
            if p.is_alive():
                p.kill()
        log.info("stopping: workers done")
        self.engine.dispose()
        log.info("stopped")

    def serve_forever(self) -> None:
        """Start, and run until SIGTERM or SIGINT."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopped.set())
        self.start()
        try:
            while not self.stopped.wait(1.0):
                for i, p in enumerate(self.workers):
                    if not p.is_alive() and not self.stopped.is_set():
                        log.error(
                            "worker %s exited (code %s); starting another", p.name, p.exitcode
                        )
                        self.workers[i] = spawn(self.settings, p.name)
        finally:
            self.stopped.clear()
            self.stop()
