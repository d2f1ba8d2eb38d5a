"""THE one place where the node touches pynetdicom's internals: everything below reaches past
pynetdicom's documented API (a private attribute, a method replaced, a socketserver hook of
its server swapped, its PDU decoder), so each was read against pynetdicom's own code, for the
versions in PYNETDICOM_VERSIONS. The node refuses to start with another version
(check_pynetdicom_version, from serve.py): read each of these against its code again, then
add it.

- the sending side sends a result file as it is on disk (_config.STORE_SEND_CHUNKED_DATASET);
- every association reads the network with _recv (AssociationSocket.recv replaced:
  use_node_reads), its socket with TCP_NODELAY and its DUL thread's idle delay raised
  (tuned), the peer's answers acknowledged at once (quick_ack);
- the listening server hands connections to the Doorman (network.py) instead of pynetdicom's
  threads (its process_request and get_request replaced: hand_connections_to,
  accept_without_handshake), and the Doorman reads an A-ASSOCIATE-RQ with pynetdicom's PDU
  decoder (check_associate_rq);
- a rejection's log line reads the A-ASSOCIATE-RJ that pynetdicom sent (rejection_sent)."""
import errno
import math
import socket
import ssl
import time

import pynetdicom
import pynetdicom.transport

from common import one_line, os_reason
from node.dicom import (ASSOCIATE_SECONDS, MAX_PDU_BYTES, MAX_REQUEST_BYTES, MIN_RECV_RATE,
                        RECV_BYTES, ServeError)
from node.logs import log

# The pynetdicom versions whose internals everything below was checked against
PYNETDICOM_VERSIONS = ("3.0.4",)

# A file path given to send_c_store is sent as it is on disk (Sender._send_folder); _config is
# pynetdicom's documented settings module, its name notwithstanding
pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True

DUL_IDLE_SECONDS = 0.005
QUICK_ACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def check_pynetdicom_version(version=None):
    """ServeError (one line) unless `version` (default: the installed pynetdicom's) is one of
    PYNETDICOM_VERSIONS: the node would patch internals that may have changed."""
    version = pynetdicom.__version__ if version is None else version
    if version not in PYNETDICOM_VERSIONS:
        raise ServeError(f"pynetdicom {version} is installed, but the node reaches into "
                         "pynetdicom's internals (node/pynetdicom_internals.py) and was checked "
                         f"against pynetdicom {', '.join(PYNETDICOM_VERSIONS)} only: pip install "
                         f"pynetdicom=={PYNETDICOM_VERSIONS[-1]}")


def tuned(assoc):
    """An association's socket sends each message at once (TCP_NODELAY: DICOM is request and
    response; with Nagle's algorithm each C-STORE of a report waited 40-90 ms for a delayed
    ACK), and its network thread waits 5 ms, not pynetdicom's 1 ms, before it looks at an idle
    socket again (DUL._run_loop_delay, the knob pynetdicom leaves for it): under load each
    open association's polling took CPU from decoding and inference."""
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assoc.dul._run_loop_delay = DUL_IDLE_SECONDS


