"""Logging set-up shared by the command and the worker processes it starts."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Libraries that log a line per PDU, per timer tick or per copied module at INFO.
NOISY = ("pynetdicom", "apscheduler", "highdicom")


def setup(level: int = logging.INFO, node_level: int | None = None) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    if level > logging.DEBUG:
        for name in NOISY:
            logging.getLogger(name).setLevel(logging.WARNING)
    if node_level is not None:
        logging.getLogger("node").setLevel(node_level)
