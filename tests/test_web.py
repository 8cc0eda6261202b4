"""The admin page's JSON API: every endpoint, its credentials, CSRF, filters and metrics."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from node.config import Settings
from node.db import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    State,
    WorkerStatus,
    make_engine,
    make_sessions,
    utcnow,
)
from node.web.app import create_app
from node.web.view import NodeView

TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
BASIC = {"Authorization": "Basic " + base64.b64encode(b"admin:pw").decode()}


@pytest.fixture
def view(tmp_path) -> NodeView:
    settings = Settings(
        home=tmp_path,
        web={"token": TOKEN, "username": "admin", "password": "pw"},
        receiver={"min_free_mb": 10},
    )
    sessions = make_sessions(make_engine(settings.database_url))
    out = tmp_path / "outbox" / "1"
    (out / "previews").mkdir(parents=True)
    (out / "dicom").mkdir()
    (out / "previews" / "L4-L5.png").write_bytes(b"\x89PNG\r\n\x1a\n fake")
    (out / "dicom" / "seg.dcm").write_bytes(b"x")
    (out / "dicom" / "sr.dcm").write_bytes(b"x")
    now = utcnow()
    with sessions() as s:
        done = Job(
            state=State.DONE,
            study_uid="1.2.3",
            series_uid="1.2.3.1",
            calling_aet="CT1",
            called_aet="IDAICS",
            study_date="20260101",
            series_description="lumbar spine",
            patient_name="DOE^JANE",
            patient_id="P123",
            instances=3,
            stage_seconds={"RECEIVING": 2.0, "QUEUED": 0.5, "RUNNING": 9.0, "SENDING": 1.0},
            state_since=now,
            outputs_dir=str(out),
            attempts=1,
            result={
                "levels": [
                    {
                        "level": "L4-L5",
                        "classes": ["protrusion"],
                        "confidence": 0.9,
                        "measurements": {
                            "extension_mm": 3.1,
                            "extension_share": 0.12,
                            "disc_area_mm2": 900.0,
                        },
                        "warnings": [],
                    }
                ],
                "warnings": [],
                "model": "idaics-v2",
            },
        )
        done.received = [
            Instance(
                sop_instance_uid=f"1.2.3.1.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                path=f"/x/{i}.dcm",
                size=10,
            )
            for i in range(3)
        ]
        done.deliveries = [
            Delivery(
                destination="pacs",
                address="PACS@h:104",
                state=DeliveryState.SENT,
                attempts=2,
                history=[
                    {"at": "t1", "ok": False, "error": "refused", "seconds": 0.1},
                    {"at": "t2", "ok": True, "error": None, "seconds": 1.0},
                ],
            )
        ]
        failed = Job(
            state=State.FAILED,
            reason="delivery to pacs failed",
            study_uid="1.2.4",
            series_uid="1.2.4.1",
            calling_aet="CT2",
            called_aet="IDAICS",
            study_date="20250505",
            instances=100,
            stage_seconds={},
            state_since=now,
        )
        running = Job(
            state=State.RUNNING,
            study_uid="1.2.5",
            series_uid="1.2.5.1",
            calling_aet="CT1",
            called_aet="IDAICS",
            study_date="20260102",
            instances=200,
            stage_seconds={"QUEUED": 1.0},
            state_since=now - dt.timedelta(seconds=4),
        )
        s.add_all(
            [
                done,
                failed,
                running,
                WorkerStatus(name="host:1", model="idaics-v2", device="cpu", last_seen=now),
            ]
        )
        s.commit()
    return NodeView(settings, sessions, receiver_listening=lambda: True, local_workers=lambda: 1)


@pytest.fixture
def client(view) -> TestClient:
    return TestClient(create_app(view, TOKEN))


PROTECTED = [
    ("get", "/"),
    ("get", "/jobs/1"),
    ("get", "/static/app.js"),
    ("get", "/api/health"),
    ("get", "/api/jobs"),
    ("get", "/api/jobs/1"),
    ("get", "/api/jobs/1/previews/L4-L5.png"),
    ("post", "/api/jobs/1/retry"),
    ("post", "/api/jobs/1/resend"),
    ("get", "/metrics"),
    ("get", "/api/openapi.json"),
]


@pytest.mark.parametrize("method, path", PROTECTED)
def test_every_endpoint_but_healthz_wants_credentials(client, method, path):
    assert getattr(client, method)(path).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert getattr(client, method)(path, headers=bad).status_code == 401
    forged = TestClient(client.app, cookies={"idaics_session": "forged"})
    assert getattr(forged, method)(path).status_code == 401


def test_healthz_is_open_and_says_whether_the_receiver_listens(view, client):
    assert client.get("/healthz").json() == {"status": "ok"}
    view.receiver_listening = lambda: False
    down = TestClient(create_app(view, TOKEN)).get("/healthz")
    assert down.status_code == 503


def test_pages_and_static_files_with_basic_auth(client):
    page = client.get("/", headers=BASIC)
    assert page.status_code == 200 and "IDAICS node" in page.text and "csrf-token" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/jobs/1", headers=BASIC).status_code == 200
    assert "fetch(" in client.get("/static/app.js", headers=BASIC).text
    # traversal, encoded so that the client sends it as it is (a plain "../" is resolved by
    # the client before it leaves): the server gets "..", and the app's own file stays unserved
    for raw in ("/static/%2e%2e", "/static/..%2Fapp.py", "/static/%2e%2e%2fapp.py"):
        req = client.build_request("GET", raw, headers=BASIC)
        assert req.url.raw_path == raw.encode()
        r = client.send(req)
        assert r.status_code == 404 and "def " not in r.text


def test_login_with_the_token_sets_a_strict_cookie(client):
    assert client.get("/login", params={"token": "nope"}).status_code == 401
    r = client.get(
        "/login", params={"token": TOKEN, "next": "//evil.example/"}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/jobs").status_code == 200  # the client keeps the cookie


def test_job_list_hides_identity_and_filters_by_state_and_date(client, view):
    data = client.get("/api/jobs", headers=BEARER).json()
    assert [j["id"] for j in data["jobs"]] == [3, 2, 1]
    assert data["counts"]["DONE"] == 1 and data["counts"]["FAILED"] == 1
    assert all("patient_name" not in j for j in data["jobs"])
    running = data["jobs"][0]
    assert running["stage_seconds"]["RUNNING"] >= 4.0  # time in the current state so far
    assert [
        j["id"] for j in client.get("/api/jobs?state=FAILED", headers=BEARER).json()["jobs"]
    ] == [2]
    assert [
        j["id"]
        for j in client.get("/api/jobs?date_from=20260101&date_to=20260101", headers=BEARER).json()[
            "jobs"
        ]
    ] == [1]
    assert client.get("/api/jobs?date_from=2026-01-01", headers=BEARER).status_code == 422
    view.settings.web.show_patient_identity = True
    shown = (
        TestClient(create_app(view, TOKEN))
        .get("/api/jobs?state=DONE", headers=BEARER)
        .json()["jobs"][0]
    )
    assert shown["patient_name"] == "DOE^JANE" and shown["patient_id"] == "P123"


def test_job_detail_has_findings_previews_objects_deliveries_and_audit(client):
    j = client.get("/api/jobs/1", headers=BEARER).json()
    assert j["levels"][0]["classes"] == ["protrusion"] and j["previews"] == ["L4-L5"]
    assert j["objects"] == ["seg.dcm", "sr.dcm"]
    (d,) = j["deliveries"]
    assert d["attempts"] == 2 and [h["ok"] for h in d["history"]] == [False, True]
    assert j["can_retry"] and j["can_resend"]
    assert client.get("/api/jobs/99", headers=BEARER).status_code == 404
    for huge in ("99999999999999999999", str(2**63), "0", "-1"):  # beyond any key: 404, not 500
        assert client.get(f"/api/jobs/{huge}", headers=BEARER).status_code == 404, huge
        assert (
            client.get(f"/api/jobs/{huge}/previews/L4-L5.png", headers=BEARER).status_code == 404
        ), huge
    png = client.get("/api/jobs/1/previews/L4-L5.png", headers=BEARER)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert client.get("/api/jobs/1/previews/..%2F..%2Fetc.png", headers=BEARER).status_code == 404


def test_actions_are_post_with_csrf_and_change_the_job(client):
    assert client.get("/api/jobs/1/retry", headers=BEARER).status_code == 405
    client.get("/login", params={"token": TOKEN})
    assert client.post("/api/jobs/2/retry").status_code == 403  # cookie alone: no CSRF token
    page = client.get("/").text
    csrf = page.split('name="csrf-token" content="')[1].split('"')[0]
    cross = client.post(
        "/api/jobs/2/retry", headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
    )
    assert cross.status_code == 403
    ok = client.post("/api/jobs/2/retry", headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200 and ok.json()["state"] == "QUEUED"
    again = client.post("/api/jobs/2/retry", headers={"X-CSRF-Token": csrf})
    assert again.status_code == 409 and "nothing to retry" in again.json()["detail"]
    sent = client.post("/api/jobs/1/resend", headers=BEARER)  # a bearer token needs no CSRF token
    assert (
        sent.status_code == 200
        and sent.json()["state"] == "SENDING"
        and len(sent.json()["deliveries"]) == 1
    )
    assert client.post("/api/jobs/3/resend", headers=BEARER).status_code == 409
    audit = client.get("/api/jobs/2", headers=BEARER).json()["audit"]
    assert audit[-1]["event"] == "retry requested" and audit[-1]["actor"] == "web:cookie"


def test_health_reports_receiver_workers_model_queue_and_disk(client):
    h = client.get("/api/health", headers=BASIC).json()
    assert h["receiver"]["listening"] and h["workers"]["alive"] == 1
    assert h["model"] == {"name": "idaics-v2", "devices": ["cpu"], "loaded": True}
    assert h["queue"]["running"] == 1 and h["disk"]["free_mb"] > 0


def test_health_says_degraded_and_why_while_a_destination_fails(view, client):
    assert client.get("/api/health", headers=BASIC).json()["status"] == "ok"
    with view.sessions() as s:
        job = s.get(Job, 1)
        job.state = State.SENDING
        s.add(
            Delivery(
                job=job,
                destination="pacs",
                address="PACS@h:104",
                state=DeliveryState.PENDING,
                attempts=2,
                last_error="association rejected",
                history=[],
                next_try_at=utcnow(),
            )
        )
        s.commit()
    h = client.get("/api/health", headers=BASIC).json()
    assert h["status"] == "degraded"
    assert h["reasons"] == [
        "destination pacs is failing: 1 job(s) waiting to be sent again; "
        "last error: association rejected"
    ]
    assert h["destinations"]["failing"]["pacs"]["waiting"] == 1


def test_a_job_that_ends_well_drops_the_reason_of_an_earlier_failure(view):
    from node.jobs import transition

    with view.sessions() as s:
        job = s.get(Job, 2)  # FAILED: "delivery to pacs failed"
        transition(s, job, State.SENDING, "admin")
        assert job.reason == "delivery to pacs failed"  # still true while it is sent again
        transition(s, job, State.DONE, "sender")
        assert job.reason is None


def test_metrics_in_prometheus_format(client):
    text = client.get("/metrics", headers=BEARER).text
    assert "idaics_instances_received_total 3.0" in text
    assert 'idaics_jobs{state="DONE"} 1.0' in text and 'idaics_jobs{state="FAILED"} 1.0' in text
    assert 'idaics_stage_duration_seconds_bucket{le="10.0",stage="RUNNING"} 1.0' in text
    assert 'idaics_stage_duration_seconds_count{stage="QUEUED"} 2.0' in text
    assert "idaics_send_failures_total 1.0" in text
    assert "idaics_queue_depth 0.0" in text and "idaics_receiver_up 1.0" in text


def test_openapi_document_lists_the_api(client):
    doc = client.get("/api/openapi.json", headers=BEARER).json()
    paths = set(doc["paths"])
    assert {
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/retry",
        "/api/jobs/{job_id}/resend",
        "/api/health",
        "/metrics",
    } <= paths
    assert client.get("/docs", headers=BEARER).status_code == 404  # no page that pulls a CDN


def test_a_node_without_credentials_configured_makes_a_private_token(tmp_path):
    from node.web.server import node_token

    settings = Settings(home=tmp_path)
    token = node_token(settings)
    path = tmp_path / "web-token"
    assert token and path.read_text().strip() == token and (path.stat().st_mode & 0o777) == 0o600
    assert node_token(settings) == token


def test_static_files_are_packaged():
    from node.web import app

    assert {p.name for p in Path(app.STATIC).iterdir()} >= {
        "dashboard.html",
        "job.html",
        "app.js",
        "app.css",
    }
