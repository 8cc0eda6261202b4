"""The node's database: received series and instances, jobs, deliveries and the audit trail.

SQLite (WAL, full sync) by default; PostgreSQL when the URL names it. The schema is made and
upgraded by the migrations in `node.migrations` when an engine is made; each table's columns
are all the node relies on.
"""

from __future__ import annotations

import datetime as dt
import enum
import socket
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.sql import Executable


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class State(str, enum.Enum):
    RECEIVING = "RECEIVING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SENDING = "SENDING"
    DONE = "DONE"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


FINAL_STATES = (State.DONE, State.FAILED, State.SKIPPED)


class DeliveryState(str, enum.Enum):
    PENDING = "PENDING"
    SENT = "SENT"
    FAILED = "FAILED"


class Base(DeclarativeBase):
    pass


class Job(Base):
    """One received series and everything the node did with it."""

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[State] = mapped_column(Enum(State, native_enum=False, length=16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    state_since: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: Seconds spent in each state so far, e.g. {"RECEIVING": 4.2, "QUEUED": 0.5}.
    stage_seconds: Mapped[dict] = mapped_column(JSON, default=dict)
    # what was received
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    calling_aet: Mapped[str] = mapped_column(String(16))
    called_aet: Mapped[str] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(16))
    patient_name: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    instances: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(Integer, default=0)
    last_instance_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: Whether the last association carrying the series has been released.
    association_released: Mapped[bool] = mapped_column(default=False)
    # what a worker did
    worker: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    result: Mapped[dict | None] = mapped_column(JSON)
    outputs_dir: Mapped[str | None] = mapped_column(Text)
    instances_deleted: Mapped[bool] = mapped_column(default=False)

    received: Mapped[list[Instance]] = relationship(
        back_populates="job", cascade="all, delete-orphan"
    )
    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Delivery.id"
    )
    events: Mapped[list[AuditEvent]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="AuditEvent.id"
    )


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    #: Position along the slice normal (mm), for the completeness check; None if not an image.
    position: Mapped[float | None] = mapped_column(Float)
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    #: ImageOrientationPatient as "x\\y\\z\\x\\y\\z"
    orientation: Mapped[str | None] = mapped_column(String(128))
    frames: Mapped[int] = mapped_column(Integer, default=1)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="received")


class Delivery(Base):
    """The results of one job to one destination."""

    __tablename__ = "delivery"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(300))  # AE@host:port, as it was when queued
    state: Mapped[DeliveryState] = mapped_column(
        Enum(DeliveryState, native_enum=False, length=16), index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    #: One entry per attempt: {"at", "ok", "error", "seconds"}.
    history: Mapped[list] = mapped_column(JSON, default=list)
    #: The sender (host:pid) holding it for a try now; a holder that dies does not keep it.
    held_by: Mapped[str | None] = mapped_column(String(128))

    job: Mapped[Job] = relationship(back_populates="deliveries")


class AuditEvent(Base):
    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("job.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job | None] = relationship(back_populates="events")


class LabelledCase(Base):
    """A radiologist's corrected SEG of an analysed series, kept with its CT as a labelled
    case (see `node.cases`)."""

    __tablename__ = "labelled_case"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    #: The job that received the SEG, and the job whose analysis it corrects.
    seg_job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    analysed_job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    seg_sop_uid: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    folder: Mapped[str] = mapped_column(Text)
    #: Per level: {"level", "classes", "node_classes", "changed"}.
    levels: Mapped[list] = mapped_column(JSON, default=list)
    #: Segments left out, each with its reason.
    problems: Mapped[list] = mapped_column(JSON, default=list)


class WorkerStatus(Base):
    """What each worker process last said about itself (for the health view)."""

    __tablename__ = "worker_status"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    model: Mapped[str | None] = mapped_column(String(128))
    device: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(Integer)
    stopped: Mapped[bool] = mapped_column(default=False)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str, *, upgrade: bool = True) -> Engine:
    """An engine for ``url``, its schema made or upgraded to this release's (see
    `node.migrations`); SQLite in WAL mode."""
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    if upgrade:
        from node import migrations

        migrations.upgrade(engine)
    return engine


def changed(session: Session, statement: Executable) -> int:
    """Rows an UPDATE or DELETE changed (the claims and leases that must win once)."""
    return int(session.execute(statement).rowcount)  # type: ignore[attr-defined]  # a CursorResult


def make_sessions(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def host_name() -> str:
    """This host's name in worker and sender names: ``IDAICS_HOST_NAME`` where set (containers
    that share a host name), else the system's."""
    import os

    return os.environ.get("IDAICS_HOST_NAME") or socket.gethostname()


def actor() -> str:
    """Who does something: host and process id (workers are told apart by it)."""
    import os

    return f"{host_name()}:{os.getpid()}"