def _recv(self, nr_bytes):
    """pynetdicom's AssociationSocket.recv (nr_bytes, fewer where the peer closed or is too
    slow: pynetdicom then ends the association), as the node reads the network:
    - up to 1 MiB per call instead of 4 KB: a 2 MB image took 512 calls, each giving up and
      taking back the interpreter lock, 6.3 ms of CPU per image idle (3.9 now; over TLS a
      call returns one record, 16 KB, at most);
    - a PDU over MAX_PDU_BYTES is not read at all. pynetdicom would hold any length a peer
      declares and sends, an A-ASSOCIATE request included, before the caller is checked
      against --allow-ae (P-DATA PDUs may not exceed the maximum the node declares, 4 MiB
      when it receives; no other PDU comes near it);
    - each PDU within --timeout seconds plus its length at MIN_RECV_RATE, a peer silent or
      dripping a byte now and then included (pynetdicom's sockets have no timeout: such a
      peer held its association, and its slot of --max-associations, for good); the TLS
      handshake, done at the first read (start_dicom), is under the same deadline;
    - before its association is established a peer has ASSOCIATE_SECONDS (at most --timeout)
      from its first read for everything (the TLS handshake, the A-ASSOCIATE-RQ's header and
      body), and its A-ASSOCIATE-RQ may declare at most MAX_REQUEST_BYTES: a request that
      declared 4 MiB and dripped held a slot for over a minute;
    - a TLS failure (a bad certificate, plain TCP to a TLS port) is one log line, not a
      traceback."""
    associating = (getattr(self.assoc, "is_acceptor", False)
                   and not self.assoc.is_established)
    limit = MAX_REQUEST_BYTES if associating else MAX_PDU_BYTES
    if nr_bytes > limit:
        log.warning("a peer sends a PDU of %d bytes, over the %d the node accepts%s: "
                    "connection closed", nr_bytes, limit,
                    " before association" if associating else "")
        return bytearray()
    timeout = self.assoc.network_timeout
    allowed = None if timeout is None else timeout + nr_bytes / MIN_RECV_RATE
    deadline = None if allowed is None else time.monotonic() + allowed
    if associating:  # one deadline for the whole request, from its first read (Doorman)
        if getattr(self.assoc, "_node_associate_by", None) is None:
            self.assoc._node_associate_by = time.monotonic() + min(
                timeout if timeout is not None else ASSOCIATE_SECONDS, ASSOCIATE_SECONDS)
        deadline = min(deadline or math.inf, self.assoc._node_associate_by)
        allowed = max(0.0, deadline - time.monotonic())
    previous = self.socket.gettimeout()
    data = bytearray()
    try:
        while len(data) < nr_bytes:
            if deadline is not None:
                self.socket.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.socket.recv(min(nr_bytes - len(data), RECV_BYTES))
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        if associating:
            log.warning("a peer sent %d of a PDU's %d bytes before association in %.0f s "
                        "(at most %g s from its first byte): connection closed", len(data),
                        nr_bytes, allowed, ASSOCIATE_SECONDS)
        else:
            log.warning("a peer sent %d of a PDU's %d bytes in %.0f s (--timeout, then %d "
                        "KB/s): connection closed", len(data), nr_bytes, allowed,
                        MIN_RECV_RATE // 1024)
    except ssl.SSLError as e:
        log.warning("TLS with a peer failed (%s): connection closed", one_line(e))
    except OSError as e:  # reset by the peer, or closed meanwhile: what arrived, and the end
        log.info("a peer's connection failed (%s)", os_reason(e))
    finally:
        try:
            self.socket.settimeout(previous)
        except OSError:  # closed meanwhile
            pass
    return data


def use_node_reads():
    """The node's network reads (_recv) in every pynetdicom association of this process."""
    pynetdicom.transport.AssociationSocket.recv = _recv


def quick_ack(event):
    """After each PDU the node sends, the peer's answer is acknowledged at once (TCP_QUICKACK,
    Linux), not after the 40 ms of a delayed ACK: DCMTK (storescp, Orthanc) writes a response's
    PDU header and its body separately, with Nagle's algorithm on, so the body waited for that
    ACK. Every C-STORE of a result took 48 ms against them; 11 ms with this."""
    if QUICK_ACK is not None:
        try:
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, QUICK_ACK, 1)
        except (AttributeError, OSError):  # closed meanwhile
            pass


def accept_without_handshake(server, ssl_context):
    """The accepting thread of pynetdicom's `server` (socketserver's get_request, replaced)
    accepts a connection and, with TLS, wraps it without its handshake (the Doorman does it).

    pynetdicom does each TLS handshake in its one accepting thread, with no timeout: a
    connection that never says hello held up every other sender. The handshake is the
    doorman's, without blocking. (A connection in the moment between start_server and this
    call, before the node says it listens, still gets pynetdicom's handshake.) Out of file
    descriptors, the accepting thread pauses instead of spinning on the listening socket."""
    def get_request():
        try:
            client, address = server.socket.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.warning("cannot accept a connection: %s", os_reason(e))
                time.sleep(0.2)
            raise
        if ssl_context is None:
            return client, address
        return ssl_context.wrap_socket(client, server_side=True,
                                       do_handshake_on_connect=False), address
    server.get_request = get_request


def hand_connections_to(server, admit):
    """Every connection pynetdicom's `server` accepts goes to admit(request, address) instead
    (socketserver's process_request, replaced); the replaced one, which starts an
    association (a pynetdicom thread, a slot of --max-associations), is returned."""
    hand_over = server.process_request
    server.process_request = admit
    return hand_over


def check_associate_rq(data):
    """Raise unless `data` is an A-ASSOCIATE-RQ PDU that pynetdicom's own decoder reads."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    A_ASSOCIATE_RQ().decode(data)


def rejection_sent(assoc):
    """((A-ASSOCIATE-RJ's source, its reason) as pynetdicom sent them to the peer, the called
    AE title the peer asked for) of a rejected association."""
    sent = assoc.acceptor.primitive
    called = getattr(assoc.requestor.primitive, "called_ae_title", "?")
    return (getattr(sent, "result_source", None), getattr(sent, "diagnostic", None)), called
