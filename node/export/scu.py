"""C-STORE and C-ECHO to a destination (AE title, host, port, optional TLS)."""

from __future__ import annotations

import logging
import re
import ssl
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pydicom
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import

if TYPE_CHECKING:  # the configuration (pydantic) is not loaded to echo or send from the CLI
    from node.config import TLS, Destination

log = logging.getLogger(__name__)

ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")
#: C-STORE statuses that mean the instance was stored (Success and the Warnings).
STORED = {0x0000, 0xB000, 0xB007, 0xB006}


#: The associations this process has requested (from their connection on): `abort_all`
#: aborts those still open.
_requested: weakref.WeakSet[Association] = weakref.WeakSet()
_requested_lock = threading.Lock()  # added to from the sending threads' DUL threads


class SendError(RuntimeError):
    """A destination that could not be reached or did not store everything, and why."""


class Peer(Protocol):
    """Where to associate: a configured `Destination`, or an `Address` typed in."""

    @property
    def ae_title(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def tls(self) -> TLS | None: ...


@dataclass(frozen=True)
class Address:
    """``AE@HOST:PORT`` typed in (no TLS): what `idaics echo` and `idaics send` reach."""

    ae_title: str
    host: str
    port: int
    tls: None = None


def parse_peer(text: str) -> Address:
    """``AE@HOST:PORT`` as an address."""
    m = ADDRESS.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not AE@HOST:PORT")
    return Address(m["ae"], m["host"], int(m["port"]))


def parse_address(text: str, name: str | None = None) -> Destination:
    """``AE@HOST:PORT`` as a destination."""
    from node.config import Destination

    a = parse_peer(text)
    return Destination(name=name or a.ae_title, ae_title=a.ae_title, host=a.host, port=a.port)


def address(dest: Peer) -> str:
    return f"{dest.ae_title}@{dest.host}:{dest.port}"


def _tls(tls: TLS | None, host: str) -> tuple[ssl.SSLContext, str] | None:
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return ctx, host


def abort_all() -> int:
    """Abort every association this process has open as a requestor, established or still
    waiting for its answer, and return how many: a node that stops does not wait for a PACS
    that never answers (pynetdicom's association threads keep a process alive until their
    timeouts)."""
    with _requested_lock:
        open_ = list(_requested)
    n = 0
    for assoc in open_:
        if not (assoc.is_released or assoc.is_aborted or assoc.is_rejected):
            assoc.abort()
            n += 1
    return n


def _opened(event: evt.Event) -> None:
    with _requested_lock:
        _requested.add(event.assoc)


def _associate(ae: AE, dest: Peer) -> Association:
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        tls_args=_tls(dest.tls, dest.host),
        evt_handlers=[(evt.EVT_CONN_OPEN, _opened)],
    )
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise SendError(f"association with {address(dest)} failed ({why})")
    return assoc


def echo(dest: Peer, calling_aet: str = "IDAICS", timeout: float = 30) -> int:
    """C-ECHO; returns the status (0 is success), raises `SendError` when no association."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = _associate(ae, dest)
    try:
        status = assoc.send_c_echo()
        if not status:
            raise SendError(f"no answer to C-ECHO from {address(dest)}")
        return int(status.Status)
    finally:
        assoc.release()


def send_files(
    paths: Iterable[Path],
    dest: Peer,
    calling_aet: str = "IDAICS",
    timeout: float = 30,
    progress: Callable[[Path, int], None] | None = None,
) -> int:
    """C-STORE every file to ``dest`` over one association; returns how many were stored.

    Each file is offered in its own transfer syntax. Raises `SendError` naming the files that
    were not stored.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return 0
    contexts: dict[str, set[str]] = {}
    for p in paths:
        meta = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        contexts.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(
            str(meta.TransferSyntaxUID)
        )
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntaxes in contexts.items():
        for ts in syntaxes:
            ae.add_requested_context(sop_class, [ts])
    assoc = _associate(ae, dest)
    failed = []
    stored = 0
    try:
        for p in paths:
            status = assoc.send_c_store(p)
            code = int(status.Status) if status else None
            if code in STORED:
                stored += 1
            else:
                failed.append(
                    f"{p.name}: {'no answer' if code is None else f'status 0x{code:04X}'}"
                )
                if not assoc.is_established:
                    break
            if progress:
                progress(p, code if code is not None else -1)
    finally:
        if assoc.is_established:
            assoc.release()
    if failed or stored < len(paths):
        raise SendError(f"{address(dest)} stored {stored} of {len(paths)}: {'; '.join(failed[:3])}")
    return stored
