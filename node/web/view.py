"""What the admin page and its metrics may know of the running node (a leaf of `node.web`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import sessionmaker

from node.config import Settings


@dataclass
class NodeView:
    settings: Settings
    sessions: sessionmaker
    receiver_listening: Callable[[], bool] = lambda: False
    local_workers: Callable[[], int] = lambda: 0
