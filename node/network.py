"""The DICOM server: pynetdicom's Storage SCP of the node (start_dicom: the storage classes and
transfer syntaxes it accepts, who may call it, its limits and timeouts, TLS), and the Doorman,
where connections wait, before pynetdicom sees them, until their request is there. What this
takes of pynetdicom's internals is in node/pynetdicom_internals.py."""
import queue
import socket
import ssl
import struct
import threading
import time

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from common import one_line, os_reason
from node.dicom import ASSOCIATE_SECONDS, MAX_PDU_BYTES, MAX_REQUEST_BYTES, XRAY_CLASSES
from node.logs import log
from node.pynetdicom_internals import (accept_without_handshake, check_associate_rq,
                                       hand_connections_to, quick_ack, rejection_sent, tuned,
                                       use_node_reads)
from node.tls import tls_context


def start_dicom(node, settings):
    """The Storage SCP of `node` (NodeSettings `settings`), listening: pynetdicom's server,
    its connections admitted by a Doorman (node.doorman), its AE at node.ae."""
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEG2000,
                             JPEG2000Lossless, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                             RLELossless)
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification
    use_node_reads()
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                JPEGLosslessSV1, JPEG2000Lossless, JPEG2000, RLELossless]
    ae = AE(ae_title=settings.ae_title)
    # Every storage class is accepted at association, so that a sender learns per object
    # (0x0122) that only CR and DX are classified, not by a failed association.
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax,
                                 syntaxes if cx.abstract_syntax in XRAY_CLASSES
                                 else [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context(Verification)
    ae.maximum_associations = settings.max_associations
    # Senders may send an image in a few large PDUs, not pynetdicom's default 16 KB ones: each
    # PDU costs Python work in the receiving thread (a 2 MB image: 15 ms of CPU -> 12.5)
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout
    # the A-ASSOCIATE-RQ is whole when pynetdicom sees the connection (Doorman): nothing to
    # wait for, and a connection that fails then does not hold its slot for --timeout
    ae.acse_timeout = min(settings.timeout, ASSOCIATE_SECONDS)
    if settings.allow_ae:
        ae.require_calling_aet = list(settings.allow_ae)
    ae.require_called_aet = True  # a sender must call this node by its AE title

    def on_rejected(event):
        caller = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        # the words of the rejection sent (A-ASSOCIATE-RJ's source and reason), not a guess
        reason, called = rejection_sent(event.assoc)
        if reason == (0x01, 0x03):
            why = "calling AE title not in --allow-ae"
        elif reason == (0x01, 0x07):
            why = f"called AE title {str(called).strip()[:16]!r} is not {settings.ae_title!r}"
        elif reason == (0x03, 0x02):
            why = f"more than --max-associations {settings.max_associations}"
        else:
            why = f"rejected (source {reason[0]}, reason {reason[1]})"
        log.warning("refused association from %s: %s", caller, why)
        with node.lock:
            node.counters["refused"] += 1
            node.refusals[why] = node.refusals.get(why, 0) + 1

    ssl_context = tls_context(settings.tls_cert, settings.tls_key, settings.tls_ca)
    handlers = [(evt.EVT_C_STORE, node.handle_store), (evt.EVT_REJECTED, on_rejected),
                (evt.EVT_CONN_OPEN, lambda event: tuned(event.assoc)),
                (evt.EVT_PDU_SENT, quick_ack)]
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers,
                             ssl_context=ssl_context)
    node.doorman = Doorman(server, min(settings.timeout, ASSOCIATE_SECONDS), node)
    # a burst of connections is queued by the kernel, not refused (socketserver listens with
    # a backlog of 5)
    server.socket.listen(128)
    # the TLS handshake is the doorman's too, never the accepting thread's
    accept_without_handshake(server, ssl_context)
    node.ae = ae
    return server


