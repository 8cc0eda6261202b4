"""Many modalities at once: parallel dcmtk `storescu` senders against `idaics serve`.

Each sender sends its own series of small CT instances (64x64, so that the receiver, not the
disk, is measured); the node runs without workers. Used by the load test
(`tests/test_load.py`) and its benchmark (`tests/bench/bench_load.py`).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from node.db import Instance, Job, make_engine, make_sessions
from tests.servers import NodeProcess, dcmtk, node_config


def write_series(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` slices of a 64x64 CT series with its own study and series UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = (
        generate_uid(entropy_srcs=["load", str(seed), x]) for x in ("st", "se", "fr")
    )
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        uid = generate_uid(entropy_srcs=["load", str(seed), str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName = "CT", f"LOAD{seed}", f"LOAD^{seed}"
        ds.SeriesDescription, ds.InstanceNumber = "load test", k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, -1.0 * k]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 1.0
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = rng.integers(0, 2000, (64, 64), dtype=np.int16).tobytes()
        p = folder / f"{k:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass(frozen=True)
class LoadResult:
    senders: int
    sent: int  # instances the senders had acknowledged (storescu exit 0: every one Success)
    stored: int  # rows in the node's database
    series: int
    jobs_per_series: dict[str, int]
    instances_per_job: list[int]
    seconds: float
    peak_rss_mb: float
    failed_senders: int

    @property
    def per_second(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def run_load(home: Path, senders: int = 20, instances: int = 150) -> LoadResult:
    data = home / "series"
    folders = []
    for i in range(senders):
        write_series(data / f"s{i:02d}", instances, seed=i)
        folders.append(data / f"s{i:02d}")
    path, cfg = node_config(
        home / "node",
        workers={"count": 0},
        receiver={
            "max_associations": max(senders + 4, 10),
            "max_connections_per_peer": senders + 4,
        },
    )
    node = NodeProcess(
        path, home / "node", cfg["receiver"]["port"], cfg["receiver"]["ae_title"]
    ).start()
    peak = 0.0
    try:
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [
                    dcmtk("storescu"),
                    "-aet",
                    "MODALITY",
                    "-aec",
                    node.ae_title,
                    "127.0.0.1",
                    str(node.port),
                    "+sd",
                    str(f),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for f in folders
        ]
        while any(p.poll() is None for p in procs):
            peak = max(peak, _rss_mb(node.proc.pid))
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        failed = sum(p.returncode != 0 for p in procs)
        for p in procs:
            p.communicate()
        sent = (senders - failed) * instances
        time.sleep(cfg["series"]["quiet_seconds"] + 1.5)  # every series completes
        engine = make_engine(f"sqlite:///{home / 'node' / 'idaics.db'}")
        with make_sessions(engine)() as s:
            stored = s.execute(select(func.count(Instance.id))).scalar_one()
            jobs = s.execute(select(Job)).scalars().all()
            per_series: dict[str, int] = {}
            for j in jobs:
                per_series[j.series_uid] = per_series.get(j.series_uid, 0) + 1
            sizes = sorted(j.instances for j in jobs)
        engine.dispose()
    finally:
        node.stop()
    return LoadResult(
        senders, sent, stored, len(per_series), per_series, sizes, seconds, peak, failed
    )


def cpu_count() -> int:
    return os.cpu_count() or 1
