"""The job queue on SQLite and on a real PostgreSQL server: receiving, completion, the claim
with many workers, recovery of a dead worker's job, deliveries with retries."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import select, text

from node import migrations
from node.config import Destination, SeriesRules, Settings
from node.db import Base, Delivery, DeliveryState, Job, State, make_engine, make_sessions, utcnow
from node.export.delivery import deliver_due, queue_deliveries
from node.ingest.series import ReceivedInstance
from node.jobs import (
    association_released,
    claim,
    complete_series,
    predecessor,
    record_instance,
    requeue_stale,
    resend,
    retry,
    transition,
)
from tests.servers import free_port, postgres

CT = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = "1.000000\\0.000000\\0.000000\\0.000000\\1.000000\\0.000000"


@pytest.fixture(scope="module")
def pg_url():
    with postgres() as url:
        yield url


def fresh_engine(url: str):
    """An engine on an empty database (the PostgreSQL server is shared by the module's tests),
    its schema made by the migrations."""
    engine = make_engine(url, upgrade=False)
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    migrations.upgrade(engine)
    return engine


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'q.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    engine = fresh_engine(url)
    yield make_sessions(engine)
    engine.dispose()


def instance(series: str, k: int, assoc: str = "a1", **kw) -> ReceivedInstance:
    base = dict(
        sop_class_uid=CT,
        sop_instance_uid=f"{series}.{k}",
        series_uid=series,
        study_uid="1.2.3",
        path=f"/spool/{series}/{k}.dcm",
        size=1000,
        calling_aet="MODALITY",
        called_aet="IDAICS",
        association=assoc,
        modality="CT",
        position=-2.0 * k,
        slice_thickness=2.0,
        orientation=AXIAL,
        series_description="lumbar spine",
    )
    base.update(kw)
    return ReceivedInstance(**base)


def receive(sessions, series: str, n: int, **kw) -> int:
    with sessions() as s:
        for k in range(n):
            job, _ = record_instance(s, instance(series, k, **kw), "test")
        s.commit()
        return job.id


RULES = SeriesRules(quiet_seconds=5, grace_seconds=1, min_instances=20, skip_descriptions=["scout"])


def after(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


def test_instances_gather_in_one_job_and_a_duplicate_is_harmless(sessions):
    job_id = receive(sessions, "1.1", 30)
    with sessions() as s:
        job, new = record_instance(s, instance("1.1", 3), "test")
        s.commit()
        assert not new and job.id == job_id
        assert s.get(Job, job_id).instances == 30 and len(s.get(Job, job_id).received) == 30


def test_a_series_completes_after_the_quiet_time_or_at_release_of_an_even_stack(sessions):
    even = receive(sessions, "2.1", 30, assoc="even")
    gap = receive(sessions, "2.2", 30, assoc="gap")
    with sessions() as s:  # drop one slice from the second stack: a gap
        j = s.get(Job, gap)
        j.received.remove(j.received[10])  # delete-orphan: the row goes
        association_released(s, ["2.1"])
        association_released(s, ["2.2"])
        assert complete_series(s, RULES, "test") == []  # within the grace: more may come
        assert [j.id for j in complete_series(s, RULES, "test", now=after(1.5))] == [even]
        s.commit()
        assert s.get(Job, even).state is State.QUEUED and s.get(Job, gap).state is State.RECEIVING
        later = utcnow() + dt.timedelta(seconds=6)
        assert [j.id for j in complete_series(s, RULES, "test", now=later)] == [gap]
        s.commit()


def test_a_whole_looking_stack_below_min_instances_waits_for_the_quiet_time(sessions):
    short = receive(sessions, "2.3", 12, assoc="s")
    with sessions() as s:
        association_released(s, ["2.3"])
        assert complete_series(s, RULES, "test", now=after(1.5)) == []
        assert [j.id for j in complete_series(s, RULES, "test", now=after(6))] == [short]
        s.commit()


def test_one_association_per_instance_ends_as_one_job_of_all_instances(sessions):
    for k in range(60):
        with sessions() as s:
            record_instance(s, instance("5.1", k, assoc=f"a{k}"), "test")
            s.flush()
            association_released(s, ["5.1"])  # each instance's association closes at once
            complete_series(
                s, RULES, "test", now=after(0.05)
            )  # the next comes well within the grace
            s.commit()
    with sessions() as s:
        done = complete_series(s, RULES, "test", now=after(1.5))
        s.commit()
        jobs = s.execute(select(Job).where(Job.series_uid == "5.1")).scalars().all()
        assert [j.id for j in done] == [j.id for j in jobs] and len(jobs) == 1
        assert jobs[0].state is State.QUEUED and len(jobs[0].received) == 60


def _events(job: Job) -> list[str]:
    return [f"{e.event} {e.detail or ''}" for e in job.events]


def test_instances_after_the_series_was_queued_reopen_its_job(sessions):
    job_id = receive(sessions, "6.1", 75)
    with sessions() as s:
        complete_series(s, RULES, "test", now=after(6))
        s.commit()
        for k in range(150):  # the sender sends the whole series again
            job, _ = record_instance(s, instance("6.1", k), "test")
        s.commit()
        assert job.id == job_id
        job = s.get(Job, job_id)
        assert job.state is State.RECEIVING and len(job.received) == 150 and job.instances == 150
        assert any(e.startswith("reopened") for e in _events(job))


@pytest.mark.parametrize("finished", [True, False])
def test_instances_after_the_job_ran_start_one_analysis_of_all_instances(sessions, finished):
    old_id = receive(sessions, "6.2", 75)
    with sessions() as s:
        complete_series(s, RULES, "test", now=after(6))
        s.commit()
        old = claim(s, "w1")
        if finished:
            transition(s, old, State.DONE, "w1")
            old.outputs_dir = "/spool/outbox/1"
        s.commit()
        new_ids = {record_instance(s, instance("6.2", k), "test")[0].id for k in range(150)}
        s.commit()
        old = s.get(Job, old_id)
        assert len(new_ids - {old_id}) == 1
        new = s.get(Job, (new_ids - {old_id}).pop())
        assert new.state is State.RECEIVING and len(new.received) == 150
        assert {i.sop_instance_uid for i in new.received} == {f"6.2.{k}" for k in range(150)}
        assert any(f"supersedes job {old_id}" in e for e in _events(new))
        assert any(e.startswith(f"superseded by job {new.id}") for e in _events(old))
        if finished:
            assert old.state is State.DONE and predecessor(s, new).id == old_id
        else:  # its worker discards what it finds: the job is no longer its
            assert old.state is State.SKIPPED and f"superseded by job {new.id}" in old.reason
            assert predecessor(s, new) is None
        # sending the same 150 again changes nothing
        assert {record_instance(s, instance("6.2", k), "test")[0].id for k in range(150)} == {
            new.id
        }


@pytest.mark.parametrize(
    "kw, why",
    [
        (
            {"modality": "MR", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4"},
            "not a CT image series (modality MR)",
        ),
        (
            {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7"},  # Secondary Capture labelled CT
            "modality CT, but SOP class 1.2.840.10008.5.1.4.1.1.7, not a CT image storage class",
        ),
        ({"series_description": "Scout 0.5"}, "matches the skip rule"),
        ({"slice_thickness": 10.0}, "10.0 mm thick"),
        ({"orientation": "0\\1\\0\\0\\0\\-1"}, "not an axial series"),
    ],
)
def test_series_not_for_this_node_are_skipped_with_the_reason(sessions, kw, why):
    job_id = receive(sessions, "3.1", 30, **kw)
    with sessions() as s:
        complete_series(s, RULES, "test", now=utcnow() + dt.timedelta(seconds=6))
        s.commit()
        job = s.get(Job, job_id)
        assert job.state is State.SKIPPED and why in job.reason


def test_too_few_slices_is_skipped(sessions):
    job_id = receive(sessions, "3.2", 5)
    with sessions() as s:
        complete_series(s, RULES, "test", now=utcnow() + dt.timedelta(seconds=6))
        s.commit()
        assert "only 5 slices" in s.get(Job, job_id).reason


def _queued(sessions, n: int) -> list[int]:
    ids = []
    with sessions() as s:
        for i in range(n):
            job = Job(
                state=State.QUEUED,
                study_uid="1",
                series_uid=f"9.{i}",
                calling_aet="M",
                called_aet="I",
                stage_seconds={},
            )
            s.add(job)
            s.flush()
            ids.append(job.id)
        s.commit()
    return ids


def test_many_workers_claim_each_job_exactly_once(sessions):
    ids = _queued(sessions, 40)
    taken: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            with sessions() as s:
                job = claim(s, name)
            if job is None:
                return
            with lock:
                taken.append((name, job.id))

    threads = [threading.Thread(target=worker, args=(f"host{i % 2}:{100 + i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(j for _, j in taken) == ids
    assert len({w for w, _ in taken}) > 1  # the work was shared
    with sessions() as s:
        jobs = s.execute(select(Job)).scalars().all()
        assert all(j.state is State.RUNNING and j.attempts == 1 for j in jobs)
        assert {(j.worker, j.id) for j in jobs} == set(taken)


def test_the_postgresql_claim_skips_locked_rows(pg_url):
    engine = fresh_engine(pg_url)
    sessions = make_sessions(engine)
    ids = _queued(sessions, 2)
    with sessions() as s1, sessions() as s2:
        held = s1.execute(select(Job).where(Job.id == ids[0]).with_for_update()).scalar_one()
        job = claim(s2, "other:1")  # does not wait for the locked row: takes the next one
        assert job.id == ids[1]
        s1.rollback()
        assert held.id == ids[0]
    engine.dispose()


def test_a_dead_workers_job_is_queued_again_then_fails_after_the_last_attempt(sessions):
    (job_id,) = _queued(sessions, 1)
    with sessions() as s:
        claim(s, "gone:1")
    with sessions() as s:
        assert requeue_stale(s, 600, 2, "test", dead=lambda w: w == "gone:1")
        s.commit()
        assert s.get(Job, job_id).state is State.QUEUED
    with sessions() as s:
        claim(s, "gone:1")
    with sessions() as s:
        requeue_stale(s, 600, 2, "test", dead=lambda w: w == "gone:1")
        s.commit()
        job = s.get(Job, job_id)
        assert job.state is State.FAILED and "2 attempts" in job.reason
        events = [e.event for e in job.events]
        assert "requeued" in events and events[-1] == "RUNNING->FAILED"
        assert set(job.stage_seconds) == {"QUEUED", "RUNNING"}


def test_a_silent_worker_is_recognised_by_its_heartbeat(sessions):
    (job_id,) = _queued(sessions, 1)
    with sessions() as s:
        claim(s, "far-host:7")
    with sessions() as s:
        assert not requeue_stale(s, 600, 3, "test")
        s.get(Job, job_id).heartbeat_at = utcnow() - dt.timedelta(seconds=601)
        assert requeue_stale(s, 600, 3, "test")
        s.commit()


def test_deliveries_retry_with_backoff_fail_visibly_and_can_be_resent(sessions, tmp_path):
    from tests.test_sender import result

    out = tmp_path / "outbox"
    result(out)
    closed = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port())
    settings = Settings(
        destinations=[closed.model_dump()],
        default_destinations=["pacs"],
        sending={"max_attempts": 3, "backoff_seconds": 0.0, "timeout_s": 2},
        home=tmp_path,
    )
    (job_id,) = _queued(sessions, 1)
    with sessions() as s:
        claim(s, "w:1")
        job = s.get(Job, job_id)
        job.outputs_dir = str(out)
        queue_deliveries(s, job, settings, "w:1")
        s.commit()
        assert job.state is State.SENDING
    for _ in range(3):
        assert deliver_due(sessions, settings, "test") == 0
    with sessions() as s:
        job = s.get(Job, job_id)
        (d,) = job.deliveries
        assert d.state is DeliveryState.FAILED and d.attempts == 3 and len(d.history) == 3
        assert (
            job.state is State.FAILED and "delivery to pacs failed after 3 attempts" in job.reason
        )
        fresh = resend(s, job, "admin")
        s.commit()
        assert [x.state for x in fresh] == [DeliveryState.PENDING] and job.state is State.SENDING
        with pytest.raises(ValueError, match="nothing to retry"):
            transition(s, job, State.QUEUED, "t")
            retry(s, job, "admin")


def test_a_send_held_by_a_sender_that_died_is_due_again_at_once(sessions, tmp_path, monkeypatch):
    import node.export.delivery as delivery

    (job_id,) = _queued(sessions, 1)
    settings = Settings(
        destinations=[
            Destination(
                name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port()
            ).model_dump()
        ],
        default_destinations=["pacs"],
        sending={"timeout_s": 30},
        home=tmp_path,
    )
    with sessions() as s:
        claim(s, "w:1")
        job = s.get(Job, job_id)
        job.outputs_dir = str(tmp_path)
        (d,) = queue_deliveries(s, job, settings, "w:1")
        s.commit()
        d_id = d.id

    def killed(*_a, **_k):  # the sender's process dies in the middle of the C-STORE
        raise SystemExit("killed")

    monkeypatch.setattr(delivery, "result_files", lambda job: [tmp_path / "sr.dcm"])
    monkeypatch.setattr(delivery, "send_files", killed)
    with pytest.raises(SystemExit):
        delivery.attempt(sessions, d_id, settings, "host:999999")
    with sessions() as s:
        d = s.get(Delivery, d_id)
        assert delivery.holder(d) == "host:999999" and d.next_try_at > utcnow() + dt.timedelta(
            seconds=60
        )
        assert (
            delivery.release_dead_holds(s, lambda who: who == "alive:1", "test") == []
        )  # a live holder keeps it
        (freed,) = delivery.release_dead_holds(s, lambda who: who == "host:999999", "test")
        s.commit()
        assert freed.id == d_id and delivery.holder(freed) is None and freed.next_try_at <= utcnow()
        assert freed.history == [] and any(
            e.event == "send lease released" for e in freed.job.events
        )


def test_backoff_doubles_up_to_the_cap():
    s = Settings().sending
    assert [s.backoff(n) for n in (1, 2, 3)] == [5.0, 10.0, 20.0]
    assert s.backoff(30) == s.backoff_max_seconds


def test_delivery_rows_are_not_sent_twice(sessions, tmp_path):
    (job_id,) = _queued(sessions, 1)
    with sessions() as s:
        d = Delivery(
            job_id=job_id,
            destination="x",
            address="X@127.0.0.1:1",
            state=DeliveryState.PENDING,
            next_try_at=utcnow() + dt.timedelta(hours=1),
            history=[],
        )
        s.add(d)
        s.commit()
    assert deliver_due(sessions, Settings(home=tmp_path), "t") == 0  # not due yet: untouched
    with sessions() as s:
        assert s.execute(select(Delivery)).scalar_one().attempts == 0


def test_senders_trying_one_delivery_at_once_send_it_once(sessions, tmp_path):
    """Four senders (threads here; processes or hosts alike) try the same due delivery at the
    same moment: the lease lets one of them send it, the others leave it alone."""
    import node.export.delivery as delivery
    from tests.test_sender import result, storescp

    with storescp(tmp_path / "got") as port:
        settings = Settings(
            destinations=[{"name": "good", "ae_title": "GOOD", "host": "127.0.0.1", "port": port}],
            default_destinations=["good"],
            home=tmp_path,
        )
        (job_id,) = _queued(sessions, 1)
        result(tmp_path / "out")
        with sessions() as s:
            claim(s, "w:1")
            job = s.get(Job, job_id)
            job.outputs_dir = str(tmp_path / "out")
            (d,) = queue_deliveries(s, job, settings, "w:1")
            s.commit()
            d_id = d.id
        start = threading.Barrier(4)
        sent: list[bool] = []

        def one(name: str) -> None:
            start.wait()
            sent.append(delivery.attempt(sessions, d_id, settings, name))

        threads = [threading.Thread(target=one, args=(f"sender:{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(sent) == [False, False, False, True]
        assert len(list((tmp_path / "got").iterdir())) == 1
        with sessions() as s:
            d = s.get(Delivery, d_id)
            assert d.state is DeliveryState.SENT and d.attempts == 1 and len(d.history) == 1
            assert d.held_by is None and s.get(Job, job_id).state is State.DONE
