"""The spool: received instances and produced results, written atomically and durably.

Layout under the spool folder::

    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    outbox/<job id>/dicom/*.dcm, result.json, previews/*.png

UIDs become path parts only after they are checked to be UIDs (digits and dots, at most
64 characters), so no received value can climb out of the spool.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolError(ValueError):
    """A value that cannot become part of a spool path."""


def check_uid(value: object, what: str) -> str:
    uid = str(value or "").strip().rstrip("\x00")
    if not uid or len(uid) > 64 or not UID.match(uid):
        raise SpoolError(f"{what} {uid[:80]!r} is not a valid UID")
    return uid


def instance_path(spool: Path, study_uid: object, series_uid: object, sop_uid: object) -> Path:
    return (
        spool
        / "incoming"
        / check_uid(study_uid, "StudyInstanceUID")
        / check_uid(series_uid, "SeriesInstanceUID")
        / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"
    )


def outbox(spool: Path, job_id: int) -> Path:
    return spool / "outbox" / str(int(job_id))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` so that it is either wholly there or not at all, and on disk
    (temporary file in the same folder, fsync, rename, fsync of the folder). With
    ``sync_dir=False`` the caller syncs the folder (`fsync_dir`), once for many files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def free_mb(spool: Path) -> float:
    spool.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(spool).free / 2**20


def remove_files(paths: list[str]) -> int:
    """Remove files and the folders they leave empty; returns how many were removed."""
    n = 0
    for p in map(Path, paths):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
        for parent in (p.parent, p.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break
    return n


#: A temporary file older than this is left over from a write that never finished (a
#: process killed mid-write); a write in progress takes seconds.
STALE_TMP_S = 600.0


def remove_leftovers(spool: Path, older_than_s: float = STALE_TMP_S) -> int:
    """Remove temporary files of writes that never finished; returns how many."""
    cutoff = time.time() - older_than_s
    n = 0
    for part in ("incoming", "outbox"):
        for tmp in (spool / part).rglob(".*.tmp") if (spool / part).is_dir() else ():
            try:
                if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    n += 1
            except FileNotFoundError:
                pass
    return n


def remove_unrecorded(spool: Path, recorded: set[str], older_than_s: float = STALE_TMP_S) -> int:
    """Remove received files that have no row (written, but the node stopped before it
    recorded them: their sender never got Success and sends them again); returns how many."""
    if not recorded:
        return 0  # a new or replaced database: the spool is not this database's to judge
    known = {str(Path(p).resolve()) for p in recorded}
    cutoff = time.time() - older_than_s
    n = 0
    incoming = spool / "incoming"
    for path in incoming.rglob("*.dcm") if incoming.is_dir() else ():
        try:
            if (
                str(path.resolve()) not in known
                and path.is_file()
                and path.stat().st_mtime < cutoff
            ):
                path.unlink()
                n += 1
        except FileNotFoundError:
            pass
    return n
