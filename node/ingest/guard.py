"""What keeps the DICOM listener serving when peers misbehave.

pynetdicom leaves three openings that a careless or hostile peer can use, and this module
closes them at pynetdicom's own extension points:

- A TCP connection that never sends an A-ASSOCIATE-RQ holds an association thread until the
  ARTIM timer runs out (the AE's ACSE timeout), and counts against `maximum_associations`
  all the while: a dozen idle sockets refuse every real sender. Here the ACSE timeout is
  `request_timeout_s` (seconds), and only associations whose request has arrived count
  (`GuardedAE.active_associations`).
- One peer can take every slot: `GuardedRequestHandler` closes a new connection from a peer
  that already holds `max_per_peer` connections, before any thread or buffer is given to it.
- A peer that connects and hangs up before its A-ASSOCIATE-RQ (a port probe, a load
  balancer's health check, a sender that gave up) leaves the association waiting out the
  whole ARTIM timer for a request that cannot come, holding the peer's slot: the DUL goes
  back to idle but tells the waiting association nothing. `_wake_on_early_close` tells it,
  so that the slot is free at once.
- The DUL reads a PDU of whatever length its 6-byte header declares, into memory, before
  any check: a header that declares 4 GiB is 4 GiB of buffer. `GuardedSocket` refuses to
  read a PDU longer than the node's negotiated maximum (the A-ASSOCIATE-RQ may be longer
  than that, up to `MAX_ASSOCIATE_RQ_BYTES`); the DUL sees a closed connection and the
  association is aborted.
- pynetdicom gathers a C-STORE's dataset in memory, fragment by fragment, for as long as
  the peer sends: one endless instance is all the memory there is. `GuardedSocket` counts
  each message's dataset bytes in the P-DATA PDUs it reads and aborts the association past
  `max_instance_bytes`.
- The DUL reads a PDU until all of it is in, and the network timeout only ends a wait in
  which nothing arrives: a peer that sends a byte every few seconds holds its association
  for hours, and the association cannot even abort, since its DUL is still reading. With
  `GuardedSocket` a PDU still coming in after the network timeout aborts the association.
- Nor does anything bound a message sent as many small PDUs, each inside the network
  timeout: a fragment of a dataset every 50 s holds the association as long as the peer
  likes. `GuardedSocket` times each message (a command, or a dataset) from its first
  fragment, and a message still coming in after the network timeout at less than
  `min_rate` bytes a second aborts the association. The pause between messages is the
  network timeout's.
- Nor does anything bound an association whose peer sends whole small messages inside the
  network timeout: a C-ECHO every 50 s holds the association and its slot for good.
  `GuardedSocket` notes when an instance's dataset last came in (at first, when the
  association was made), and a command that begins more than `max_idle` seconds after that
  aborts the association.
"""

from __future__ import annotations

import logging
import threading
import time
from queue import Queue
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

#: An A-ASSOCIATE-RQ with many presentation contexts runs to a few tens of kilobytes.
MAX_ASSOCIATE_RQ_BYTES = 256 * 1024
#: The PDU header (type, reserved, length) that the DUL reads before the body.
PDU_HEADER_BYTES = 6


class PduTooLong(OSError):
    """A peer announced a PDU longer than this node accepts."""


class SlowPdu(TimeoutError):
    """A peer took longer than the network timeout to send one PDU."""


class InstanceTooLarge(OSError):
    """A peer sent more of one dataset than this node accepts."""


class SlowMessage(TimeoutError):
    """A peer sent one message slower than this node accepts."""


class IdleAssociation(TimeoutError):
    """A peer went on sending commands without an instance for longer than this node
    accepts."""


#: PDU type of P-DATA-TF, and the message control header's bits of a PDV item (PS3.8 E.2).
P_DATA_TF = 0x04
PDV_COMMAND = 0x01
PDV_LAST = 0x02


