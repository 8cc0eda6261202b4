"""The DICOM listener: C-ECHO, and C-STORE into the spool with a row in the database.

An instance is answered Success only once its file is on disk (atomic write, fsync) and its
row is committed. Everything else gets a failure status with the reason in the log, and the
listener keeps serving:

- 0xA700 Out of Resources: the spool's disk is below the configured free-space floor, or the
  file could not be written;
- 0xC000 Cannot understand: the dataset cannot be parsed, or lacks valid UIDs;
- 0x0110 Processing failure: the database could not record the instance (the sender retries).

CT and Enhanced CT are accepted in every transfer syntax; any other storage SOP class is
accepted uncompressed, so that a series routed here by mistake is recorded and skipped with
its reason rather than refused without a trace.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from sqlalchemy.orm import sessionmaker

from node import logs
from node.config import Settings
from node.ingest import spool
from node.ingest.guard import GuardedAE, GuardedServer
from node.ingest.series import CT_STORAGE, ReceivedInstance
from node.jobs import association_released, record_instance

log = logging.getLogger(__name__)

UNCOMPRESSED = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    v = ds.get(keyword)
    return None if v in (None, "") else str(v)[:limit]


def _geometry(ds: Dataset) -> tuple[float | None, float | None, str | None]:
    """(position along the slice normal, slice thickness, orientation) of an image."""
    try:
        if "ImageOrientationPatient" in ds:
            iop = [float(x) for x in ds.ImageOrientationPatient]
            thick = ds.get("SliceThickness")
        else:  # enhanced multi-frame: the shared functional groups
            shared = ds.SharedFunctionalGroupsSequence[0]
            iop = [float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
            thick = shared.PixelMeasuresSequence[0].get("SliceThickness")
        pos = None
        if "ImagePositionPatient" in ds:
            normal = np.cross(iop[:3], iop[3:])
            pos = float(np.dot([float(x) for x in ds.ImagePositionPatient], normal))
        return (
            pos,
            (float(thick) if thick not in (None, "") else None),
            "\\".join(f"{x:.6f}" for x in iop),
        )
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None, None, None


UNDEFINED_LENGTH = 0xFFFFFFFF


def truncated(ds: Dataset) -> str | None:
    """The first element whose value is shorter than its declared length (a cut-off dataset,
    which pydicom would read without complaint), or None."""
    for tag, elem in ds.items():
        if (
            isinstance(elem, RawDataElement)
            and elem.length != UNDEFINED_LENGTH
            and elem.value is not None
            and len(elem.value) != elem.length
        ):
            return f"element {tag} is cut off ({len(elem.value)} of {elem.length} bytes)"
    return None


class _Recorder:
    """Records stored instances in the database with group commits.

    Handlers hand over an instance whose file is written and wait; one thread syncs the
    folders of everything waiting (once per folder), records it all in one transaction and
    then lets the handlers answer. Under parallel senders this costs one folder sync and one
    commit per batch rather than per instance, and still nothing is answered before it is
    durable.
    """

    BATCH = 64

    def __init__(self, sessions: sessionmaker, actor: str):
        self.sessions = sessions
        self.actor = actor
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="idaics-recorder", daemon=True)
        self.thread.start()

    def record(self, got: ReceivedInstance, timeout: float = 120) -> None:
        done = threading.Event()
        box: list[BaseException | None] = [None]
        self.queue.put((got, done, box))
        if not done.wait(timeout):
            raise TimeoutError("the database did not record the instance in time")
        if box[0] is not None:
            raise box[0]

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(30)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.BATCH:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            error: BaseException | None = None
            try:
                for folder in {str(Path(got.path).parent) for got, _, _ in batch}:
                    spool.fsync_dir(Path(folder))
                with self.sessions() as s:
                    for got, _, _ in batch:
                        record_instance(s, got, self.actor)
                    s.commit()
            except BaseException as exc:  # every waiting handler answers with the failure
                error = exc
            for _, done, box in batch:
                box[0] = error
                done.set()


class Receiver:
    """A pynetdicom AE serving C-ECHO and C-STORE on the configured address."""

    def __init__(self, settings: Settings, sessions: sessionmaker, actor: str):
        self.settings = settings
        self.sessions = sessions
        self.actor = actor
        self.server: GuardedServer | None = None
        self.recorder: _Recorder | None = None
        self._open: dict[str, set[str]] = {}  # association -> series it has carried
        self._ids: weakref.WeakKeyDictionary[Association, str] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        r = settings.receiver
        ae = GuardedAE(ae_title=r.ae_title)
        ae.maximum_associations = r.max_associations  # counted once an association is requested
        ae.maximum_pdu_size = r.max_pdu_bytes  # large PDUs from senders that allow it, but bounded
        ae.network_timeout = r.network_timeout_s
        ae.acse_timeout = r.request_timeout_s  # the ARTIM timer: waiting for the A-ASSOCIATE-RQ
        ae.dimse_timeout = r.network_timeout_s
        ae.require_called_aet = r.check_called_aet
        if r.allowed_calling_aets:
            ae.require_calling_aet = list(r.allowed_calling_aets)
        else:
            log.warning(
                "no allowed_calling_aets configured: any calling AE may store to %s", r.ae_title
            )
        ae.add_supported_context(Verification)
        # CT in every transfer syntax (compressed ones are decoded at analysis); any other
        # storage class uncompressed, only to be recorded and skipped. pynetdicom copies the
        # whole list for each association, so it is kept short.
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is None:
                continue
            ct = cx.abstract_syntax in CT_STORAGE
            ae.add_supported_context(
                cx.abstract_syntax, ALL_TRANSFER_SYNTAXES if ct else UNCOMPRESSED
            )
        self.ae = ae

    def start(self) -> None:
        r = self.settings.receiver
        handlers = [
            (event, self._logged(fn))
            for event, fn in (
                (evt.EVT_C_ECHO, self._on_echo),
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_RELEASED, self._on_released),
                (evt.EVT_ABORTED, self._on_aborted),
                (evt.EVT_REJECTED, self._on_rejected),
            )
        ]
        self.recorder = _Recorder(self.sessions, self.actor)
        self.server = self.ae.start_guarded_server(
            (r.host, r.port),
            handlers,
            r.max_connections_per_peer,
            max_instance_bytes=r.max_instance_mb << 20,
            min_rate=r.min_transfer_kib_s * 1024,
            max_idle=r.max_idle_s,
        )
        log.info("listening as %s on %s:%d", r.ae_title, r.host, r.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self.recorder is not None:
            self.recorder.stop()
            self.recorder = None

    @property
    def listening(self) -> bool:
        return self.server is not None

    # -- handlers ----------------------------------------------------------------------
    def _assoc_id(self, assoc: Association) -> str:
        """The association's id in the log and the database (a pynetdicom association has
        none that is unique over the node's life)."""
        with self._lock:
            if assoc not in self._ids:
                self._ids[assoc] = uuid.uuid4().hex
            return self._ids[assoc]

    def _logged(self, handler: Callable[[evt.Event], Any]) -> Callable[[evt.Event], Any]:
        """``handler`` with its log lines naming the association it serves."""

        def run(event: evt.Event) -> Any:
            with logs.association(self._assoc_id(event.assoc)):
                return handler(event)

        return run

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_rejected(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        log.warning("association from %s (%s) rejected", req.ae_title, req.address)

    def _on_released(self, event: evt.Event) -> None:
        done = self._close(event.assoc)
        if done:
            with self.sessions() as s:
                association_released(s, done)
                s.commit()

    def _on_aborted(self, event: evt.Event) -> None:
        log.warning("association from %s aborted", event.assoc.requestor.ae_title)
        self._close(event.assoc)  # its series complete after the quiet time only

    def _close(self, assoc: Association) -> list[str]:
        """Forget an association; the series it carried that no other open association is
        still carrying (a sender may use several associations for one series)."""
        key = self._assoc_id(assoc)
        with self._lock:
            mine = self._open.pop(key, set())
            busy = set().union(*self._open.values()) if self._open else set()
        return sorted(mine - busy)

    def _on_store(self, event: evt.Event) -> int | tuple[int, Dataset]:
        calling = str(event.assoc.requestor.ae_title).strip()
        free = spool.free_mb(self.settings.spool_dir)
        if free < self.settings.receiver.min_free_mb:
            log.error(
                "refused an instance from %s: %.0f MB free in the spool, below the floor of %d MB",
                calling,
                free,
                self.settings.receiver.min_free_mb,
            )
            return OUT_OF_RESOURCES
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            if (cut := truncated(ds)) is not None:
                raise ValueError(cut)
            sop_uid = spool.check_uid(ds.SOPInstanceUID, "SOPInstanceUID")
            path = spool.instance_path(
                self.settings.spool_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID, sop_uid
            )
            request = cast(C_STORE, event.request)
            if sop_uid != str(request.AffectedSOPInstanceUID).strip():
                raise ValueError("the dataset's SOPInstanceUID differs from the request's")
            pos, thick, iop = _geometry(ds)
            frames = int(ds.get("NumberOfFrames") or 1)
            info: dict[str, Any] = dict(
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=sop_uid,
                series_uid=str(ds.SeriesInstanceUID),
                study_uid=str(ds.StudyInstanceUID),
                modality=_text(ds, "Modality", 16),
                study_date=_text(ds, "StudyDate", 8),
                series_description=_text(ds, "SeriesDescription"),
                body_part=_text(ds, "BodyPartExamined", 16),
                patient_name=_text(ds, "PatientName"),
                patient_id=_text(ds, "PatientID"),
                position=pos,
                slice_thickness=thick,
                orientation=iop,
                frames=frames,
            )
        except Exception as exc:  # anything a malformed dataset can raise
            log.error("could not understand an instance from %s: %s", calling, exc)
            return CANNOT_UNDERSTAND
        try:
            data = event.encoded_dataset()
            spool.write_atomic(path, data, sync_dir=False)  # the recorder syncs the folder
        except OSError as exc:
            log.error("could not write %s: %s", path, exc)
            return OUT_OF_RESOURCES
        try:
            got = ReceivedInstance(
                path=str(path),
                size=len(data),
                calling_aet=calling,
                called_aet=self.settings.receiver.ae_title,
                association=self._assoc_id(event.assoc),
                **info,
            )
            if self.recorder is None:
                raise RuntimeError("the listener is stopped")
            self.recorder.record(got)
            with self._lock:
                self._open.setdefault(got.association, set()).add(got.series_uid)
        except Exception:
            log.exception("could not record %s", path)
            return PROCESSING_FAILURE
        return SUCCESS
