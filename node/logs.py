"""Logging set-up shared by the command and the worker processes it starts.

Every line says what it is about: ``[job 12]`` while a worker runs a job or the sender
delivers its results, ``[assoc 3f2a9c01]`` while the listener serves an association, ``[-]``
for the node itself (start, stop, schedules). The context is a context variable, so threads
and the listener's association threads each carry their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

FORMAT = "%(asctime)s %(levelname)s [%(context)s] %(name)s: %(message)s"
#: Libraries that log a line per PDU, per timer tick or per copied module at INFO.
NOISY = ("pynetdicom", "apscheduler", "highdicom")

_context: contextvars.ContextVar[str] = contextvars.ContextVar("idaics_log_context", default="-")


@contextlib.contextmanager
def about(what: str) -> Iterator[None]:
    """Log lines in this block (this thread) say ``what`` (``job 12``, ``assoc 3f2a9c01``)."""
    token = _context.set(what)
    try:
        yield
    finally:
        _context.reset(token)


def job(job_id: int) -> contextlib.AbstractContextManager[None]:
    return about(f"job {job_id}")


def association(assoc_id: str) -> contextlib.AbstractContextManager[None]:
    return about(f"assoc {assoc_id[:8]}")


class ContextFilter(logging.Filter):
    """Puts the current context on each record (as ``%(context)s``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.context = _context.get()
        return True


def setup(level: int = logging.INFO, node_level: int | None = None) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
    if level > logging.DEBUG:
        for name in NOISY:
            logging.getLogger(name).setLevel(logging.WARNING)
    if node_level is not None:
        logging.getLogger("node").setLevel(node_level)
