"""serve.py sending its results by DICOMweb (STOW-RS): to a real Orthanc with its DICOMweb plugin
(Debian's orthanc-dicomweb) behind TLS and a password, and to a small STOW-RS service in the
test that checks a bearer token and answers as the test tells it (an outage, a partial store, a
refusal). Retried, durable and idempotent as C-STORE is (tests/test_serve.py)."""
import email.parser
import io
import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import assert_clean_error, run_script
from dicom_files import sr_findings
from test_serve import (NodeProcess, Orthanc, dx_files, free_port, model_dir,  # noqa: F401
                        need, storescu, wait_for)

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def self_signed(tmp_path):
    """(certificate, key) for 127.0.0.1: its own CA."""
    need("openssl")
    cert, key = tmp_path / "pacs.pem", tmp_path / "pacs.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


class TlsProxy:
    """TLS in front of a plain HTTP port, as a hospital's reverse proxy puts it in front of a
    PACS (Debian's Orthanc 1.10.1 with SslEnabled crashed, SIGSEGV, at its first HTTPS
    request here): the node's side is real TLS with `cert`, Orthanc behind it plain HTTP."""

    def __init__(self, cert, key, port):
        import socket
        import ssl
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port, self.target = self.listener.getsockname()[1], port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import ssl
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed: stop
                return
            try:
                client = self.context.wrap_socket(client, server_side=True)
            except (OSError, ssl.SSLError):  # the node refused our certificate: its choice
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass

    def stop(self):
        self.listener.close()


def web_pacs(root, **settings):
    """Orthanc with its DICOMweb plugin at /dicom-web/ (REST and DICOMweb on one HTTP port)."""
    if not DICOMWEB_PLUGIN.exists():
        need("orthanc-dicomweb plugin")  # skips, or fails under CI=true
    server = Orthanc(root, free_port(), Plugins=[str(DICOMWEB_PLUGIN)],
                     DicomWeb={"Enable": True, "Root": "/dicom-web/"}, **settings)
    server.node_port = free_port()
    return server


def parts(body, content_type):
    """The DICOM files of a multipart/related STOW-RS request, as pydicom datasets."""
    import pydicom
    message = email.parser.BytesParser().parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    return [pydicom.dcmread(io.BytesIO(p.get_payload(decode=True)))
            for p in message.get_payload()]


@pytest.mark.system
def test_results_reach_a_dicomweb_pacs_behind_tls_and_a_password(model_dir, dx_files, tmp_path):
    """--destination https://.../dicom-web to Orthanc's DICOMweb plugin with TLS and basic
    authentication: its certificate is verified (without --destination-tls-ca, against the
    system's CAs: refused, the results wait); a wrong password is retried, not given up, and a
    corrected password file is read without a restart; every image's report and heatmaps
    arrive; a result sent again (the node killed after the store, before it forgot the result)
    is not stored twice."""
    cert, key = self_signed(tmp_path)
    pacs = web_pacs(tmp_path / "pacs", AuthenticationEnabled=True,
                    RegisteredUsers={"chexnet": "right"})
    proxy = TlsProxy(cert, key, pacs.http)
    password = tmp_path / "dicomweb-password"
    password.write_text("chexnet:wrong\n")
    url = f"https://127.0.0.1:{proxy.port}/dicom-web"
    spool = tmp_path / "spool"
    web = ["--destination", url, "--destination-basic-auth-file", password]
    node = None
    try:
        node = NodeProcess(model_dir, spool, pacs, *web)
        sent = storescu(dx_files[:2], node.port)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: "certificate" in node.text(), 60, "the certificate refused")
        assert "--destination-tls-ca" in node.text()
        node.stop()
        assert len(list((spool / "outbox").iterdir())) == 2  # waiting, not given up
        node = NodeProcess(model_dir, spool, pacs, *web, "--destination-tls-ca", cert)
        wait_for(lambda: "HTTP 401" in node.text(), 60, "the wrong password refused")
        assert "--destination-basic-auth-file" in node.text()
        assert not (spool / "failed").exists()
        password.write_text("chexnet:right\n")  # no restart: read at every connection
        wait_for(lambda: not any((spool / "outbox").iterdir()), 120, "the results sent")
        srs = pacs.instances("SR")
        assert len(srs) == 2
        positives = sum(decision == "Present" for sr in srs
                        for _, _, decision in sr_findings(sr)[0].values())
        assert positives and len(pacs.instances("OT")) == positives  # one heatmap each
        stored = json.loads(pacs.get("/statistics"))["CountInstances"]
        # killed after Orthanc stored a result, before the node removed it from the outbox:
        # the same files are in the outbox at the restart, and are sent again
        node.kill9()
        again = spool / "outbox" / sr_findings(srs[0])[1]
        again.mkdir()
        for i, ds in enumerate([srs[0]] + pacs.instances("OT")):
            ds.save_as(again / f"{i}.dcm", enforce_file_format=True)
        node = NodeProcess(model_dir, spool, pacs, *web, "--destination-tls-ca", cert)
        wait_for(lambda: not any((spool / "outbox").iterdir()), 60, "the results sent again")
        assert json.loads(pacs.get("/statistics"))["CountInstances"] == stored
        assert len(pacs.instances("SR")) == 2
    finally:
        if node is not None:
            node.stop()
        proxy.stop()
        pacs.stop()


