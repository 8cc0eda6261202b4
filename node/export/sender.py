"""The sender: the one part of the node that delivers results.

Workers write a job's results to the outbox, queue one delivery per destination and go back
to analysing; the sender finds the deliveries that are due, every `Sending.poll_seconds` and
whenever a try ends, and tries each in a pool of `Sending.threads` threads, at most
`Sending.per_destination` at once to one destination: a PACS that stalls holds its own
threads until its timeout, never a worker, and never the sends to the other destinations.
Each try is `delivery.attempt` (claimed with a lease, so senders on several hosts never send
one delivery twice), with its retries and backoff.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from node import logs
from node.config import Settings
from node.db import Delivery
from node.export import scu
from node.export.delivery import attempt, due

log = logging.getLogger(__name__)


class Sender:
    def __init__(self, sessions: sessionmaker, settings: Settings, actor: str):
        self.sessions, self.settings, self.actor = sessions, settings, actor
        self._todo: queue.Queue[tuple[int, str, int] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()
        self._per_destination: Counter[str] = Counter()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- what the node calls ---------------------------------------------------------------
    def start(self) -> None:
        s = self.settings.sending
        self._threads = [
            threading.Thread(target=self._send_loop, name=f"idaics-send-{i + 1}", daemon=True)
            for i in range(s.threads)
        ]
        self._threads.append(
            threading.Thread(target=self._find_loop, name="idaics-send-due", daemon=True)
        )
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop taking deliveries and abort the associations of the tries in progress, so
        that a PACS that never answers does not hold the node's exit for its timeout. A try
        cut short keeps its lease recorded, or records its failure: either way the delivery
        is tried again (a lease of a node that is gone is due again at its next start)."""
        self._stop.set()
        self._wake.set()
        for _ in self._threads:
            self._todo.put(None)
        aborted = scu.abort_all()
        if aborted:
            log.warning(
                "stopping: aborted %d association(s) still sending; their deliveries will be "
                "tried again",
                aborted,
            )

    def busy(self) -> dict[str, int]:
        """Tries in progress per destination."""
        with self._lock:
            return {k: v for k, v in self._per_destination.items() if v}

    # -- inside ----------------------------------------------------------------------------
    def dispatch(self) -> int:
        """Hand the due deliveries that may go now to the pool; returns how many."""
        limit = self.settings.sending.per_destination
        with self.sessions() as s:
            rows = s.execute(due(Delivery.id, Delivery.destination, Delivery.job_id)).all()
        handed = 0
        with self._lock:
            for delivery_id, destination, job_id in rows:
                if delivery_id in self._in_flight or self._per_destination[destination] >= limit:
                    continue
                self._in_flight.add(delivery_id)
                self._per_destination[destination] += 1
                self._todo.put((delivery_id, destination, job_id))
                handed += 1
        return handed

    def _find_loop(self) -> None:
        every = self.settings.sending.poll_seconds
        while not self._stop.is_set():
            try:
                self.dispatch()
            except SQLAlchemyError:  # the database away for a moment: said, and tried again
                log.exception("sender: looking for due deliveries failed")
            self._wake.wait(every)
            self._wake.clear()

    def _send_loop(self) -> None:
        while True:
            item = self._todo.get()
            if item is None or self._stop.is_set():
                return
            delivery_id, destination, job_id = item
            try:
                with logs.job(job_id):
                    attempt(self.sessions, delivery_id, self.settings, self.actor)
            except (SQLAlchemyError, OSError):  # attempt records send errors; this is the database
                log.exception(
                    "sender: delivery %s to %s could not be recorded", delivery_id, destination
                )
            finally:
                with self._lock:
                    self._in_flight.discard(delivery_id)
                    self._per_destination[destination] -= 1
                self._wake.set()  # a slot is free: the next due delivery of this destination may go
