"""DICOMweb out: a result folder to a STOW-RS destination (--destination https://.../dicom-web),
one POST of every file in the folder as written (multipart/related; type="application/dicom"),
on one HTTP(S) connection kept open while results come, as an association is (node/sender.py
runs both the same way: retried with backoff, refusals counted, the outbox the durable copy).

What the answer means (PS3.18 10.5.3): 200 stored; 202 some stored; 409 or another 4xx, the
response names what it stored (Referenced SOP Sequence), the rest was refused. Refused is
counted toward failed/ only where the object is at fault; a destination that cannot take
anything now (401/403: the credentials; 404: the URL; 408/429/5xx; no answer) is a network
failure, retried, so that a wrong setting or an outage never moves results to failed/. Resends
carry the same SOP Instance UIDs (node/results.py result_uid): a destination that holds one
already answers 200 for it (Orthanc does), so a result is never stored twice."""
import base64
import http.client
import json
import ssl
import uuid
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from common import os_reason
from node.dicom import Refused, ServeError

RETRIED_STATUSES = {401, 403, 404, 408, 429}  # and every 5xx: the destination, not the object
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
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ServeError(f"{flag} {path}: {os_reason(e)}") from None
    if not text:
        raise ServeError(f"{flag} {path}: empty")
    if token_file:
        if any(c.isspace() for c in text) or not text.isprintable():
            raise ServeError(f"{flag} {path}: a token is one line without spaces")
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
        self.is_open, self.used = True, False

    def close(self):
        self.is_open = False
        self.connection.close()

    def store(self, files):
        """POST `files` (paths of DICOM Part 10 files) in one request. Returns when every
        one is stored; raises Refused naming those the destination refused (the stored ones
        are unlinked first: never sent again), ConnectionError where nothing is known stored."""
        boundary = uuid.uuid4().hex
        body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n"
                        % (boundary.encode(), Path(f).read_bytes()) for f in files)
        body += b"--%s--\r\n" % boundary.encode()
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                                   f"boundary={boundary}",
                   "Accept": "application/dicom+json"}
        if self.credentials:
            headers["Authorization"] = self.credentials
        status, reason, answer = self._post(body, headers)
        if status == 200:
            for f in files:
                Path(f).unlink()  # stored: never sent again
            return
        if status in RETRIED_STATUSES or status >= 500 or status < 200:
            hint = {401: ": the credentials (--destination-token-file or "
                         "--destination-basic-auth-file)",
                    403: ": the credentials are not allowed to store",
                    404: ": is the URL the service's root (ending in /dicom-web)?"}.get(status, "")
            raise ConnectionError(f"HTTP {status} {reason}{hint}")
        stored, failures = _outcome(answer)
        for f in files:
            if _sop_instance_uid(f) in stored:
                Path(f).unlink()
        refused = [Path(f).name for f in files if Path(f).exists()]
        if not refused:  # 202 with every object stored (warnings only)
            return
        why = "; ".join(sorted(set(failures.values()))) or "no reason given"
        raise Refused(f"{', '.join(refused)} refused with HTTP {status} {reason} ({why})")

    def _post(self, body, headers):
        """(status, reason, the response body), over the open connection; a connection the
        server closed while it was idle (keep-alive ended) is opened again once, at once."""
        path = self.destination.path.rstrip("/") + "/studies"
        for attempt in (1, 2):
            try:
                self.connection.request("POST", path, body=body, headers=headers)
                response = self.connection.getresponse()
                answer = response.read()
                if response.will_close:
                    self.connection.close()
                self.used = True
                return response.status, response.reason, answer
            except ssl.SSLCertVerificationError as e:
                self.close()
                raise ConnectionError(f"{self.destination.host}'s certificate: {e.verify_message}"
                                      " (--destination-tls-ca names the CA that signed it)"
                                      ) from None
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.connection.close()
                if attempt == 2 or not self.used:
                    self.is_open = False
                    raise
            except (OSError, http.client.HTTPException):
                self.close()
                raise


def _outcome(answer):
    """({SOP Instance UIDs stored}, {UID: failure reason}) from a STOW-RS response body in
    DICOM JSON; empty where it is absent or unreadable (then nothing is known stored)."""
    try:
        data = json.loads(answer)
    except ValueError:
        return set(), {}

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
    return stored - {None}, failures


def _sop_instance_uid(path):
    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
