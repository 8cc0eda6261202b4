"""Deliveries: a job's results to each of its destinations, with retries and backoff."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db import Delivery, DeliveryState, Job, State, changed, utcnow
from node.export.scu import SendError, address, send_files
from node.jobs import audit, transition

log = logging.getLogger(__name__)


def result_files(job: Job) -> list[Path]:
    folder = Path(job.outputs_dir or "") / "dicom"
    return sorted(folder.glob("*.dcm")) if job.outputs_dir else []


def queue_deliveries(session: Session, job: Job, settings: Settings, actor: str) -> list[Delivery]:
    """Create a delivery per destination routed for the job's calling AE; move the job on."""
    dests = settings.destinations_for(job.calling_aet)
    out = []
    for d in dests:
        dl = Delivery(
            job=job,
            destination=d.name,
            address=address(d),
            state=DeliveryState.PENDING,
            attempts=0,
            next_try_at=utcnow(),
            history=[],
        )
        session.add(dl)
        out.append(dl)
    if out:
        transition(session, job, State.SENDING, actor)
    else:
        transition(
            session,
            job,
            State.DONE,
            actor,
            f"no destination configured for {job.calling_aet}; results kept in the outbox",
        )
    return out


def _settle(session: Session, job: Job, actor: str) -> None:
    """DONE when every latest delivery per destination is SENT; FAILED when one gave up."""
    latest: dict[str, Delivery] = {}
    for d in job.deliveries:
        latest[d.destination] = d
    states = {d.state for d in latest.values()}
    if job.state is not State.SENDING:
        return
    if states == {DeliveryState.SENT}:
        result = job.result or {}
        if result.get("analysed") is False:  # the report of why it was not analysed is sent
            transition(
                session,
                job,
                State(result.get("final_state", State.SKIPPED.value)),
                actor,
                job.reason,
            )
        else:
            transition(session, job, State.DONE, actor)
    elif DeliveryState.FAILED in states and DeliveryState.PENDING not in states:
        failed = [d for d in latest.values() if d.state is DeliveryState.FAILED]
        transition(
            session,
            job,
            State.FAILED,
            actor,
            "; ".join(
                f"delivery to {d.destination} failed after {d.attempts} attempts: {d.last_error}"
                for d in failed
            ),
        )


def attempt(sessions: sessionmaker, delivery_id: int, settings: Settings, actor: str) -> bool:
    """One try of one delivery; returns whether it was sent."""
    with sessions() as s:
        d = s.get(Delivery, delivery_id)
        if d is None or d.state is not DeliveryState.PENDING:
            return False
        files = result_files(d.job)
        dest = next((x for x in settings.destinations if x.name == d.destination), None)
        # hold the delivery for the length of the try, so that no other sender takes it
        hold = utcnow() + dt.timedelta(seconds=settings.sending.timeout_s * (len(files) + 2))
        won = changed(
            s,
            update(Delivery)
            .where(
                Delivery.id == delivery_id,
                Delivery.state == DeliveryState.PENDING,
                Delivery.next_try_at <= utcnow(),
            )
            .values(next_try_at=hold, held_by=actor),
        )
        s.commit()
        if won != 1:
            return False
    t0 = time.perf_counter()
    error = None
    try:
        if dest is None:
            raise SendError(f"destination {d.destination} is no longer configured")
        if not files:
            raise SendError("no result files in the outbox")
        send_files(files, dest, settings.sending.calling_ae_title, settings.sending.timeout_s)
    except Exception as exc:  # whatever went wrong, it is recorded and tried again later
        error = str(exc) if isinstance(exc, SendError) else f"{type(exc).__name__}: {exc}"
    seconds = round(time.perf_counter() - t0, 3)
    with sessions() as s:
        d = s.get(Delivery, delivery_id)
        d.attempts += 1
        d.held_by = None
        d.history = [
            *(d.history or []),
            {
                "at": utcnow().isoformat(timespec="seconds"),
                "ok": error is None,
                "error": error,
                "seconds": seconds,
            },
        ]
        if error is None:
            d.state, d.sent_at, d.last_error, d.next_try_at = (
                DeliveryState.SENT,
                utcnow(),
                None,
                None,
            )
            audit(
                s, d.job, actor, "sent", f"{len(files)} objects to {d.address} in {seconds:.1f} s"
            )
        else:
            d.last_error = error
            if d.attempts >= settings.sending.max_attempts:
                d.state, d.next_try_at = DeliveryState.FAILED, None
            else:
                d.next_try_at = utcnow() + dt.timedelta(
                    seconds=settings.sending.backoff(d.attempts)
                )
            log.warning("delivery %s of job %s, attempt %d: %s", d.id, d.job_id, d.attempts, error)
            audit(s, d.job, actor, "send failed", f"attempt {d.attempts} to {d.address}: {error}")
        _settle(s, d.job, actor)
        s.commit()
    return error is None


def holder(d: Delivery) -> str | None:
    """The sender (host:pid) holding a PENDING delivery for a try now, or None."""
    return d.held_by if d.state is DeliveryState.PENDING else None


def release_dead_holds(session: Session, dead: Callable[[str], bool], actor: str) -> list[Delivery]:
    """PENDING deliveries held by a sender that is gone (``dead(holder)``) are due again now,
    not when the hold would have run out."""
    out = []
    now = utcnow()
    for d in session.execute(
        select(Delivery).where(Delivery.state == DeliveryState.PENDING, Delivery.next_try_at > now)
    ).scalars():
        who = holder(d)
        if who and dead(who):
            d.held_by = None
            d.next_try_at = now
            audit(
                session,
                d.job,
                actor,
                "send lease released",
                f"{d.destination}: sender {who} is gone",
            )
            out.append(d)
    return out


def due(*columns: Any) -> Select[Any]:
    """The PENDING deliveries whose next try is due now, oldest first (``columns`` of them)."""
    return (
        select(*columns)
        .where(Delivery.state == DeliveryState.PENDING, Delivery.next_try_at <= utcnow())
        .order_by(Delivery.id)
    )


def deliver_due(
    sessions: sessionmaker, settings: Settings, actor: str, job_id: int | None = None
) -> int:
    """Try every PENDING delivery that is due (of one job, or all); returns how many were sent."""
    with sessions() as s:
        q = due(Delivery.id)
        if job_id is not None:
            q = q.where(Delivery.job_id == job_id)
        ids = list(s.execute(q).scalars())
    return sum(attempt(sessions, i, settings, actor) for i in ids)
