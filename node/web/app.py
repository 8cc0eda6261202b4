"""The admin page and its JSON API (FastAPI).

Everything but ``/healthz`` and ``/login`` needs credentials: a bearer token, basic auth, or
the session cookie that ``/login?token=...`` sets for a browser. Without them: 401. Actions
that change state are POST and need, unless the bearer token was sent, the page's CSRF token
in an ``X-CSRF-Token`` header (a header that a cross-site form or image cannot send), and a
same-origin ``Origin`` where the browser sends one. The page loads nothing from elsewhere.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.config import Settings
from node.db import (
    FINAL_STATES,
    Delivery,
    DeliveryState,
    Job,
    LabelledCase,
    State,
    WorkerStatus,
    utcnow,
)
from node.ingest import spool
from node.jobs import counts_by_state, resend, retry
from node.web.metrics import metrics_text
from node.web.view import NodeView

STATIC = Path(__file__).parent / "static"
#: Job ids are 64-bit integer keys (SQLite INTEGER, PostgreSQL BIGINT at most).
MAX_JOB_ID = 2**63 - 1
COOKIE = "idaics_session"


class Auth:
    def __init__(self, settings: Settings, token: str | None):
        web = settings.web
        self.token = token
        self.basic = (web.username, web.password) if web.username and web.password else None
        self.secret = secrets.token_bytes(32)
        self.session = hmac.new(self.secret, b"session", hashlib.sha256).hexdigest()
        self.csrf = hmac.new(self.secret, b"csrf", hashlib.sha256).hexdigest()

    def method(self, request: Request) -> str | None:
        """How the request is authenticated ("bearer", "basic", "cookie"), or None."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if (
            scheme.lower() == "bearer"
            and self.token
            and hmac.compare_digest(value.strip(), self.token)
        ):
            return "bearer"
        if scheme.lower() == "basic" and self.basic:
            try:
                user, _, pw = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            if hmac.compare_digest(user, self.basic[0]) and hmac.compare_digest(pw, self.basic[1]):
                return "basic"
        cookie = request.cookies.get(COOKIE, "")
        if cookie and hmac.compare_digest(cookie, self.session):
            return "cookie"
        return None


def _iso(t: dt.datetime | None) -> str | None:
    return t.replace(tzinfo=dt.timezone.utc).isoformat(timespec="seconds") if t else None


def job_summary(job: Job, show_identity: bool) -> dict[str, Any]:
    stages = dict(job.stage_seconds or {})
    if job.state not in FINAL_STATES:  # the time in the current state so far
        stages[job.state.value] = round(
            stages.get(job.state.value, 0.0) + (utcnow() - job.state_since).total_seconds(), 1
        )
    out = {
        "id": job.id,
        "state": job.state.value,
        "reason": job.reason,
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.state_since),
        "study_date": job.study_date,
        "series_description": job.series_description,
        "modality": job.modality,
        "calling_aet": job.calling_aet,
        "instances": job.instances,
        "study_instance_uid": job.study_uid,
        "series_instance_uid": job.series_uid,
        "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
    }
    if show_identity:
        out["patient_name"], out["patient_id"] = job.patient_name, job.patient_id
    return out


def job_detail(
    job: Job, show_identity: bool, cases: list[LabelledCase] | None = None
) -> dict[str, Any]:
    """A job with its findings, objects, deliveries, audit trail, and the labelled cases
    that came of it (a SEG job's) or that correct it (an analysed job's)."""
    out = job_summary(job, show_identity)
    out["cases"] = [
        {
            "id": c.id,
            "seg_job": c.seg_job_id,
            "analysed_job": c.analysed_job_id,
            "created_at": _iso(c.created_at),
            "levels": c.levels,
            "problems": c.problems,
        }
        for c in cases or []
    ]
    result = job.result or {}
    out["levels"] = result.get("levels", [])
    out["warnings"] = result.get("warnings", [])
    out["model"] = result.get("model")
    out["model_version"] = result.get("model_version")
    #: what a shadow model found, level by level beside the live model (never sent)
    out["shadow"] = result.get("shadow")
    out["worker"] = job.worker
    folder = Path(job.outputs_dir) if job.outputs_dir else None
    found = (
        {p.stem for p in (folder / "previews").glob("*.png")}
        if folder and (folder / "previews").is_dir()
        else set()
    )
    ordered = [
        lv["level"].replace(" ", "_") for lv in out["levels"]
    ]  # cranial to caudal, as the table
    out["previews"] = [n for n in ordered if n in found] + sorted(found - set(ordered))
    out["objects"] = (
        sorted(p.name for p in (folder / "dicom").glob("*.dcm"))
        if folder and (folder / "dicom").is_dir()
        else []
    )
    out["deliveries"] = [
        {
            "id": d.id,
            "destination": d.destination,
            "address": d.address,
            "state": d.state.value,
            "attempts": d.attempts,
            "last_error": d.last_error,
            "created_at": _iso(d.created_at),
            "sent_at": _iso(d.sent_at),
            "next_try_at": _iso(d.next_try_at),
            "history": d.history or [],
        }
        for d in job.deliveries
    ]
    out["audit"] = [
        {"at": _iso(e.at), "actor": e.actor, "event": e.event, "detail": e.detail}
        for e in job.events
    ]
    out["can_retry"] = job.state in FINAL_STATES and not job.instances_deleted
    out["can_resend"] = job.state in FINAL_STATES and bool(job.deliveries) and bool(out["objects"])
    return out


