"""The listener under peers that never finish an association, hang up before it, hog it, lie
about PDU sizes, send a PDU a byte at a time or an instance a small PDU at a time, keep an
association with echoes alone, or send an instance without end."""

from __future__ import annotations

import socket
import struct
import time
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from node.config import Settings
from node.db import make_engine, make_sessions
from node.ingest.scp import Receiver
from tests.servers import free_port

VERIFICATION = "1.2.840.10008.1.1"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _receiver(tmp_path: Path, **receiver) -> Receiver:
    settings = Settings(
        home=tmp_path, receiver={"host": "127.0.0.1", "port": free_port(), **receiver}
    )
    rx = Receiver(settings, make_sessions(make_engine(settings.database_url)), "test")
    rx.start()
    return rx


def _connect(port: int, source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def _associate(port: int, source: str, *contexts: tuple[str, ...]):
    """An association from ``source`` as MODALITY, asking for ``contexts`` (each an abstract
    syntax and its transfer syntaxes)."""
    ae = AE(ae_title="MODALITY")
    for abstract, *syntaxes in contexts:
        if syntaxes:
            ae.add_requested_context(abstract, syntaxes)
        else:
            ae.add_requested_context(abstract)
    return ae.associate("127.0.0.1", port, ae_title="IDAICS", bind_address=(source, 0))


#: What the tests ask for: verification, and CT images in explicit VR little endian.
ECHO = (VERIFICATION,)
CT = (CTImageStorage, ExplicitVRLittleEndian)


def _echo_seconds(port: int, source: str = "127.0.0.1") -> tuple[bool, float]:
    t0 = time.monotonic()
    assoc = _associate(port, source, ECHO)
    ok = assoc.is_established and assoc.send_c_echo().Status == 0x0000
    if assoc.is_established:
        assoc.release()
    return ok, time.monotonic() - t0


def _served_again_within(port: int, source: str, seconds: float) -> tuple[bool, float]:
    """Echo from ``source`` until one is served or ``seconds`` pass: whether it was, and
    after how long (a peer's slot coming free)."""
    t0 = time.monotonic()
    ok = False
    while not ok and time.monotonic() - t0 < seconds:
        ok, _ = _echo_seconds(port, source)
        time.sleep(0.2)
    return ok, time.monotonic() - t0


def _closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the node closed (or aborted) the connection within ``seconds``."""
    s.settimeout(seconds)
    try:
        while True:
            data = s.recv(4096)
            if not data or data[0] == 0x07:  # closed, or an A-ABORT PDU
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


@contextmanager
def _sockets_from(home: Path, source: str, count: int, **receiver):
    """A receiver, and ``count`` raw connections to it from ``source`` that ask for nothing."""
    rx = _receiver(home, max_associations=10, **receiver)
    socks = [_connect(rx.settings.receiver.port, source) for _ in range(count)]
    try:
        time.sleep(0.3)
        yield rx.settings.receiver.port, socks
    finally:
        for s in socks:
            s.close()
        rx.stop()


def test_idle_sockets_neither_take_association_slots_nor_stay(tmp_path):
    with _sockets_from(
        tmp_path, "127.0.0.2", 12, max_connections_per_peer=64, request_timeout_s=2.0
    ) as (port, idle):
        ok, took = _echo_seconds(port)
        assert ok and took < 2.0, f"echo behind 12 idle sockets: ok={ok}, {took:.1f} s"
        # the node drops a connection that never asks for an association
        assert all(_closed_within(s, 4.0) for s in idle)


def test_one_peer_cannot_hold_every_connection(tmp_path):
    with _sockets_from(
        tmp_path, "127.0.0.3", 6, max_connections_per_peer=4, request_timeout_s=30.0
    ) as (port, held):
        closed = [_closed_within(s, 0.5) for s in held]
        assert closed == [False] * 4 + [True] * 2
        ok, took = _echo_seconds(port)  # another peer is served at once
        assert ok and took < 2.0


def test_a_peer_that_hangs_up_before_asking_gets_its_slots_back_at_once(tmp_path):
    """Connections closed before any A-ASSOCIATE-RQ (port probes, health checks) do not hold
    the peer's slots until the 30 s request timeout: its next association is served."""
    with _sockets_from(
        tmp_path, "127.0.0.4", 4, max_connections_per_peer=4, request_timeout_s=30.0
    ) as (port, probes):
        for s in probes:
            s.close()
        ok, took = _served_again_within(port, "127.0.0.4", 10.0)
        assert ok and took < 5.0, f"the peer's slots came back after {took:.1f} s"


def test_a_peer_that_sends_its_pdu_a_byte_at_a_time_is_cut_off_after_the_network_timeout(
    tmp_path,
):
    """A sender that keeps its association alive with a byte every half second (slowloris)
    loses it once one PDU has taken the 3 s network timeout, and its slot with it."""
    rx = _receiver(tmp_path, network_timeout_s=3.0, max_connections_per_peer=1)
    port = rx.settings.receiver.port
    try:
        assoc = _associate(port, "127.0.0.5", ECHO)
        assert assoc.is_established
        raw = assoc.dul.socket.socket  # from here on the test, not pynetdicom, talks on it
        assoc.dul.kill_dul()
        time.sleep(0.3)
        raw.sendall(struct.pack(">BBL", 0x04, 0, 1000))  # a P-DATA-TF of 1000 bytes ...
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20.0 and not _closed_within(raw, 0.5):
            try:
                raw.sendall(b"\0")  # ... sent a byte at a time
            except OSError:
                break
        took = time.monotonic() - t0
        raw.close()
        assert took < 8.0, f"the node still read the PDU after {took:.0f} s"
        ok, free = _served_again_within(port, "127.0.0.5", 10.0)  # the peer's one slot
        assert ok, "the slot stayed taken"
        print(f"cut off after {took:.1f} s, slot free {free:.1f} s later")
    finally:
        rx.stop()


def _trickle_seconds(port: int, source: str, gap_s: float, limit_s: float) -> float:
    """Associate from ``source``, send a C-STORE request's command, then its dataset as PDUs
    of 100 bytes, one every ``gap_s`` (each whole, well inside the network timeout): the
    seconds until the node ends the association (``limit_s`` if it does not)."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    assoc = _associate(port, source, CT)
    assert assoc.is_established
    context = assoc.accepted_contexts[0].context_id
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CTImageStorage, generate_uid()
    req.DataSet = BytesIO(bytes(100))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    command = [
        p for p in msg.encode_msg(context, 16384) if p.presentation_data_value_list[0][1][0] & 1
    ]
    raw = assoc.dul.socket.socket  # from here on the test, not pynetdicom, talks on it
    assoc.dul.kill_dul()
    time.sleep(0.3)
    for p in command:
        pdu = P_DATA_TF()
        pdu.from_primitive(p)
        raw.sendall(pdu.encode())
    t0 = time.monotonic()
    fragment = struct.pack(">LBB", 2 + 100, context, 0x00) + bytes(100)  # a dataset, not last
    try:
        while time.monotonic() - t0 < limit_s:
            raw.sendall(struct.pack(">BBL", 0x04, 0, len(fragment)) + fragment)
            if _closed_within(raw, gap_s):
                break
    except OSError:
        pass
    raw.close()
    return min(time.monotonic() - t0, limit_s)


def test_a_peer_that_sends_small_pdus_just_inside_the_network_timeout_is_cut_off(tmp_path):
    """Each 100-byte PDU of a dataset comes whole 1.5 s after the last, inside the 2 s
    network timeout: without a floor on the message's rate the association would stay as long
    as the peer likes. With `min_transfer_kib_s` (16) it is aborted once the instance has
    taken the network timeout; with the check off it is still open after 12 s. The peer's one
    slot is free again, and an ordinary instance is stored."""
    rx = _receiver(tmp_path, network_timeout_s=2.0, max_connections_per_peer=1)
    port = rx.settings.receiver.port
    try:
        took = _trickle_seconds(port, "127.0.0.6", gap_s=1.5, limit_s=20.0)
        assert took < 6.0, f"the node still read the instance after {took:.0f} s"
        ok, _ = _served_again_within(port, "127.0.0.6", 10.0)
        assert ok, "the slot stayed taken"
        assoc = _associate(port, "127.0.0.6", CT)
        assert assoc.send_c_store(_ct_instance(1.0)).Status == 0x0000
        assoc.release()
        print(f"cut off after {took:.1f} s")
    finally:
        rx.stop()
    rx = _receiver(tmp_path, network_timeout_s=2.0, min_transfer_kib_s=0)
    try:
        assert _trickle_seconds(rx.settings.receiver.port, "127.0.0.6", 1.5, 12.0) == 12.0
    finally:
        rx.stop()


def _echoes_held_seconds(port: int, source: str, gap_s: float, limit_s: float) -> float:
    """Associate from ``source`` and send a C-ECHO every ``gap_s`` (inside the network
    timeout), storing nothing: the seconds until the node ends the association (``limit_s``
    if it does not)."""
    assoc = _associate(port, source, ECHO)
    assert assoc.is_established
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        status = assoc.send_c_echo()
        if not assoc.is_established or not status or status.Status != 0x0000:
            break
        time.sleep(gap_s)
    took = min(time.monotonic() - t0, limit_s)
    if assoc.is_established:
        assoc.release()
    return took


def test_a_peer_that_only_echoes_inside_the_network_timeout_is_cut_off(tmp_path):
    """A C-ECHO every 1 s, inside the 2 s network timeout, and no instance: with
    `max_idle_s` (3 s) the association is aborted at the first echo after 3 s, and the peer's
    one slot is free again; an association that stores an instance now and then is not cut
    off; with the check off the echoing association is still open after 10 s."""
    rx = _receiver(tmp_path, network_timeout_s=2.0, max_idle_s=3.0, max_connections_per_peer=1)
    port = rx.settings.receiver.port
    try:
        took = _echoes_held_seconds(port, "127.0.0.7", gap_s=1.0, limit_s=20.0)
        assert took < 6.0, f"the node still answered echoes after {took:.0f} s"
        ok, _ = _served_again_within(port, "127.0.0.7", 10.0)
        assert ok, "the slot stayed taken"
        assoc = _associate(port, "127.0.0.7", CT, ECHO)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8.0:  # an instance every 2 s, an echo between
            assert assoc.send_c_store(_ct_instance(0.1)).Status == 0x0000
            time.sleep(1.0)
            assert assoc.send_c_echo().Status == 0x0000
            time.sleep(1.0)
        assert assoc.is_established
        assoc.release()
        print(f"cut off after {took:.1f} s")
    finally:
        rx.stop()
    rx = _receiver(tmp_path, network_timeout_s=2.0, max_idle_s=0)
    try:
        assert _echoes_held_seconds(rx.settings.receiver.port, "127.0.0.7", 1.0, 10.0) == 10.0
    finally:
        rx.stop()


def _ct_instance(megabytes: float) -> Dataset:
    """A CT instance whose pixel data are about ``megabytes`` long."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = 512, int(megabytes * (1 << 20) / (2 * 512))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
    ds.PixelData = bytes(ds.Rows * ds.Columns * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_an_instance_larger_than_the_limit_aborts_its_association_as_it_comes_in(tmp_path):
    """With `max_instance_mb` 2, a 3 MB instance is cut off while it is sent (pynetdicom would
    gather any size in memory) and nothing of it is stored; the node goes on serving, and
    three 1 MB instances on one association (3 MB in all, the limit is per instance) are
    stored."""
    rx = _receiver(tmp_path, max_instance_mb=2)
    port = rx.settings.receiver.port
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        statuses = []
        for sizes in ((3.0,), (1.0, 1.0, 1.0)):
            assoc = ae.associate("127.0.0.1", port, ae_title="IDAICS")
            assert assoc.is_established
            for mb in sizes:
                statuses.append(assoc.send_c_store(_ct_instance(mb)).get("Status"))
            if assoc.is_established:
                assoc.release()
        assert statuses == [None, 0x0000, 0x0000, 0x0000]  # aborted (no response), then Success
        stored = list(rx.settings.spool_dir.rglob("*.dcm"))
        assert len(stored) == 3 and all(1 << 20 < f.stat().st_size < 2 << 20 for f in stored)
    finally:
        rx.stop()


def test_a_pdu_header_declaring_4_gib_is_refused_before_it_is_read(tmp_path):
    rx = _receiver(tmp_path)
    port = rx.settings.receiver.port
    try:
        before = _rss_mb()
        s = _connect(port, "127.0.0.1")
        s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))  # an A-ASSOCIATE-RQ of 4 GiB
        sent, chunk = 0, b"\0" * (1 << 20)
        s.settimeout(5.0)
        try:
            while sent < 500 * (1 << 20):
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the node closed the connection: what is expected
        s.close()
        grew = _rss_mb() - before
        assert sent < 500 * (1 << 20), "the node kept reading a 4 GiB PDU"
        assert grew < 50.0, f"memory grew by {grew:.0f} MB"
        ok, _ = _echo_seconds(port)  # and it goes on serving
        assert ok
    finally:
        rx.stop()


def test_the_called_ae_title_is_checked_where_configured(tmp_path):
    def echo(port: int, called: str) -> bool:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        ok = assoc.is_established
        if ok:
            assoc.release()
        return ok

    strict = _receiver(tmp_path / "strict", check_called_aet=True)
    loose = _receiver(tmp_path / "loose")
    try:
        port = strict.settings.receiver.port
        assert echo(port, "IDAICS") and not echo(port, "SOMEONE_ELSE")
        assert echo(loose.settings.receiver.port, "SOMEONE_ELSE")  # the default: any called title
    finally:
        strict.stop()
        loose.stop()