class StowService:
    """A STOW-RS service on 127.0.0.1: answers each POST with `self.answer(datasets)` ->
    (HTTP status, DICOM JSON body or None), and keeps every request."""

    def __init__(self):
        self.requests, self.answer = [], lambda datasets: (503, None)
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                datasets = parts(body, self.headers["Content-Type"])
                service.requests.append((self.path, dict(self.headers), datasets))
                if self.headers.get("Authorization") != "Bearer t0ken-1":
                    status, answer = 401, None
                else:
                    status, answer = service.answer(datasets)
                data = json.dumps(answer).encode() if answer is not None else b""
                if status == "drip":  # 200, then its body a byte a second
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    try:
                        for _ in range(120):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(1)
                    except OSError:  # the node gave up on it
                        pass
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                if status == 301:
                    self.send_header("Location", "https://elsewhere.example.org/dicom-web")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


def referenced(uids, failed=False):
    """A STOW-RS response body: these SOP Instance UIDs stored (or failed, reason 0xC000)."""
    items = [{"00081155": {"vr": "UI", "Value": [uid]},
              **({"00081197": {"vr": "US", "Value": [0xC000]}} if failed else {})}
             for uid in uids]
    return {("00081198" if failed else "00081199"): {"vr": "SQ", "Value": items}}


@pytest.mark.system
def test_stow_rs_outage_partial_store_and_refusal(model_dir, dx_files, tmp_path):
    """A bearer token goes with every request, the files go as one multipart/related request
    per image; an outage (503), a redirect, a size limit, an answer dripped past --timeout, a
    409 without a body are retried and nothing is given up; a partial store (202) is not sent
    again, only what was refused; a destination that refuses a result every time (409 naming
    it) moves it to failed/ with the reason, after 5 tries."""
    service = StowService()
    token = tmp_path / "token"
    token.write_text("t0ken-1\n")
    spool = tmp_path / "spool"
    pacs = type("Pacs", (), {"node_port": free_port(), "dicom": 1})
    node = NodeProcess(model_dir, spool, pacs, "--destination", service.url,
                       "--destination-token-file", token, "--timeout", "3")
    try:
        sent = storescu(dx_files[:1], node.port)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(service.requests) >= 3, 60, "three tries in the outage")
        assert "HTTP 503" in node.text() and not (spool / "failed").exists()
        path, headers, first = service.requests[0]
        assert path == "/dicom-web/studies" and headers["Authorization"] == "Bearer t0ken-1"
        assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
        folder = next((spool / "outbox").iterdir())
        assert len(first) == len(list(folder.iterdir())) >= 2  # the report and its heatmaps
        report = next(ds.SOPInstanceUID for ds in first if ds.Modality == "SR")
        # answers that say nothing of the objects are the service's or the settings' problem:
        # retried, never given up (a redirect, a proxy's size limit, a body dripped)
        for status, words in [(301, "redirected to https://elsewhere.example.org/dicom-web"),
                              (413, "is over what the service, or a proxy before it, accepts"),
                              ("drip", "no whole answer within"), (409, "HTTP 409")]:
            service.answer = lambda datasets, status=status: (status, None)
            wait_for(lambda: words in node.text(), 120, words)
        assert not (spool / "failed").exists()
        # the report stored, the heatmaps refused: the report is not sent again
        service.answer = lambda datasets: (202, {
            **referenced([ds.SOPInstanceUID for ds in datasets if ds.Modality == "SR"]),
            **referenced([ds.SOPInstanceUID for ds in datasets if ds.Modality != "SR"], True)})
        tries = len(service.requests)
        wait_for(lambda: len(service.requests) > tries + 1, 60, "a try after the partial store")
        assert all(ds.SOPInstanceUID != report for _, _, later in service.requests[tries + 1:]
                   for ds in later)
        # then refused every time: failed/, with the reason
        service.answer = lambda datasets: (409, referenced(
            [ds.SOPInstanceUID for ds in datasets], True))
        failed = spool / "failed" / folder.name
        wait_for(failed.exists, 60, "the refused result in failed/")
        reason = Path(f"{failed}.txt").read_text()
        assert "409" in reason and "0xC000" in reason
        assert not any((spool / "outbox").iterdir())
    finally:
        node.stop()
        service.stop()


@pytest.mark.integration
def test_dicomweb_settings_fail_with_one_line(tmp_path):
    """A DICOMweb destination's settings a user gets wrong: one line naming the flag, before
    the model is loaded."""
    base = ["serve.py", "--spool", tmp_path / "spool", "--port", str(free_port()), "--host",
            "127.0.0.1", "--allow-any-ae", "--model-dir", tmp_path / "no-model"]
    token = tmp_path / "token"
    token.write_text("abc\n")
    for extra, fragments in [
            (["--destination", "https://user:pw@pacs.example.org/dicom-web"],
             ["--destination", "no credentials in the URL"]),
            (["--destination", "https://pacs.example.org/dicom-web?x=1"], ["--destination"]),
            (["--destination", "PACS@127.0.0.1:104", "--destination-token-file", token],
             ["--destination-token-file", "DICOMweb"]),
            (["--destination", "https://pacs.example.org/dicom-web", "--destination-token-file",
              token, "--destination-basic-auth-file", token], ["--destination-basic-auth-file"]),
            (["--destination", "http://pacs.example.org/dicom-web", "--destination-token-file",
              token], ["--destination", "plain http"]),
            (["--destination", "http://127.0.0.1:8042/dicom-web", "--destination-tls-ca", token],
             ["--destination-tls-ca", "https"]),
            (["--destination", "https://pacs.example.org/dicom-web", "--destination-token-file",
              tmp_path / "missing"], ["--destination-token-file", "missing"]),
            (["--destination", "https://pacs.example.org/dicom-web",
              "--destination-basic-auth-file", token], ["--destination-basic-auth-file",
                                                         "USER:PASSWORD"])]:
        assert_clean_error(run_script(*base, *extra), *fragments)
    shutil.rmtree(tmp_path / "spool", ignore_errors=True)
