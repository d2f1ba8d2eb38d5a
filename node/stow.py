"""DICOMweb out: a result folder to a STOW-RS destination (--destination https://.../dicom-web),
one POST of every file in the folder as written (multipart/related; type="application/dicom"),
on one HTTP(S) connection kept open while results come, as an association is (node/sender.py
runs both the same way: retried with backoff, refusals counted, the outbox the durable copy).

What the answer means (PS3.18 10.5.3): 200 stored; 202 some stored (Referenced SOP Sequence),
those the Failed SOP Sequence names refused, the rest not stored; 400/409/415/422 with a body
that lists what was stored, the rest refused. Only a refusal counts toward failed/ (the object
at fault); any other answer (3xx, 401, 403, 404, 413, 431, 5xx, a bodiless 4xx, a server
that drips or never answers) is the service's or the settings' problem, retried without limit,
so that a wrong setting or an outage never moves results to failed/. Resends
carry the same SOP Instance UIDs (node/results.py result_uid): a destination that holds one
already answers 200 for it (Orthanc does), so a result is never stored twice."""
import base64
import http.client
import json
import socket
import ssl
import threading
import uuid
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from common import one_line, os_reason
from node.dicom import MIN_RECV_RATE, Refused, ServeError

# Answers that may refuse an object; any other but 200 and 202 (401, 404, 413, 3xx, 5xx...)
# is the service's or the settings' problem, retried
REFUSING_STATUSES = {400, 409, 415, 422}
MAX_CREDENTIALS_BYTES = 64 * 1024  # a token (a JWT with claims included) is a few KB
MAX_ANSWER_BYTES = 16 * 2 ** 20  # a STOW-RS answer is a few KB; a larger body is not read
CERTIFICATE_HINTS = {  # OpenSSL's X509_V_ERR_*
    18: " (--destination-tls-ca names the CA that signed it)",
    19: " (--destination-tls-ca names the CA that signed it)",
    20: " (--destination-tls-ca names the CA that signed it)",
    62: " (the certificate's names do not include the URL's host)"}
REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE = "00081199", "00081198"
REFERENCED_SOP_INSTANCE_UID, FAILURE_REASON = "00081155", "00081197"


def authorization(token_file, basic_auth_file):
    """The Authorization header's value: 'Bearer <token>' (--destination-token-file), 'Basic
    ...' (--destination-basic-auth-file, one line USER:PASSWORD), or None. Read at start (a
    missing or empty file is a one-line error) and again at every connection, so that a
    rotated token is used without a restart."""
    flag, path = (("--destination-token-file", token_file) if token_file
                  else ("--destination-basic-auth-file", basic_auth_file))
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CREDENTIALS_BYTES + 1)
        text = data.decode().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ServeError(f"{flag} {path}: {os_reason(e)}") from None
    if len(data) > MAX_CREDENTIALS_BYTES:
        raise ServeError(f"{flag} {path}: over {MAX_CREDENTIALS_BYTES // 1024} KiB, not "
                         "credentials")
    if not text:
        raise ServeError(f"{flag} {path}: empty")
    if token_file:
        if not (text.isascii() and text.isprintable()) or " " in text:
            raise ServeError(f"{flag} {path}: a token is one line of ASCII without spaces")
        return f"Bearer {text}"
    if ":" not in text or "\n" in text:
        raise ServeError(f"{flag} {path}: expected one line USER:PASSWORD")
    return "Basic " + base64.b64encode(text.encode()).decode()


