"""Shadow mode: a candidate model runs beside the live one on live traffic.

After a job's live results are handed to the sender, the worker analyses the same volume
with the shadow model (`idaics models shadow NAME`) and keeps what it found in the job's
result, level by level beside the live model's. Nothing of it is sent to PACS. The job page
shows the comparison; `idaics models compare` sums it over all jobs, and where a radiologist
corrected a job, scores both models against the correction.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node.analysis.study import StudyResult, analyze_volume
from node.analysis.volume import Volume, VolumeError
from node.db import Job, LabelledCase
from node.inference.model import ModelError, load_model

log = logging.getLogger(__name__)


def side_by_side(live: dict, shadow: StudyResult) -> dict[str, Any]:
    """Per level: the live and the shadow model's classes, and whether they agree."""
    theirs = {d.level: [c.value for c in d.classes] for d in shadow.discs}
    rows = []
    for lv in live.get("levels", []):
        other = theirs.get(lv["level"])
        rows.append(
            {
                "level": lv["level"],
                "live": lv["classes"],
                "shadow": other,
                "agree": other is not None and sorted(other) == sorted(lv["classes"]),
            }
        )
    for level in sorted(set(theirs) - {lv["level"] for lv in live.get("levels", [])}):
        rows.append({"level": level, "live": None, "shadow": theirs[level], "agree": False})
    return {
        "model": shadow.model,
        "model_version": shadow.model_version,
        "levels": rows,
        "agree": sum(r["agree"] for r in rows),
        "compared": len(rows),
    }


def run_shadow(
    sessions: sessionmaker,
    job_id: int,
    vol: Volume,
    live: dict,
    folder: Any,
    device: str | None,
) -> dict[str, Any]:
    """Analyse ``vol`` with the shadow model in ``folder`` and keep the comparison with the
    live model's result (``live``) in the job's result; a shadow that fails is recorded there,
    and the job is not touched otherwise."""
    t0 = time.perf_counter()
    try:
        model = load_model(folder, device)
        result = analyze_volume(vol, model)
    except (ModelError, VolumeError, OSError, RuntimeError, ValueError) as exc:
        log.warning("job %s: the shadow model %s failed: %s", job_id, folder, exc)
        kept: dict[str, Any] = {"model": str(folder), "error": f"{type(exc).__name__}: {exc}"}
    else:
        kept = side_by_side(live, result)
        kept["seconds"] = round(time.perf_counter() - t0, 2)
        log.info(
            "job %s: shadow model %s agrees on %d of %d levels",
            job_id,
            result.model,
            kept["agree"],
            kept["compared"],
        )
    with sessions() as s:
        job = s.get(Job, job_id)
        job.result = {**(job.result or {}), "shadow": kept}  # a new value: the column is JSON
        s.commit()
    return kept


def compare(sessions: sessionmaker) -> dict[str, Any]:
    """Over every job with a shadow result: agreement per shadow model, the live-vs-shadow
    table of primary classes, and both models against the radiologists' corrections."""
    from node.training.evaluate import primary

    out: dict[str, Any] = {}
    with sessions() as s:
        jobs = [
            j
            for j in s.execute(select(Job).where(Job.result.is_not(None))).scalars()
            if isinstance(j.result, dict) and isinstance(j.result.get("shadow"), dict)
        ]
        corrections: dict[int, dict[str, list[str]]] = {}
        for c in s.execute(select(LabelledCase).order_by(LabelledCase.id)).scalars():
            corrections[c.analysed_job_id] = {lv["level"]: lv["classes"] for lv in c.levels}
        for job in jobs:
            sh = job.result["shadow"]
            if "error" in sh:
                continue
            key = f"{sh['model']} {sh.get('model_version', '')}".strip()
            o = out.setdefault(
                key,
                {
                    "jobs": 0,
                    "levels": 0,
                    "agree": 0,
                    "table": Counter(),
                    "corrected_levels": 0,
                    "live_right": 0,
                    "shadow_right": 0,
                },
            )
            o["jobs"] += 1
            truth = corrections.get(job.id, {})
            for r in sh["levels"]:
                o["levels"] += 1
                o["agree"] += bool(r["agree"])
                live = primary(r["live"] or [])
                other = primary(r["shadow"] or [])
                o["table"][(live, other)] += 1
                if r["level"] in truth:
                    want = primary(truth[r["level"]])
                    o["corrected_levels"] += 1
                    o["live_right"] += live == want
                    o["shadow_right"] += other == want
    for o in out.values():
        o["table"] = {f"{a} -> {b}": n for (a, b), n in sorted(o["table"].items())}
    return out