def health(view: NodeView) -> dict[str, Any]:
    s = view.settings
    alive_after = utcnow() - dt.timedelta(seconds=max(3 * s.workers.heartbeat_seconds, 10))
    with view.sessions() as db:
        workers = (
            db.execute(
                select(WorkerStatus).where(
                    WorkerStatus.stopped.is_(False), WorkerStatus.last_seen >= alive_after
                )
            )
            .scalars()
            .all()
        )
        counts = counts_by_state(db)
        retrying = (
            db.execute(
                select(Delivery).where(
                    Delivery.state == DeliveryState.PENDING, Delivery.attempts > 0
                )
            )
            .scalars()
            .all()
        )
        failing: dict[str, dict[str, Any]] = {}
        for d in retrying:
            f = failing.setdefault(d.destination, {"waiting": 0, "last_error": None})
            f["waiting"] += 1
            f["last_error"] = d.last_error
    free = spool.free_mb(s.spool_dir)
    listening = view.receiver_listening()
    reasons = [] if listening else ["the DICOM listener is not listening"]
    reasons += [
        f"destination {name} is failing: {f['waiting']} job(s) waiting to be sent again; "
        f"last error: {f['last_error']}"
        for name, f in sorted(failing.items())
    ]
    if free < s.receiver.min_free_mb:
        reasons.append(
            f"spool disk below its floor ({free:.0f} of {s.receiver.min_free_mb} MB free): "
            "instances are refused"
        )
    if counts["QUEUED"] and not workers and s.workers.count > 0:
        reasons.append(f"{counts['QUEUED']} job(s) queued and no worker alive")
    return {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "destinations": {"failing": failing},
        "receiver": {
            "listening": listening,
            "ae_title": s.receiver.ae_title,
            "port": s.receiver.port,
        },
        "workers": {
            "alive": len(workers),
            "started_here": view.local_workers(),
            "list": [
                {
                    "name": w.name,
                    "model": w.model,
                    "device": w.device,
                    "job_id": w.job_id,
                    "last_seen": _iso(w.last_seen),
                }
                for w in workers
            ],
        },
        "model": {
            "name": workers[0].model if workers else s.model.name,
            "devices": sorted({w.device for w in workers if w.device}),
            "loaded": bool(workers),
        },
        "queue": {
            "depth": counts["QUEUED"],
            "receiving": counts["RECEIVING"],
            "running": counts["RUNNING"],
            "sending": counts["SENDING"],
        },
        "jobs": counts,
        "disk": {
            "spool": str(s.spool_dir),
            "free_mb": round(free),
            "floor_mb": s.receiver.min_free_mb,
        },
    }