class Doorman:
    """Connections wait here, before pynetdicom sees them, until their request is there.

    pynetdicom counts every open connection against --max-associations from the moment it is
    accepted, and holds it until --timeout when the peer says nothing, one byte, garbage, or
    resets: 20 such connections held every slot, and no sender got through. Here a
    connection becomes an association (a pynetdicom thread, a slot) only once:
    - plain DICOM: its whole A-ASSOCIATE-RQ (PDU type 1, at most MAX_REQUEST_BYTES) is in the
      socket's buffer and pynetdicom's own decoder reads it (peeked at, not read: pynetdicom
      reads it again); garbage, a reset, a close or another PDU closes the connection;
    - TLS: its handshake is done (here, without blocking: with --tls-ca the peer's certificate
      checked) and its first bytes after it have come; the request then has 5 s (_recv).
    A connection not that far within `seconds` is closed; when LIMIT wait, the oldest is
    closed to let a new one in, so a sender is always heard. The waiting cost nothing: the
    kernel wakes the selector only once the bytes still missing are there (SO_RCVLOWAT). One
    thread owns the selector (the accepting thread only queues new connections to it);
    connections are handed over through socketserver's process_request, the standard hook."""
    LIMIT = 256
    SAY_EVERY = 10.0  # seconds between two log lines about closed connections

    def __init__(self, server, seconds, node):
        import selectors
        self.seconds, self.node = seconds, node
        self.selector = selectors.DefaultSelector()
        self.arrived = queue.SimpleQueue()  # (socket, address) from the accepting thread
        self.waiting = {}  # socket -> (address, deadline), oldest first: the thread's own
        self.handshaken = set()  # TLS connections past their handshake
        self.closed = {}  # why -> connections closed since the last log line
        self.said = time.monotonic()
        self.failures = 0  # unexpected errors, each logged once per 10 s at most
        self.stopped = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.hand_over = hand_connections_to(server, self.admit)
        threading.Thread(target=self._run, name="doorman", daemon=True).start()

    def admit(self, request, address):
        """socketserver's process_request, in the accepting thread: queued, never waited on."""
        self.arrived.put((request, address))
        try:
            self.wake_w.send(b"x")
        except (BlockingIOError, OSError):  # the thread has wake-ups pending already
            pass

    def stop(self):
        self.stopped = True
        self.admit(None, None)

    def _run(self):
        while not self.stopped:
            try:
                self._step()
            except Exception:  # never the end of the thread: no sender would be heard again
                self._failed()
                time.sleep(0.1)
        for sock in list(self.waiting):
            self._close(sock, "the node is stopping")

    def _failed(self):
        self.failures += 1
        if self.failures == 1 or time.monotonic() - self.said >= self.SAY_EVERY:
            log.exception("the doorman failed (%d times); it goes on", self.failures)

    def _step(self):
        import selectors
        first = next(iter(self.waiting.values()), None)
        timeout = 1.0 if first is None else max(0.0, min(1.0, first[1] - time.monotonic()))
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.wake_r:
                try:
                    while self.wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            elif key.fileobj in self.waiting:
                try:
                    self._advance(key.fileobj)
                except Exception:  # this connection's fault or not: it goes, the rest stay
                    self._failed()
                    self._close(key.fileobj, "failed before association")
        while True:  # the connections accepted meanwhile
            try:
                sock, address = self.arrived.get_nowait()
            except queue.Empty:
                break
            if sock is None:
                continue
            if len(self.waiting) >= self.LIMIT:
                self._close(next(iter(self.waiting)), "too many connections waiting")
            try:
                sock.setblocking(False)
                self.selector.register(sock, selectors.EVENT_READ)
            except (OSError, ValueError):  # closed by the peer already
                sock.close()
                continue
            self.waiting[sock] = (address, time.monotonic() + self.seconds)
        now = time.monotonic()
        for sock, (_, deadline) in list(self.waiting.items()):
            if deadline > now:
                break
            self._close(sock, f"no whole request within {self.seconds:g} s")
        if self.closed and now - self.said >= self.SAY_EVERY:
            log.warning("closed before association: %s", "; ".join(
                f"{n} connection(s): {why}" for why, n in self.closed.items()))
            self.closed, self.said = {}, now

    def _advance(self, sock):
        """One waiting connection moved on as far as its bytes allow: handed over, closed,
        or waiting for more (the kernel told how many)."""
        import selectors
        if isinstance(sock, ssl.SSLSocket):
            if sock not in self.handshaken:
                try:
                    sock.do_handshake()
                except ssl.SSLWantReadError:
                    return self.selector.modify(sock, selectors.EVENT_READ)
                except ssl.SSLWantWriteError:
                    return self.selector.modify(sock, selectors.EVENT_WRITE)
                except (ssl.SSLError, OSError) as e:
                    return self._close(sock, f"TLS handshake failed ({type(e).__name__})")
                self.handshaken.add(sock)
                if not sock.pending():  # the request's first bytes still to come
                    return self.selector.modify(sock, selectors.EVENT_READ)
            return self._hand_over(sock)
        ready, why, missing = first_message(sock)
        if why:
            return self._close(sock, why)
        if ready:
            return self._hand_over(sock)
        # woken again only once `missing` bytes are there (or at the end of the connection)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, missing)

    def _hand_over(self, sock):
        address, _ = self.waiting.pop(sock)
        self._forget(sock)
        try:
            if not isinstance(sock, ssl.SSLSocket):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            sock.setblocking(True)
            self.hand_over(sock, address)
        except Exception as e:  # the server is shutting down, or the peer gone
            log.warning("cannot start an association: %s", one_line(e))
            sock.close()

    def _forget(self, sock):
        self.handshaken.discard(sock)
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _close(self, sock, why):
        self.waiting.pop(sock, None)
        self._forget(sock)
        try:
            sock.close()
        except OSError:
            pass
        self.closed[why] = self.closed.get(why, 0) + 1
        with self.node.lock:
            self.node.counters["refused"] += 1
            self.node.refusals[why] = self.node.refusals.get(why, 0) + 1