class GuardedSocket(AssociationSocket):
    """An association socket that will not read a PDU body longer than ``limit`` bytes, nor
    spend longer than the association's network timeout on reading one, nor let one
    message's dataset grow past ``max_dataset`` bytes, nor a message that has taken longer
    than the network timeout come in slower than ``min_rate`` bytes a second, nor a command
    begin more than ``max_idle`` seconds after the last dataset."""

    limit: int = MAX_ASSOCIATE_RQ_BYTES
    #: The most bytes of one dataset (None: no limit), and how many the message being
    #: received has had so far.
    max_dataset: int | None = None
    _dataset: int = 0
    #: The least bytes a second of a message once it has taken the network timeout (0: no
    #: limit); when the message being received began (its first fragment, None between
    #: messages) and how many bytes of it have come.
    min_rate: float = 0.0
    _began: float | None = None
    _message: int = 0
    #: The most seconds from the last dataset (or from the association's start) to a new
    #: command (0: no limit), when a dataset last came in, and whether a command is being
    #: received (its first fragment has come, not its last).
    max_idle: float = 0.0
    _last_data: float = 0.0
    _in_command: bool = False
    #: The DUL reads each PDU as a header, then its body: the type of the PDU whose body
    #: comes next, None while a header is due.
    _body_of: int | None = None

    def _peer(self) -> str:
        where = self.assoc.requestor.address_info if self.assoc else None
        return f"{where.address}:{where.port}" if where else "?"

    def recv(self, nr_bytes: int) -> bytearray:
        data = self._recv(nr_bytes)
        if self._body_of is None:
            self._body_of = data[0] if len(data) == PDU_HEADER_BYTES else None
        else:
            if self._body_of == P_DATA_TF:
                self._count(data)
            self._body_of = None
        return data

    def _count(self, body: bytearray) -> None:
        """Count the fragments of a P-DATA-TF body: refuse the message once its dataset has
        more than `max_dataset` bytes, or once it has taken longer than the network timeout
        at less than `min_rate` bytes a second."""
        at = 0
        while at + 6 <= len(body):
            length = int.from_bytes(body[at : at + 4], "big")
            control = body[at + 5]
            fragment = max(0, length - 2)  # the PDV's data, after its context and control
            self._pace(fragment, bool(control & PDV_LAST))
            if control & PDV_COMMAND:
                self._idle(bool(control & PDV_LAST))
            else:
                self._last_data = time.monotonic()
                self._dataset += fragment
                if self.max_dataset is not None and self._dataset > self.max_dataset:
                    log.warning(
                        "%s sent an instance of more than %d bytes: association aborted",
                        self._peer(),
                        self.max_dataset,
                    )
                    raise InstanceTooLarge(
                        f"instance of more than {self.max_dataset} bytes refused"
                    )
                if control & PDV_LAST:
                    self._dataset = 0
            at += 4 + length

    def _idle(self, last: bool) -> None:
        """A fragment of a command came (``last``: its last): refuse a command that begins
        more than `max_idle` seconds after the last dataset."""
        if not self._in_command:
            idle = time.monotonic() - self._last_data
            if self.max_idle and idle > self.max_idle:
                log.warning(
                    "%s sent no instance for %.0f s, only other commands (at most %.0f s): "
                    "association aborted",
                    self._peer(),
                    idle,
                    self.max_idle,
                )
                raise IdleAssociation(f"no instance for {idle:.0f} s")
        self._in_command = not last

    def _pace(self, fragment: int, last: bool) -> None:
        """Time the message that ``fragment`` (bytes) belongs to; ``last`` ends it."""
        budget = self.assoc.network_timeout if self.assoc else None
        if not self.min_rate or budget is None:
            return
        now = time.monotonic()
        if self._began is None:
            self._began, self._message = now, 0
        self._message += fragment
        took = now - self._began
        if took > budget and self._message < self.min_rate * took:
            log.warning(
                "%s sent %d bytes of a message in %.0f s (under %.0f bytes/s): association aborted",
                self._peer(),
                self._message,
                took,
                self.min_rate,
            )
            raise SlowMessage(f"message slower than {self.min_rate:.0f} bytes/s refused")
        if last:
            self._began = None

    def _recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > PDU_HEADER_BYTES and nr_bytes > self.limit:
            log.warning(
                "refused a PDU of %d bytes from %s (at most %d): association aborted",
                nr_bytes,
                self._peer(),
                self.limit,
            )
            raise PduTooLong(f"PDU of {nr_bytes} bytes refused (at most {self.limit})")
        budget = self.assoc.network_timeout if self.assoc else None
        sock = self.socket
        if budget is None or sock is None:
            return super().recv(nr_bytes)
        # pynetdicom's own loop times out only a recv that gets nothing (the socket's
        # timeout, the network timeout): a peer that sends a byte now and then would hold the
        # association, and its slot, for as many seconds as its PDU has bytes. Here a PDU
        # still coming in after the network timeout is given up. Read into one buffer, in
        # chunks as large as the kernel has, rather than pynetdicom's 4 KiB pieces.
        end = time.monotonic() + budget
        data = bytearray(nr_bytes)
        with memoryview(data) as view:
            got = 0
            while got < nr_bytes:
                if time.monotonic() > end:
                    log.warning(
                        "%s sent %d of %d bytes of a PDU in %.0f s: association aborted",
                        self._peer(),
                        got,
                        nr_bytes,
                        budget,
                    )
                    raise SlowPdu(f"PDU not received within {budget:.0f} s")
                n = sock.recv_into(view[got:])
                if n == 0:  # the peer closed the connection: what was read, as pynetdicom
                    break
                got += n
        return data if got == nr_bytes else data[:got]


