"""Schema migrations: a database made by the previous release keeps every row through the
upgrade, the migrated schema is the models' schema, and a newer database is refused."""

from __future__ import annotations

import datetime as dt
import sqlite3

import pytest
from sqlalchemy import create_engine, inspect, select, text

from node import migrations
from node.cli import main
from node.db import (
    AuditEvent,
    Base,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    State,
    make_engine,
    make_sessions,
)
from tests.servers import postgres


@pytest.fixture(scope="module")
def pg_url():
    with postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'idaics.db'}"
    u = request.getfixturevalue("pg_url")
    engine = create_engine(u)
    with engine.begin() as conn:  # each test starts from an empty database
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return u


def previous_release_database(url: str) -> None:
    """A database as the release before migrations made it: the baseline's tables and no
    ``alembic_version``; with jobs in every state, their instances, deliveries (one held for
    a try by a sender, as that release recorded it, in the history) and audit events."""
    from alembic import command

    engine = create_engine(url)
    with engine.connect() as conn:
        command.upgrade(migrations._config(conn), migrations.BASELINE)
        conn.execute(text("DROP TABLE alembic_version"))
        conn.commit()
        t0 = dt.datetime(2026, 11, 30, 8, 0, 0)
        for i, state in enumerate(State):
            conn.execute(
                text(
                    "INSERT INTO job (id, state, attempts, created_at, state_since, stage_seconds, study_uid, series_uid, "
                    "calling_aet, called_aet, instances, bytes_received, last_instance_at, association_released, "
                    "instances_deleted, patient_id, result) VALUES (:id, :state, 1, :t, :t, '{}', :st, :se, 'CT1', "
                    "'IDAICS', 3, 3000, :t, :rel, :deleted, :pid, :result)"
                ),
                dict(
                    id=i + 1,
                    state=state.value,
                    t=t0,
                    st=f"1.2.{i}",
                    se=f"1.2.{i}.1",
                    rel=True,
                    deleted=False,
                    pid=f"P{i}",
                    result='{"levels": 5}' if state is State.DONE else None,
                ),
            )
            for k in range(3):
                conn.execute(
                    text(
                        "INSERT INTO instance (job_id, sop_instance_uid, sop_class_uid, path, size, position, frames, "
                        "received_at) VALUES (:j, :uid, '1.2.840.10008.5.1.4.1.1.2', :p, 1000, :pos, 1, :t)"
                    ),
                    dict(
                        j=i + 1, uid=f"1.2.{i}.1.{k}", p=f"/spool/{i}/{k}.dcm", pos=-2.0 * k, t=t0
                    ),
                )
            conn.execute(
                text(
                    "INSERT INTO audit_event (job_id, at, actor, event, detail) "
                    "VALUES (:j, :t, 'host:1', 'received', 'three instances')"
                ),
                dict(j=i + 1, t=t0),
            )
        held = (
            '[{"at": "2026-11-30T08:00:00", "ok": false, "error": "refused", "seconds": 0.1}, '
            '{"held_by": "host:4242", "at": "2026-11-30T08:05:00"}]'
        )
        sent = '[{"at": "2026-11-30T08:00:00", "ok": true, "error": null, "seconds": 0.4}]'
        for j, state, history in ((4, "PENDING", held), (5, "SENT", sent)):
            conn.execute(
                text(
                    "INSERT INTO delivery (job_id, destination, address, state, attempts, created_at, history, "
                    "next_try_at) VALUES (:j, 'pacs', 'PACS@127.0.0.1:4242', :s, 1, :t, :h, :t)"
                ),
                dict(j=j, s=state, t=t0, h=history),
            )
        conn.commit()
    engine.dispose()


def test_head_is_the_newest_revision():
    from alembic.script import ScriptDirectory

    with create_engine("sqlite://").connect() as conn:
        script = ScriptDirectory.from_config(migrations._config(conn))
    assert script.get_current_head() == migrations.HEAD
    assert [s.revision for s in script.walk_revisions()][-1] == migrations.BASELINE


def test_migrations_make_the_models_schema(url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(url)
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.HEAD
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_a_previous_release_database_is_upgraded_and_loses_nothing(url, tmp_path):
    previous_release_database(url)
    engine = make_engine(url)  # what every node process does at start
    sessions = make_sessions(engine)
    with sessions() as s:
        jobs = s.execute(select(Job).order_by(Job.id)).scalars().all()
        assert [j.state for j in jobs] == list(State)
        assert [j.patient_id for j in jobs] == [f"P{i}" for i in range(len(State))]
        assert jobs[list(State).index(State.DONE)].result == {"levels": 5}
        assert s.query(Instance).count() == 3 * len(State)
        assert s.query(AuditEvent).count() == len(State)
        pending, sent = s.execute(select(Delivery).order_by(Delivery.id)).scalars().all()
        # the hold moved from the history into its column; the attempts stayed
        assert pending.state is DeliveryState.PENDING and pending.held_by == "host:4242"
        assert pending.history == [
            {"at": "2026-11-30T08:00:00", "ok": False, "error": "refused", "seconds": 0.1}
        ]
        assert sent.held_by is None and sent.history[0]["ok"] is True
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.HEAD
        assert "held_by" in {c["name"] for c in inspect(conn).get_columns("delivery")}
    engine.dispose()
    if url.startswith("sqlite"):  # the file as it was is kept beside it, and opens
        (copy,) = tmp_path.glob("idaics.db.before-migrations-*")
        old = sqlite3.connect(copy)
        assert old.execute("SELECT count(*) FROM job").fetchone()[0] == len(State)
        assert "held_by" not in {r[1] for r in old.execute("PRAGMA table_info(delivery)")}
        old.close()
        make_engine(url).dispose()  # current now: no second copy
        assert len(list(tmp_path.glob("idaics.db.before-*"))) == 1


def test_a_database_newer_than_the_release_is_refused(url):
    make_engine(url).dispose()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(migrations.MigrationError, match="newer than this release"):
        migrations.upgrade(engine)
    engine.dispose()


def test_tables_of_another_program_are_not_taken_for_the_baseline(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE job (id INTEGER PRIMARY KEY, name TEXT)"))
    with pytest.raises(migrations.MigrationError, match="lacks"):
        migrations.upgrade(engine)
    engine.dispose()


def test_db_upgrade_command(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'idaics.db'}"
    previous_release_database(url)
    monkeypatch.setenv("IDAICS_DATABASE_URL", url)
    monkeypatch.setenv("IDAICS_HOME", str(tmp_path))
    assert main(["db", "upgrade"]) == 0
    assert (
        f"from {migrations.BASELINE} (made before migrations) to {migrations.HEAD}"
        in capsys.readouterr().out
    )
    assert main(["db", "current"]) == 0
    assert migrations.HEAD in capsys.readouterr().out
    assert main(["db", "upgrade"]) == 0
    assert "already at" in capsys.readouterr().out