PEEK_BYTES = 32 * 1024  # of a larger request, what must be there before it is handed over
# (under what the kernel lets SO_RCVLOWAT ask for: half the receive buffer)


def first_message(sock):
    """(whether a plain connection's A-ASSOCIATE-RQ is here whole, why the connection must be
    closed or None, how many bytes must be there before it is worth looking again), peeking
    at the bytes waiting (nothing is read: pynetdicom reads them). Whole: all of it, decoded
    by pynetdicom's own PDU decoder (garbage held a slot until pynetdicom's timeout); of a
    request over PEEK_BYTES (a few hundred presentation contexts), its first PEEK_BYTES, its
    AE titles read."""
    import fcntl
    import termios
    try:
        head = sock.recv(6, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        waiting = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD,
                                                 b"\0" * 4))[0]
    except (BlockingIOError, InterruptedError):
        return False, None, 1
    except OSError as e:
        return False, f"connection failed before association ({os_reason(e)})", 0
    if not head:
        return False, "connection closed before association", 0
    if head[0] != 1:
        return False, "not an A-ASSOCIATE-RQ", 0
    if len(head) < 6:
        return False, None, 6
    length = struct.unpack(">I", head[2:6])[0]
    if length > MAX_REQUEST_BYTES:
        return False, "an association request over the size the node accepts", 0
    needed = min(6 + length, PEEK_BYTES)
    if waiting < needed:
        return False, None, needed
    data = sock.recv(needed, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    try:
        if 6 + length <= PEEK_BYTES:
            check_associate_rq(data)
        else:  # the fixed part: protocol version, reserved, the two AE titles
            titles = data[10:42]
            if len(titles) < 32 or not all(32 <= b < 127 for b in titles):
                raise ValueError("AE titles that are not text")
    except Exception as e:
        return False, f"a malformed A-ASSOCIATE-RQ ({type(e).__name__})", 0
    return True, None, 0
