"""Turnaround: from the last instance of a 300-slice study sent to `idaics serve` until its SEG
and SR are stored in Orthanc.

Real processes on loopback: Orthanc as the PACS, dcmtk `storescu` senders as the modality,
`idaics serve` with one worker and the bundled model. The series is complete when its
association is released (the stack is even), so the quiet time does not count.

Run: ``python -m tests.bench.bench_turnaround [--repeat N]``.
Target: at most 10 s on the 2-core CPU, at most 3 s on an H100.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from node.db import Job, make_engine, make_sessions
from node.phantom.generate import SERIES_DIR, generate_study
from tests.bench.bench_receive import send_parallel
from tests.servers import NodeProcess, node_config, orthanc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--senders", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with orthanc(tmp / "orthanc") as pacs:
            dest = {
                "name": "pacs",
                "ae_title": pacs.aet,
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
            }
            cfg, values = node_config(
                tmp / "node",
                destinations=[dest],
                default_destinations=["pacs"],
                series={"quiet_seconds": 30.0},
                receiver={"allowed_calling_aets": ["MODALITY"]},
            )
            node = NodeProcess(cfg, tmp / "node", values["receiver"]["port"], "IDAICS").start()
            time.sleep(8)  # the worker loads and warms up the model once per process
            print(f"{'send s':>7} {'to SEG+SR s':>12}  stages in the node (s)")
            turnaround = []
            try:
                for r in range(args.repeat):
                    study = generate_study(tmp / f"study{r}", 5000 + r, 0, slices=args.slices)
                    files = sorted((study.folder / SERIES_DIR).glob("*.dcm"))
                    uid = study.truth["study_instance_uid"]
                    t0 = time.perf_counter()
                    send_parallel(files, node.port, "IDAICS", args.senders)
                    sent = time.perf_counter()
                    while time.perf_counter() - sent < 300:
                        q = {"Level": "Series", "Query": {"StudyInstanceUID": uid}}
                        found = {
                            pacs.get_json(f"/series/{s}")["MainDicomTags"].get("Modality")
                            for s in pacs.post_json("/tools/find", q)
                        }
                        if {"SEG", "SR"} <= found:
                            break
                        time.sleep(0.1)
                    done = time.perf_counter()
                    engine = make_engine(f"sqlite:///{tmp / 'node' / 'idaics.db'}")
                    with make_sessions(engine)() as s:
                        job = s.query(Job).order_by(Job.id.desc()).first()
                        stages = {k: round(v, 1) for k, v in (job.stage_seconds or {}).items()}
                    engine.dispose()
                    turnaround.append(done - sent)
                    print(f"{sent - t0:>7.1f} {done - sent:>12.1f}  {stages}")
            finally:
                node.stop()
    print(
        f"last instance sent to SEG and SR in the PACS: min {min(turnaround):.1f} s max "
        f"{max(turnaround):.1f} s (target at most 10 s on 2 CPU cores, 3 s on an H100)"
    )


if __name__ == "__main__":
    main()
