"""Each log line names the job or association it is about, thread by thread."""

from __future__ import annotations

import io
import logging
import threading

from node import logs


def test_log_lines_name_their_job_or_association_in_each_thread():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("[%(context)s] %(message)s"))
    handler.addFilter(logs.ContextFilter())
    log = logging.getLogger("node.test-logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        log.info("node started")
        inside = threading.Event()

        def association() -> None:
            with logs.association("3f2a9c01deadbeef"):
                log.info("stored")
                inside.set()

        with logs.job(12):
            t = threading.Thread(target=association)
            t.start()
            inside.wait(10)
            log.info("analysed")
            t.join()
        log.info("stopped")
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[-] node started" and lines[-1] == "[-] stopped"
    assert set(lines[1:3]) == {"[assoc 3f2a9c01] stored", "[job 12] analysed"}