class StowLink:
    """One HTTP(S) connection to a STOW-RS destination, as Sender uses an association."""

    def __init__(self, destination, tls, credentials, timeout):
        self.destination, self.credentials = destination, credentials
        if destination.scheme == "https":
            self.connection = http.client.HTTPSConnection(
                destination.host, destination.port, timeout=timeout, context=tls)
        else:
            self.connection = http.client.HTTPConnection(destination.host, destination.port,
                                                         timeout=timeout)
        self.timeout, self.is_open, self.used, self.aborted = timeout, True, False, False
        self.sock = None  # the socket of the request under way (_abort)

    def close(self):
        self.is_open = False
        self.connection.close()

    def store(self, files):
        """POST `files` (paths of DICOM Part 10 files) in one request. Returns when every
        one is stored; raises Refused where the destination refused some (those it names as
        failed, or a 400/409/415/422 that lists what it stored); ConnectionError for the rest
        (retried without limit). Those stored are unlinked first: never sent again."""
        boundary = uuid.uuid4().hex
        body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n"
                        % (boundary.encode(), Path(f).read_bytes()) for f in files)
        body += b"--%s--\r\n" % boundary.encode()
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                                   f"boundary={boundary}",
                   "Accept": "application/dicom+json"}
        if self.credentials:
            headers["Authorization"] = self.credentials
        status, reason, location, answer = self._post(body, headers)
        if status == 200:
            for f in files:
                Path(f).unlink()  # stored: never sent again
            return
        stored, failures, listed = _outcome(answer)
        if status != 202 and not (status in REFUSING_STATUSES and listed):
            hint = {401: ": the credentials (--destination-token-file or "
                         "--destination-basic-auth-file)",
                    403: ": the credentials are not allowed to store",
                    404: ": is the URL the service's root (ending in /dicom-web)?",
                    413: f": the request ({len(body) / 2 ** 20:.1f} MiB, an image's report and "
                         "heatmaps) is over what the service, or a proxy before it, accepts",
                    431: ": its headers are over what the service accepts (the token?)"
                    }.get(status, f": redirected to {location} (give --destination the URL "
                                  "it redirects to)" if 300 <= status < 400 else "")
            raise ConnectionError(f"HTTP {status} {reason}{hint}")
        uids = {f: _sop_instance_uid(f) for f in files}
        for f, uid in uids.items():
            if uid in stored:
                Path(f).unlink()
        left = [f for f in files if Path(f).exists()]
        if not left:  # 202 with every object stored (warnings only)
            return
        # a refusal counts toward failed/ only where the service said so of the object: named
        # failed, or not stored in an answer that refuses (409...) and lists what it stored
        refused = [Path(f).name for f in left if uids[f] in failures or status != 202]
        why = "; ".join(sorted({failures[uids[f]] for f in left if uids[f] in failures})) \
            or "no reason given"
        what = (f"{', '.join(refused)} refused" if refused
                else f"{len(left)} of {len(files)} not stored, the rest not named")
        error = f"{what} with HTTP {status} {reason} ({why})"
        raise Refused(error) if refused else ConnectionError(error)

    def _post(self, body, headers):
        """(status, reason, Location, the response body), over the open connection, the whole
        exchange within --timeout plus the body's length at 64 KB/s (a server dripping its
        answer holds no sending thread); a connection the server closed while it was idle
        (keep-alive ended) is opened again once, at once."""
        path = self.destination.path.rstrip("/") + "/studies"
        seconds = self.timeout + len(body) / MIN_RECV_RATE
        for attempt in (1, 2):
            self.aborted = False
            watchdog = threading.Timer(seconds, self._abort)
            watchdog.start()
            try:
                self.sock = None
                self.connection.request("POST", path, body=body, headers=headers)
                # the socket kept: an answer that closes the connection (HTTP/1.0, Connection:
                # close) takes it from the connection, and the watchdog must still reach it
                self.sock = self.connection.sock
                response = self.connection.getresponse()
                answer = response.read(MAX_ANSWER_BYTES + 1)  # a few KB: more is not an answer
                if self.aborted:  # cut short by the watchdog: not an answer
                    raise http.client.IncompleteRead(answer)
                if len(answer) > MAX_ANSWER_BYTES or response.will_close:
                    self.connection.close()
                    answer = answer[:0] if len(answer) > MAX_ANSWER_BYTES else answer
                self.used = True
                return response.status, response.reason, response.getheader("Location"), answer
            except ssl.SSLCertVerificationError as e:
                self.close()
                raise ConnectionError(f"{self.destination.host}'s certificate: {e.verify_message}"
                                      + CERTIFICATE_HINTS.get(e.verify_code, "")) from None
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.connection.close()
                if self.aborted:
                    self.is_open = False
                    raise ConnectionError(f"no whole answer within {seconds:.0f} s (--timeout, "
                                          "then 64 KB/s)") from None
                if attempt == 2 or not self.used:
                    self.is_open = False
                    raise
            except (OSError, http.client.HTTPException) as e:
                self.close()
                if self.aborted:
                    raise ConnectionError(f"no whole answer within {seconds:.0f} s (--timeout, "
                                          "then 64 KB/s)") from None
                raise ConnectionError(one_line(e)) from None
            finally:
                watchdog.cancel()

    def _abort(self):
        """The request's time is up: its socket shut, so that a blocked read returns."""
        self.aborted = True
        sock = self.sock or self.connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _outcome(answer):
    """({SOP Instance UIDs stored}, {UID: failure reason}, whether the body lists either) from
    a STOW-RS response body in DICOM JSON; empty where it is absent or unreadable (then nothing
    is known stored)."""
    try:
        data = json.loads(answer)
    except ValueError:
        return set(), {}, False

    def items(tag):
        element = data.get(tag) if isinstance(data, dict) else None
        values = element.get("Value", []) if isinstance(element, dict) else []
        return [v for v in values if isinstance(v, dict)]

    def value(item, tag):
        element = item.get(tag)
        values = element.get("Value") if isinstance(element, dict) else None
        return values[0] if isinstance(values, list) and values else None

    stored = {value(i, REFERENCED_SOP_INSTANCE_UID) for i in items(REFERENCED_SOP_SEQUENCE)}
    failures = {value(i, REFERENCED_SOP_INSTANCE_UID):
                f"failure reason 0x{value(i, FAILURE_REASON):04X}"
                if isinstance(value(i, FAILURE_REASON), int) else "failed"
                for i in items(FAILED_SOP_SEQUENCE)}
    listed = any(isinstance(data, dict) and tag in data
                 for tag in (REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE))
    return stored - {None}, failures, listed


def _sop_instance_uid(path):
    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
