"""HTTP (standard library only): POST /predict (a PNG, JPEG or DICOM body: its findings, as
infer.py --image) and GET /health (the node's state), with an optional bearer token, bounded
connections and bodies that must arrive at a minimum rate."""
import hmac
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path

from common import DataError, one_line, os_reason
from images import normalize_gray
from node.checks import image_problem, read_dataset
from node.dicom import MIN_RECV_RATE, RECV_BYTES, VERSION, ServeError
from node.logs import log
from node.workers import NoWorkers, Stopping, WorkerDied, decode_in_worker

HTTP_CONNECTIONS = 64  # HTTP connections at once, idle ones included
RASTER_MAGIC = {b"\x89PNG\r\n\x1a\n": ".png", b"\xff\xd8\xff": ".jpg"}


def start_http(node, settings):
    """POST /predict and GET /health of `node` on settings.http_port, in a thread of their
    own: the server (its shutdown() stops it)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    token = read_token(settings.http_token_file)

    busy = threading.BoundedSemaphore(settings.max_associations)

    class Handler(BaseHTTPRequestHandler):
        server_version = VERSION.replace(" ", "/")
        timeout = settings.timeout  # a client that stops sending does not hold a thread forever

        def log_message(self, fmt, *a):  # into the node's log, not stderr
            log.info("http %s %s", self.address_string(), fmt % a)

        def reply(self, code, body):
            data = (json.dumps(body, indent=1) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def read_body(self, length):
            """The body, or None where it does not arrive within --timeout plus its length at
            MIN_RECV_RATE (as a DICOM PDU must): a client dripping a byte now and then held
            a /predict slot for as long as it liked. Shorter at the end of the connection."""
            deadline = time.monotonic() + settings.timeout + length / MIN_RECV_RATE
            parts, have = [], 0
            try:
                while have < length:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self.connection.settimeout(left)
                    chunk = self.rfile.read1(min(length - have, RECV_BYTES))
                    if not chunk:
                        break
                    parts.append(chunk)
                    have += len(chunk)
            except TimeoutError:
                return None
            finally:
                self.connection.settimeout(settings.timeout)
            return b"".join(parts)

        def authorised(self):
            if token is None:
                return True
            # RFC 9110 11.1: the scheme is case-insensitive ("bearer" is "Bearer")
            scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token):
                return True
            self.reply(401, {"error": "a valid 'Authorization: Bearer TOKEN' header is needed"})
            return False

        def do_GET(self):
            if self.path != "/health":
                return self.reply(404, {"error": "GET /health or POST /predict"})
            if self.authorised():
                self.reply(200, node.health())

        def do_POST(self):
            if self.path != "/predict":
                return self.reply(404, {"error": "GET /health or POST /predict"})
            if not self.authorised():
                return
            length, code, error = body_length(self.headers, settings.max_image_mb * 2 ** 20)
            if error:
                log.warning("http %s POST /predict refused (%d): %s", self.address_string(),
                            code, error)
                self.close_connection = True  # the body, if any, is not read
                return self.reply(code, {"error": error})
            if not busy.acquire(blocking=False):
                return self.reply(503, {"error": f"more than --max-associations "
                                                 f"{settings.max_associations} requests at once"})
            try:
                body = self.read_body(length)
                if body is None:
                    self.close_connection = True
                    return self.reply(408, {"error": f"the body of {length} bytes did not "
                                                     f"arrive within {settings.timeout:g} s plus "
                                                     f"its length at {MIN_RECV_RATE // 1024} "
                                                     "KB/s"})
                if len(body) < length:
                    return self.reply(400, {"error": "body shorter than its Content-Length"})
                result = predict_bytes(node, body)
            except DataError as e:
                return self.reply(400, {"error": one_line(e)})
            except Stopping:
                return self.reply(503, {"error": "the node is stopping"})
            except NoWorkers as e:
                return self.reply(503, {"error": one_line(e)})
            finally:
                busy.release()
            self.reply(200, result)

    connections = threading.BoundedSemaphore(HTTP_CONNECTIONS)

    class Server(ThreadingHTTPServer):
        """At most HTTP_CONNECTIONS connections at once (a thread each): a client dripping its
        headers holds one for as long as it sends a byte each --timeout; more are closed."""
        daemon_threads = True

        def process_request(self, request, address):
            if not connections.acquire(blocking=False):
                with node.lock:
                    why = f"more than {HTTP_CONNECTIONS} HTTP connections"
                    node.refusals[why] = node.refusals.get(why, 0) + 1
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, address)
            except Exception:
                connections.release()
                raise

        def process_request_thread(self, request, address):
            try:
                super().process_request_thread(request, address)
            finally:
                connections.release()

    server = Server((settings.host, settings.http_port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def body_length(headers, limit):
    """(length, 0, None) of a request's body, or (None, HTTP status, why): the one
    Content-Length must be all digits (a negative or signed length would read to the end of
    the connection), at most `limit`; no Transfer-Encoding (chunked bodies are not taken)."""
    values = headers.get_all("Content-Length") or []
    if headers.get("Transfer-Encoding"):
        return None, 411, "Transfer-Encoding is not accepted: send the body with a Content-Length"
    if not values:
        return None, 411, "Content-Length needed"
    if len(set(v.strip() for v in values)) != 1 or not re.fullmatch(r"[0-9]{1,15}",
                                                                     values[0].strip()):
        return None, 400, f"Content-Length {', '.join(values)[:40]!r} is not one length in bytes"
    length = int(values[0])
    if length > limit:
        return None, 413, f"body of {length} bytes over --max-image-mb {limit / 2 ** 20:g}"
    return length, 0, None


def predict_bytes(node, body):
    """The probabilities and decisions of a PNG, JPEG or DICOM body, as infer.py --image."""
    suffix = next((s for magic, s in RASTER_MAGIC.items() if body.startswith(magic)), None)
    if suffix is None and body[128:132] == b"DICM":
        try:
            ds = read_dataset(body, node.settings.max_image_mb)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"unreadable DICOM ({one_line(e)[:200]})") from None
        problem, _ = image_problem(ds, node.settings.max_image_mb)
        if problem:
            raise DataError(problem)
        suffix = ".dcm"
    if suffix is None:
        raise DataError("the body is not a PNG, JPEG or DICOM file")
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(body)
        f.flush()
        try:
            gray, _ = node.workers.run(decode_in_worker, f.name, False)
        except WorkerDied:
            raise DataError("decoding it stopped the worker process (a crash in the "
                            "decoder)") from None
        probs, _ = node.model.predict(normalize_gray(gray))  # as infer.py --image: eval_input
    if probs is None:
        raise DataError("inference failed")
    return {"model": node.model.identity, "findings": node.model.findings(probs),
            "rule": node.settings.rule if node.model.points is not None else None,
            "notice": "; ".join(filter(None, ["research use only, not for diagnosis",
                                              node.model.identity.get("notice")]))}


def read_token(path):
    if path is None:
        token = os.environ.get("CHEXNET_HTTP_TOKEN")
        return token.encode() if token else None
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ServeError(f"--http-token-file {path}: {os_reason(e)}") from None
    if not token:
        raise ServeError(f"--http-token-file {path}: empty")
    return token.encode()