class GuardedRequestHandler(RequestHandler):
    """Hands each connection a `GuardedSocket`; turns away a peer that holds too many."""

    _assoc: Association | None = None

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        self._assoc = assoc
        # the socket pynetdicom made, turned into a guarded one (it adds only the check)
        sock = cast(GuardedSocket, assoc.dul.socket)
        sock.__class__ = GuardedSocket
        pdu = self.ae.maximum_pdu_size or MAX_ASSOCIATE_RQ_BYTES
        sock.limit = max(pdu, MAX_ASSOCIATE_RQ_BYTES) + 64
        server = cast(GuardedServer, self.server)
        sock.max_dataset = server.max_instance_bytes
        sock.min_rate = server.min_rate
        sock.max_idle = server.max_idle
        sock._last_data = time.monotonic()
        return assoc

    def handle(self) -> None:
        server = cast(GuardedServer, self.server)
        host = self.client_address[0]
        with server.peer_lock:
            held = server.peers.get(host, 0)
            if held >= server.max_per_peer:
                log.warning(
                    "refused a connection from %s: it already holds %d (at most %d per peer)",
                    host,
                    held,
                    server.max_per_peer,
                )
                return  # the server closes the socket
            server.peers[host] = held + 1
        try:
            super().handle()  # starts the association's own thread
            if self._assoc is not None:
                self._assoc.join()  # the peer holds its slot until the association ends
        finally:
            with server.peer_lock:
                server.peers[host] -= 1
                if server.peers[host] <= 0:
                    del server.peers[host]


def _wake_on_early_close(event: evt.Event) -> None:
    """The peer closed its connection before it sent an A-ASSOCIATE-RQ (the DUL's Sta2):
    the association's reactor still waits for the request, so it is handed what it gets when
    the ARTIM timer runs out (nothing), and it ends now."""
    assoc = event.assoc
    if assoc.is_acceptor and assoc.dul.state_machine.current_state == "Sta2":
        # None is what the reactor's wait for the request gives when the timer runs out
        cast("Queue[Any]", assoc.dul.to_user_queue).put(None)


class GuardedServer(ThreadedAssociationServer):
    """A threaded association server that knows how many connections each peer holds."""

    def __init__(
        self,
        *args: Any,
        max_per_peer: int = 4,
        max_instance_bytes: int | None = None,
        min_rate: float = 0.0,
        max_idle: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.peers: dict[str, int] = {}
        self.peer_lock = threading.Lock()
        self.max_per_peer = max_per_peer
        self.max_instance_bytes = max_instance_bytes
        self.min_rate = min_rate
        self.max_idle = max_idle
        super().__init__(*args, **kwargs)


class GuardedAE(AE):
    """An AE whose association limit counts only associations that have been requested."""

    @property
    def active_associations(self) -> list[Association]:
        return [
            a
            for a in super().active_associations
            if not (a.is_acceptor and a.dul.state_machine.current_state in ("Sta1", "Sta2"))
        ]

    def start_guarded_server(
        self,
        address: tuple[str, int],
        evt_handlers: list,
        max_per_peer: int,
        ssl_context: Any = None,
        max_instance_bytes: int | None = None,
        min_rate: float = 0.0,
        max_idle: float = 0.0,
    ) -> GuardedServer:
        """Like `start_server(block=False)`, with the guarded server and request handler."""
        server = cast(
            GuardedServer,
            self.make_server(
                address,
                evt_handlers=[*evt_handlers, (evt.EVT_CONN_CLOSE, _wake_on_early_close)],
                ssl_context=ssl_context,
                server_class=GuardedServer,
                request_handler=GuardedRequestHandler,
                max_per_peer=max_per_peer,
                max_instance_bytes=max_instance_bytes,
                min_rate=min_rate,
                max_idle=max_idle,
            ),
        )
        thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
        thread.start()
        self._servers.append(server)
        return server
