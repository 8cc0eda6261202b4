"""Schema migrations of the node's database (Alembic), run by ``idaics db upgrade`` and by
every node process at start.

A database made before migrations existed (its tables made by the release without them, no
``alembic_version`` table) is taken as the baseline revision and upgraded from there. A SQLite
file is copied aside before it is changed. Processes that start together (a node and its
workers, worker hosts on one PostgreSQL server) upgrade one at a time: a lock file next to a
SQLite database, an advisory lock on PostgreSQL.

Checking that a database is current reads one row and imports nothing of Alembic.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

#: The newest revision in `versions/`; a test checks it is Alembic's head.
HEAD = "0003"
BASELINE = "0001"
HERE = Path(__file__).parent
#: Tables of the baseline, with the columns a pre-migration database must have to be taken as it.
BASELINE_TABLES = {
    "job": {
        "id",
        "state",
        "reason",
        "attempts",
        "study_uid",
        "series_uid",
        "result",
        "outputs_dir",
    },
    "instance": {"id", "job_id", "sop_instance_uid", "path", "position"},
    "delivery": {"id", "job_id", "destination", "state", "attempts", "next_try_at", "history"},
    "audit_event": {"id", "job_id", "at", "event"},
    "worker_status": {"name", "last_seen"},
}
PG_LOCK_KEY = 0x1DA1C5  # advisory lock key: one upgrade at a time per PostgreSQL database


class MigrationError(RuntimeError):
    """The database cannot be brought to this release's schema."""


@dataclass(frozen=True)
class Upgrade:
    before: str | None  # None: empty; a database made before migrations is BASELINE, ``legacy``
    after: str
    legacy: bool = False
    backup: Path | None = None

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def describe(self) -> str:
        if not self.changed:
            return f"database already at revision {self.after}"
        was = (f"{BASELINE} (made before migrations)" if self.legacy else self.before) or "empty"
        kept = f"; the file as it was is kept as {self.backup}" if self.backup else ""
        return f"database upgraded from {was} to {self.after}{kept}"


def current(conn: Connection) -> str | None:
    """The database's revision; None where it has none (empty, or made before migrations)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _sqlite_path(engine: Engine) -> Path | None:
    db = engine.url.database
    if engine.dialect.name != "sqlite" or not db or db == ":memory:":
        return None
    return Path(db)


@contextlib.contextmanager
def _one_at_a_time(engine: Engine) -> Iterator[None]:
    path = _sqlite_path(engine)
    if path is not None:
        with open(path.with_name(path.name + ".upgrade-lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    elif engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
                conn.commit()
    else:
        yield


def backup(path: Path, revision: str | None) -> Path:
    """A consistent copy of the SQLite file (its WAL included) beside it, before an upgrade."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = path.with_name(f"{path.name}.before-{revision or 'migrations'}-{stamp}")
    src = sqlite3.connect(path)
    try:
        out = sqlite3.connect(dest)
        with out:
            src.backup(out)
        out.close()
    finally:
        src.close()
    return dest


def _config(conn: Connection) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = conn
    return cfg


def _baseline_check(conn: Connection) -> bool:
    """Whether the database holds the baseline's tables (True), nothing (False), or raise."""
    insp = inspect(conn)
    present = [t for t in BASELINE_TABLES if insp.has_table(t)]
    if not present:
        return False
    for table, cols in BASELINE_TABLES.items():
        if not insp.has_table(table):
            raise MigrationError(
                f"the database has some of the node's tables but not {table!r}: "
                "not a database this node made"
            )
        missing = cols - {c["name"] for c in insp.get_columns(table)}
        if missing:
            raise MigrationError(
                f"table {table!r} lacks {', '.join(sorted(missing))}: made by a release "
                "older than the migrations know"
            )
    return True


def upgrade(engine: Engine, *, make_backup: bool = True) -> Upgrade:
    """Bring the database to `HEAD`.

    Does nothing (and imports nothing of Alembic) when it is current. A revision newer than
    this release knows is refused: an older node must not write to a newer schema.
    """
    with engine.connect() as conn:
        if current(conn) == HEAD:
            return Upgrade(HEAD, HEAD)
    with _one_at_a_time(engine), engine.connect() as conn:
        before = current(conn)
        if before == HEAD:
            return Upgrade(HEAD, HEAD)
        from alembic import command
        from alembic.script import ScriptDirectory

        cfg = _config(conn)
        known = {s.revision for s in ScriptDirectory.from_config(cfg).walk_revisions()}
        if before is not None and before not in known:
            raise MigrationError(
                f"the database is at revision {before}, newer than this release "
                f"knows (up to {HEAD}): upgrade the node, do not downgrade the database"
            )
        legacy = before is None and _baseline_check(conn)
        conn.rollback()
        path = _sqlite_path(engine)
        saved = None
        if path is not None and (before is not None or legacy) and make_backup:
            saved = backup(path, before)
            log.info("database copied to %s before its upgrade", saved)
        if legacy:
            command.stamp(cfg, BASELINE)
            conn.commit()
        command.upgrade(cfg, "head")
        conn.commit()
        after = current(conn) or HEAD
    done = Upgrade(BASELINE if legacy else before, after, legacy, saved)
    log.info("%s", done.describe())
    return done
