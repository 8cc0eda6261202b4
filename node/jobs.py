"""The job state machine: receiving, completion, the claim, retries, recovery.

RECEIVING -> QUEUED -> RUNNING -> SENDING -> DONE, or FAILED / SKIPPED with a reason. Every
transition adds the time spent in the state it leaves to ``Job.stage_seconds`` and writes an
audit event. Functions here take a session and plain values; the caller commits.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from node.config import SeriesRules
from node.db import AuditEvent, Delivery, DeliveryState, Instance, Job, State, changed, utcnow
from node.ingest.series import ReceivedInstance, evenly_stacked, is_seg, skip_reason

log = logging.getLogger(__name__)


def audit(
    session: Session, job: Job | None, actor: str, event: str, detail: str | None = None
) -> None:
    session.add(AuditEvent(job=job, actor=actor, event=event, detail=detail))


def transition(
    session: Session,
    job: Job,
    new: State,
    actor: str,
    reason: str | None = None,
    now: dt.datetime | None = None,
) -> None:
    now = now or utcnow()
    spent = max(0.0, (now - job.state_since).total_seconds())
    stages = dict(job.stage_seconds or {})
    stages[job.state.value] = round(stages.get(job.state.value, 0.0) + spent, 3)
    old = job.state
    job.stage_seconds = stages
    job.state = new
    job.state_since = now
    if reason is not None or new in (State.QUEUED, State.RUNNING, State.DONE):
        job.reason = reason  # a job that ends well carries no reason from an earlier failure
    audit(session, job, actor, f"{old.value}->{new.value}", reason)
    log.info("job %s %s -> %s%s", job.id, old.value, new.value, f": {reason}" if reason else "")


def record_instance(session: Session, got: ReceivedInstance, actor: str) -> tuple[Job, bool]:
    """Record a stored instance; returns its job and whether the instance is new.

    Instances of a series go to its RECEIVING job, or start a new one. An instance already
    known is a duplicate: harmless, its file was replaced with the same content.
    """
    known = session.execute(
        select(Instance)
        .join(Job)
        .where(Instance.sop_instance_uid == got.sop_instance_uid, Job.series_uid == got.series_uid)
        .order_by(Instance.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    if known is not None:
        known.received_at = utcnow()
        if known.job.state is State.RECEIVING:
            known.job.last_instance_at = utcnow()
            known.job.association_released = False
        return known.job, False
    job = session.execute(
        select(Job).where(Job.series_uid == got.series_uid, Job.state == State.RECEIVING).limit(1)
    ).scalar_one_or_none()
    if job is None:
        job = reopen(session, got, actor)
    if job is None:
        job = Job(
            state=State.RECEIVING,
            study_uid=got.study_uid,
            series_uid=got.series_uid,
            calling_aet=got.calling_aet,
            called_aet=got.called_aet,
            modality=got.modality,
            study_date=got.study_date,
            series_description=got.series_description,
            body_part=got.body_part,
            patient_name=got.patient_name,
            patient_id=got.patient_id,
            instances=0,
            bytes_received=0,
            stage_seconds={},
        )
        session.add(job)
        session.flush()
        audit(session, job, actor, "received", f"first instance from {got.calling_aet}")
    job.instances = (job.instances or 0) + 1
    job.bytes_received = (job.bytes_received or 0) + got.size
    job.last_instance_at = utcnow()
    job.association_released = False
    session.add(
        Instance(
            job=job,
            sop_instance_uid=got.sop_instance_uid,
            sop_class_uid=got.sop_class_uid,
            path=got.path,
            size=got.size,
            position=got.position,
            slice_thickness=got.slice_thickness,
            orientation=got.orientation,
            frames=got.frames,
        )
    )
    return job, True


def reopen(session: Session, got: ReceivedInstance, actor: str) -> Job | None:
    """A new instance of a series whose job has left RECEIVING reopens the series.

    A queued job goes back to RECEIVING and takes the instance. Otherwise a new job starts
    with every instance the last one had (the same files) plus this one: a running job is
    superseded (SKIPPED, its results discarded by its worker), a finished one stays as it
    is and its results are replaced by the new job's (the new SR names the old one as its
    predecessor). Both jobs' histories say so. None when the series has no earlier job, or
    when its files are gone.
    """
    old = session.execute(
        select(Job).where(Job.series_uid == got.series_uid).order_by(Job.id.desc()).limit(1)
    ).scalar_one_or_none()
    if old is None or old.instances_deleted:
        return None
    if old.state is State.QUEUED:
        won = changed(
            session,
            update(Job)
            .where(Job.id == old.id, Job.state == State.QUEUED)
            .values(state=State.RECEIVING),
        )
        if won == 1:
            old.state = State.QUEUED  # for the transition's bookkeeping
            transition(session, old, State.RECEIVING, actor, None)
            audit(
                session,
                old,
                actor,
                "reopened",
                f"instance {got.sop_instance_uid} arrived after the series was queued",
            )
            return old
        session.refresh(old)  # a worker claimed it meanwhile
    job = Job(
        state=State.RECEIVING,
        study_uid=old.study_uid,
        series_uid=old.series_uid,
        calling_aet=got.calling_aet,
        called_aet=got.called_aet,
        modality=old.modality or got.modality,
        study_date=old.study_date,
        series_description=old.series_description,
        body_part=old.body_part,
        patient_name=old.patient_name,
        patient_id=old.patient_id,
        instances=0,
        bytes_received=0,
        stage_seconds={},
    )
    session.add(job)
    session.flush()
    for i in old.received:
        session.add(
            Instance(
                job=job,
                sop_instance_uid=i.sop_instance_uid,
                sop_class_uid=i.sop_class_uid,
                path=i.path,
                size=i.size,
                position=i.position,
                slice_thickness=i.slice_thickness,
                orientation=i.orientation,
                frames=i.frames,
                received_at=i.received_at,
            )
        )
        job.instances += 1
        job.bytes_received += i.size
    audit(
        session,
        job,
        actor,
        "received",
        f"supersedes job {old.id} ({old.state.value}): instance {got.sop_instance_uid} arrived after it "
        f"left RECEIVING; its {len(old.received)} instances carried over",
    )
    audit(
        session, old, actor, "superseded", f"by job {job.id}: more instances of the series arrived"
    )
    if old.state is State.RUNNING:
        transition(
            session,
            old,
            State.SKIPPED,
            actor,
            f"superseded by job {job.id}: more instances of the series arrived",
        )
    log.info("series %s reopened: job %s supersedes job %s", got.series_uid, job.id, old.id)
    return job


def predecessor(session: Session, job: Job) -> Job | None:
    """The latest earlier job of the same series that has results (whose SR the job's SR replaces)."""
    return session.execute(
        select(Job)
        .where(Job.series_uid == job.series_uid, Job.id < job.id, Job.outputs_dir.is_not(None))
        .order_by(Job.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def association_released(session: Session, series_uids: list[str]) -> None:
    """The last association carrying these series has been released: each may now complete
    as soon as its stack is even (see `complete_series`)."""
    if series_uids:
        session.execute(
            update(Job)
            .where(Job.series_uid.in_(series_uids), Job.state == State.RECEIVING)
            .values(association_released=True)
        )


def complete_series(
    session: Session,
    rules: SeriesRules,
    actor: str,
    now: dt.datetime | None = None,
    corrections: bool = True,
) -> list[Job]:
    """Move RECEIVING jobs whose series is complete to QUEUED, or SKIPPED with the reason.
    A series of SEGs is queued as well, when ``corrections`` are taken: a worker reads it as
    a radiologist's correction (`node.cases`).

    A series is complete once no instance of it arrived for ``quiet_seconds``; or earlier,
    when it looks whole: no open association is carrying it, nothing arrived for
    ``grace_seconds``, it has at least ``min_instances`` slices and they form an even stack
    without a gap.
    """
    now = now or utcnow()
    done = []
    for job in session.execute(select(Job).where(Job.state == State.RECEIVING)).scalars():
        idle = (now - job.last_instance_at).total_seconds()
        instances = list(job.received)
        whole = (
            job.association_released
            and idle >= rules.grace_seconds
            and sum(i.frames for i in instances) >= rules.min_instances
            and evenly_stacked(instances)
        )
        if idle < rules.quiet_seconds and not whole:
            continue
        seg = corrections and is_seg({i.sop_class_uid for i in instances})
        why = None if seg else skip_reason(job, instances, rules)
        if why:
            transition(session, job, State.SKIPPED, actor, why, now)
        else:
            transition(session, job, State.QUEUED, actor, None, now)
        done.append(job)
    return done


def claim(session: Session, worker: str) -> Job | None:
    """Take the oldest QUEUED job for ``worker``; safe with many workers on many hosts.

    On PostgreSQL the row is locked with ``FOR UPDATE SKIP LOCKED``, so concurrent workers
    pass over each other's rows; elsewhere (SQLite, one writer at a time) a conditional
    update makes sure that only one worker moves it from QUEUED. Commits.
    """
    q = select(Job).where(Job.state == State.QUEUED).order_by(Job.id).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        job = session.execute(q.with_for_update(skip_locked=True)).scalar_one_or_none()
        if job is None:
            session.rollback()
            return None
    else:
        for _ in range(10):
            job = session.execute(q).scalar_one_or_none()
            if job is None:
                session.rollback()
                return None
            won = changed(
                session,
                update(Job)
                .where(Job.id == job.id, Job.state == State.QUEUED)
                .values(worker=worker),
            )
            if won == 1:
                break
            session.rollback()
        else:
            return None
    now = utcnow()
    job.worker = worker
    job.heartbeat_at = now
    job.attempts = (job.attempts or 0) + 1
    transition(session, job, State.RUNNING, worker, None, now)
    session.commit()
    return job


def heartbeat(session: Session, job_id: int, worker: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker == worker, Job.state == State.RUNNING)
        .values(heartbeat_at=utcnow())
    )
    session.commit()


def requeue_stale(
    session: Session,
    stale_after_s: float,
    max_attempts: int,
    actor: str,
    dead: Callable[[str], bool] = lambda worker: False,
) -> list[Job]:
    """RUNNING jobs whose worker is gone (``dead(worker)``, or silent for ``stale_after_s``)
    are queued again, or FAILED once they have had ``max_attempts``."""
    now = utcnow()
    out = []
    for job in session.execute(select(Job).where(Job.state == State.RUNNING)).scalars():
        silent = (
            job.heartbeat_at is None or (now - job.heartbeat_at).total_seconds() > stale_after_s
        )
        if not (silent or dead(job.worker or "")):
            continue
        why = f"worker {job.worker} stopped while running the job"
        if job.attempts >= max_attempts:
            transition(
                session, job, State.FAILED, actor, f"{why}; {job.attempts} attempts made", now
            )
        else:
            transition(session, job, State.QUEUED, actor, None, now)
            audit(session, job, actor, "requeued", why)
        out.append(job)
    return out


def retry(session: Session, job: Job, actor: str) -> None:
    """Run the analysis again (from FAILED, SKIPPED or DONE)."""
    if job.state in (State.RUNNING, State.RECEIVING, State.QUEUED):
        raise ValueError(f"job {job.id} is {job.state.value}; nothing to retry")
    if job.instances_deleted:
        raise ValueError(f"job {job.id}: its instances were removed by the retention rule")
    job.attempts = 0
    transition(session, job, State.QUEUED, actor, None)
    audit(session, job, actor, "retry requested")


def resend(session: Session, job: Job, actor: str) -> list[Delivery]:
    """Send the results of a finished job again to each of its destinations."""
    if not job.deliveries or job.outputs_dir is None:
        raise ValueError(f"job {job.id} has no results to send")
    if job.state in (State.RUNNING, State.RECEIVING, State.QUEUED):
        raise ValueError(f"job {job.id} is {job.state.value}")
    fresh = []
    for name, address in {d.destination: d.address for d in job.deliveries}.items():
        d = Delivery(
            job=job,
            destination=name,
            address=address,
            state=DeliveryState.PENDING,
            attempts=0,
            next_try_at=utcnow(),
            history=[],
        )
        session.add(d)
        fresh.append(d)
    transition(session, job, State.SENDING, actor, None)
    audit(session, job, actor, "resend requested", ", ".join(d.destination for d in fresh))
    return fresh


def counts_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    out = {s.value: 0 for s in State}
    out.update({s.value: n for s, n in rows})
    return out