def create_app(view: NodeView, token: str | None) -> FastAPI:
    settings = view.settings
    auth = Auth(settings, token)
    app = FastAPI(
        title="IDAICS node",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        description="Jobs, findings and health of the IDAICS node, and actions on jobs.",
    )
    app.state.auth = auth

    def need_auth(request: Request) -> str:
        how = auth.method(request)
        if how is None:
            headers = {"WWW-Authenticate": 'Basic realm="IDAICS node"' if auth.basic else "Bearer"}
            raise HTTPException(401, "credentials needed", headers=headers)
        return how

    def need_csrf(request: Request, how: str = Depends(need_auth)) -> str:
        origin = request.headers.get("origin")
        if (
            origin
            and origin.rstrip("/") != f"{request.url.scheme}://{request.headers.get('host', '')}"
        ):
            raise HTTPException(403, "cross-site request refused")
        if how != "bearer" and not hmac.compare_digest(
            request.headers.get("x-csrf-token", ""), auth.csrf
        ):
            raise HTTPException(403, "missing or wrong X-CSRF-Token")
        return how

    def page(name: str) -> HTMLResponse:
        html = (STATIC / name).read_text().replace("{{csrf}}", auth.csrf)
        return HTMLResponse(
            html,
            headers={
                "Cache-Control": "no-store",
                "X-Frame-Options": "DENY",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
            },
        )

    def get_job(db: Session, job_id: int) -> Job:
        if (
            not 1 <= job_id <= MAX_JOB_ID
        ):  # beyond a 64-bit key no job is, nor can the database look
            raise HTTPException(404, f"no job {job_id}")
        job = db.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        ok = view.receiver_listening()
        return JSONResponse(
            {"status": "ok" if ok else "receiver not listening"}, status_code=200 if ok else 503
        )

    @app.get("/login", include_in_schema=False)
    def login(token: str = "", next: str = "/") -> Response:
        if not auth.token or not hmac.compare_digest(token, auth.token):
            raise HTTPException(401, "wrong token")
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        r = RedirectResponse(target, status_code=303)
        r.set_cookie(COOKIE, auth.session, httponly=True, samesite="strict", path="/")
        return r

    @app.get("/", include_in_schema=False, dependencies=[Depends(need_auth)])
    def dashboard() -> HTMLResponse:
        return page("dashboard.html")

    @app.get("/jobs/{job_id}", include_in_schema=False, dependencies=[Depends(need_auth)])
    def job_page(job_id: int) -> HTMLResponse:
        return page("job.html")

    @app.get("/static/{name}", include_in_schema=False, dependencies=[Depends(need_auth)])
    def static(name: str) -> FileResponse:
        path = STATIC / name
        if name not in {"app.js", "app.css"} or not path.is_file():
            raise HTTPException(404)
        return FileResponse(path)

    @app.get(
        "/api/health",
        dependencies=[Depends(need_auth)],
        summary="Receiver, workers, model, queue, disk",
    )
    def api_health() -> dict:
        return health(view)

    @app.get("/api/jobs", dependencies=[Depends(need_auth)], summary="Jobs, newest first")
    def api_jobs(
        state: State | None = None,
        date_from: str | None = Query(None, pattern=r"^\d{8}$"),
        date_to: str | None = Query(None, pattern=r"^\d{8}$"),
        limit: int = Query(100, ge=1, le=1000),
    ) -> dict:
        q = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            q = q.where(Job.state == state)
        if date_from:
            q = q.where(Job.study_date >= date_from)
        if date_to:
            q = q.where(Job.study_date <= date_to)
        with view.sessions() as db:
            jobs = [
                job_summary(j, settings.web.show_patient_identity) for j in db.execute(q).scalars()
            ]
            counts = counts_by_state(db)
        return {"jobs": jobs, "counts": counts}

    @app.get(
        "/api/jobs/{job_id}",
        dependencies=[Depends(need_auth)],
        summary="One job: findings, objects, deliveries, audit trail",
    )
    def api_job(job_id: int) -> dict:
        with view.sessions() as db:
            job = get_job(db, job_id)
            cases = db.execute(
                select(LabelledCase)
                .where(
                    (LabelledCase.seg_job_id == job_id) | (LabelledCase.analysed_job_id == job_id)
                )
                .order_by(LabelledCase.id)
            ).scalars()
            return job_detail(job, settings.web.show_patient_identity, list(cases))

    @app.get(
        "/api/jobs/{job_id}/previews/{level}.png",
        dependencies=[Depends(need_auth)],
        summary="The preview picture of one level",
        response_class=FileResponse,
    )
    def api_preview(job_id: int, level: str) -> FileResponse:
        with view.sessions() as db:
            job = get_job(db, job_id)
        folder = Path(job.outputs_dir or "/nonexistent") / "previews"
        names = {p.stem: p for p in folder.glob("*.png")} if folder.is_dir() else {}
        if level not in names:  # only names that exist: nothing from the URL reaches the path
            raise HTTPException(404, f"no preview {level!r} for job {job_id}")
        return FileResponse(names[level], media_type="image/png")

    @app.post(
        "/api/jobs/{job_id}/retry",
        dependencies=[Depends(need_csrf)],
        summary="Run the analysis again",
    )
    def api_retry(job_id: int, request: Request) -> dict:
        with view.sessions() as db:
            job = get_job(db, job_id)
            try:
                retry(db, job, f"web:{auth.method(request)}")
            except ValueError as exc:
                raise HTTPException(409, str(exc)) from None
            db.commit()
            return {"id": job.id, "state": job.state.value}

    @app.post(
        "/api/jobs/{job_id}/resend",
        dependencies=[Depends(need_csrf)],
        summary="Send the results again",
    )
    def api_resend(job_id: int, request: Request) -> dict:
        with view.sessions() as db:
            job = get_job(db, job_id)
            try:
                fresh = resend(db, job, f"web:{auth.method(request)}")
            except ValueError as exc:
                raise HTTPException(409, str(exc)) from None
            db.commit()
            out = {"id": job.id, "state": job.state.value, "deliveries": [d.id for d in fresh]}
        return out

    @app.get(
        "/metrics",
        dependencies=[Depends(need_auth)],
        summary="Prometheus metrics",
        response_class=Response,
    )
    def metrics() -> Response:
        return Response(metrics_text(view), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/openapi.json", dependencies=[Depends(need_auth)], include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    return app
