"""serve.py, the DICOM node, with real parts: a real PACS (Orthanc, Debian's package) started on
127.0.0.1 with its own configuration, a real sender (DCMTK's storescu), DX files made from the
real NIH images, the small exported model; the node itself runs with torch (and nncf) made
impossible to import. Results are read back through Orthanc's REST API."""
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_clean_error, run_script
from dicom_files import dcmtk, dicom_errors, evidence_uids, sr_findings
from node.sr import unclassified_reason


# serve.py run as a script with torch, torchvision and nncf made to fail on import.
NO_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "nncf"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
runpy.run_path("serve.py", run_name="__main__")
"""
NODE_AE = "CHEXNET"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(binary):
    """The path of a program of the real parts (Orthanc; DCMTK's, not pynetdicom's apps)."""
    found = dcmtk(binary) if binary in ("storescu", "storescp") else (
        shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin"))
    if found is None:
        message = (f"{binary} not installed (apt-get install orthanc orthanc-dicomweb dcmtk "
                   "dicom3tools; .ci/run does it)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def wait_for(condition, timeout, what, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---------------------------------------------------------------------------------------------
# The real PACS

class Orthanc:
    """Orthanc as a plain process: its own JSON configuration, storage in tmp, free ports."""

    def __init__(self, root, node_port, **settings):
        self.binary = need("Orthanc")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.http, self.dicom = free_port(), free_port()
        self.config = self.root / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "test-pacs", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"), "HttpPort": self.http,
            "DicomPort": self.dicom, "DicomAet": "PACS", "AuthenticationEnabled": False,
            "RemoteAccessAllowed": False, "HttpServerEnabled": True, "Plugins": [],
            "DicomModalities": {"chexnet": [NODE_AE, "127.0.0.1", node_port]},
            "DicomAlwaysAllowStore": False,  # only the modalities listed may store
            **settings}))
        # the test reads Orthanc's REST API as its first registered user, over its TLS (the
        # node's verification of Orthanc's certificate is what a test checks, not this)
        self.base = f"{'https' if settings.get('SslEnabled') else 'http'}://127.0.0.1:{self.http}"
        users = settings.get("RegisteredUsers") or {}
        self.headers = {"Authorization": "Basic " + base64.b64encode(
            ":".join(next(iter(users.items()))).encode()).decode()} if users else {}
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen([self.binary, str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "orthanc.log", "ab"))
        wait_for(self._up, 60, "Orthanc to answer")

    def _up(self):
        try:
            return self.get("/system") is not None
        except OSError:
            return False

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None

    def get(self, path):
        with self._open(urllib.request.Request(self.base + path, headers=self.headers)) as r:
            return r.read()

    def post(self, path, body):
        request = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                         headers=self.headers)
        with self._open(request) as r:
            return json.loads(r.read())

    def delete(self, path):
        self._open(urllib.request.Request(self.base + path, method="DELETE",
                                          headers=self.headers)).close()

    def _open(self, request):
        import ssl
        return urllib.request.urlopen(request, timeout=10,
                                      context=ssl._create_unverified_context())

    def instances(self, modality):
        """pydicom datasets of every instance of this modality Orthanc holds."""
        import io

        import pydicom
        ids = self.post("/tools/find", {"Level": "Instance", "Query": {"Modality": modality}})
        return [pydicom.dcmread(io.BytesIO(self.get(f"/instances/{i}/file"))) for i in ids]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """One Orthanc for the module's tests (each starts in 1-2 s; `pacs` empties it)."""
    node_port = free_port()
    server = Orthanc(tmp_path_factory.mktemp("pacs"), node_port)
    server.node_port = node_port
    yield server
    server.stop()


@pytest.fixture
def pacs(orthanc):
    """The module's Orthanc, running and empty: what a test left there is deleted."""
    if orthanc.proc is None or orthanc.proc.poll() is not None:
        orthanc.start()  # a test stops it to play a PACS that is down
    for patient in json.loads(orthanc.get("/patients")):
        orthanc.delete(f"/patients/{patient}")
    assert json.loads(orthanc.get("/instances")) == []
    return orthanc


# ---------------------------------------------------------------------------------------------
# The node

class NodeProcess:
    def __init__(self, model_dir, spool, pacs, *extra, port=None):
        self.port = port or pacs.node_port
        self.log = Path(spool).parent / f"{Path(spool).name}.log"
        self.args = ["--model-dir", model_dir, "--spool", spool, "--ae-title", NODE_AE,
                     "--host", "127.0.0.1", "--port", self.port, "--allow-ae", "STORESCU", "SENDER",
                     "--destination", f"PACS@127.0.0.1:{pacs.dicom}", "--retry-seconds", "0.2",
                     "--retry-max-seconds", "1", *extra]
        self.proc = None
        self.start()

    def start(self):
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen([sys.executable, "-c", NO_TORCH, "serve.py",
                                      *map(str, self.args)], cwd=REPO, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        wait_for(lambda: "listening as" in self.text() or self.proc.poll() is not None, 120,
                 "the node to listen")
        assert self.proc.poll() is None, self.text()

    def text(self, since_start=True):
        data = self.log.read_bytes() if self.log.exists() else b""
        return data[self.offset if since_start else 0:].decode(errors="replace")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def storescu(files, port, aet="STORESCU"):
    return subprocess.run([need("storescu"), "-aet", aet, "-aec", NODE_AE, "127.0.0.1",
                           str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=300)


def send(datasets, port, aet="SENDER", tls=None):
    """pynetdicom as a sender: the C-STORE status of each dataset (None: no association)."""
    from pynetdicom import AE
    ae = AE(ae_title=aet)
    ae.connection_timeout = 30  # connecting, and the TLS handshake
    for sop_class, syntax in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
                              for ds in datasets}:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, tls_args=tls)
    if not assoc.is_established:
        return None
    try:
        return [getattr(assoc.send_c_store(ds), "Status", None) for ds in datasets]
    finally:
        assoc.release()


SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"  # 3D SR, SC


def destination(contexts, on_store):
    """A destination of pynetdicom's on a free 127.0.0.1 port, accepting {SOP class: transfer
    syntaxes}, answering each C-STORE with on_store(event): (its server, the PACS as
    NodeProcess takes it)."""
    from pynetdicom import AE, evt
    ae = AE(ae_title="PACS")
    for sop_class, syntaxes in contexts.items():
        ae.add_supported_context(sop_class, syntaxes)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, type("Pacs", (), {"node_port": free_port(),
                                     "dicom": server.server_address[1]})


def all_sent(spool, n):
    """n images classified and every result sent."""
    return len(list((spool / "done").glob("*.json"))) == n \
        and not any((spool / "outbox").iterdir())


# ---------------------------------------------------------------------------------------------
# Fixtures: the model with its operating points, DX files from NIH images

@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory):
    """The small exported model, with operating points chosen on its val split (a copy: the
    shared fixture stays as other tests expect it)."""
    work, _ = request.getfixturevalue("small_model")
    nih_dir = request.getfixturevalue("nih_dir")
    target = tmp_path_factory.mktemp("serve") / "models"
    shutil.copytree(work / "models", target)
    proc = run_script("infer.py", "--mode", "int8", "--part", "val", "--model-dir", target,
                      "--data-dir", nih_dir, "--no-figures", "--n-boot", "100")
    assert proc.returncode == 0, proc.stderr
    return target


@pytest.fixture(scope="module")
def dx_files(nih_images, tmp_path_factory):
    """16 DX files of NIH images, two studies."""
    from pydicom.uid import generate_uid

    from dicom_files import dx_file
    image_dir, _ = nih_images
    out = tmp_path_factory.mktemp("dx")
    pngs = sorted(image_dir.glob("*.png"))[:16]
    studies = [(generate_uid(), generate_uid()) for _ in range(2)]
    return [dx_file(png, out / f"{png.stem}.dcm", *studies[i % 2], i + 1)
            for i, png in enumerate(pngs)]


def uid_of(path):
    import pydicom
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def infer_image(model_dir, *files):
    """`python infer.py --mode int8 --image FILES`: {file: {finding: (p, decision)}}."""
    proc = run_script("infer.py", "--mode", "int8", "--model-dir", model_dir, "--image", *files)
    assert proc.returncode == 0, proc.stderr
    result, current = {}, None
    for line in proc.stdout.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            current = result.setdefault(line[:-1], {})
        match = re.match(r"^  (\S+)\s+([0-9.]+)\s+(positive|negative)", line)
        if match and current is not None:
            current[match.group(1)] = (float(match.group(2)), match.group(3))
    return result


# ---------------------------------------------------------------------------------------------

@pytest.mark.system
def test_reports_reach_the_pacs_with_infer_probabilities(model_dir, dx_files, pacs, tmp_path,
                                                         nih_images):
    """storescu -> node -> Orthanc: each image's SR (same study, referencing it) holds the
    probabilities and decisions of `infer.py --mode int8 --image` on the same file, the model's
    SHA-256 and the research-use statement; each positive finding has its heatmap SC. HTTP
    /predict gives the same numbers for the PNG; /health counts. The node never imports torch."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    http = free_port()
    node = NodeProcess(model_dir, tmp_path / "spool", pacs, "--http-port", http,
                       "--http-token-file", token)
    try:
        files = dx_files[:3]
        sent = storescu(files, node.port)
        assert sent.returncode == 0, sent.stderr
        srs = wait_for(lambda: len(pacs.instances("SR")) == 3 and pacs.instances("SR"), 120,
                       "3 reports in Orthanc")
        wait_for(lambda: not any((tmp_path / "spool" / "outbox").iterdir()), 120,
                 "every heatmap sent")
        expected = infer_image(model_dir, *files)
        meta = json.loads((model_dir / "chexnet.json").read_text())
        files_sha = meta["files"]["chexnet_int8.xml"]
        by_source = {}
        for sr in srs:
            findings, source, texts = sr_findings(sr)
            by_source[source] = (sr, findings, texts)
        scs = pacs.instances("OT")
        for path in files:
            import pydicom
            original = pydicom.dcmread(path, stop_before_pixels=True)
            sr, findings, texts = by_source[str(original.SOPInstanceUID)]
            assert sr.StudyInstanceUID == original.StudyInstanceUID
            assert sr.PatientID == original.PatientID
            assert "RESEARCH USE ONLY - NOT FOR DIAGNOSIS" in texts["Intended use"]
            assert "trained on the bundled 200-image sample" in texts["Notice"]
            assert f"chexnet_int8.xml sha256 {files_sha}" in texts["Algorithm Parameters"]
            want = expected[str(path)]
            assert set(findings) == set(want)
            for name, (p, threshold, decision) in findings.items():
                assert round(p, 4) == pytest.approx(want[name][0], abs=1e-12), name
                assert {"Present": "positive", "Absent": "negative"}[decision] == want[name][1]
                assert (p >= threshold) == (decision == "Present")
            positives = sorted(n for n, (_, _, d) in findings.items() if d == "Present")
            mine = [sc for sc in scs if sc.StudyInstanceUID == original.StudyInstanceUID
                    and sc.ImageComments.split(":")[0] in positives
                    and sc.PatientID == original.PatientID]
            assert sorted(sc.ImageComments.split(":")[0] for sc in mine) == positives
            for sc in mine:  # JPEG Baseline, marked lossy, on the source's pixel grid
                assert (sc.Rows, sc.Columns) == (original.Rows, original.Columns)
                assert "trained on the bundled 200-image sample" in sc.ImageComments
                assert sc.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
                assert (sc.LossyImageCompression, sc.LossyImageCompressionMethod) == \
                    ("01", "ISO_10918_1")
                rgb = sc.pixel_array.astype(int)  # in colour: the jet map over the X-ray
                assert rgb.shape == (sc.Rows, sc.Columns, 3)
                assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 20
        # Read by other tools, as stored: the report and a heatmap are valid objects
        # (dicom3tools' dciodvfy), DCMTK reads the report's TID 1500 tree with its codes
        for ds in (srs[0], *scs[:1]):
            assert dicom_errors(need("dciodvfy"), ds, tmp_path / "check.dcm") == [], \
                ds.SOPClassUID
        srs[0].save_as(tmp_path / "sr.dcm")
        tree = subprocess.run([need("dsrdump"), tmp_path / "sr.dcm"], capture_output=True,
                              text=True)
        assert tree.returncode == 0 and not tree.stderr, tree.stderr
        assert '<CONTAINER:(,,"Imaging Measurement Report")' in tree.stdout
        assert '<contains CODE:(,,"Finding")=(287272002,SCT,"Cardiomegaly")>' in tree.stdout
        assert '<has concept mod TEXT:(,,"Algorithm Name")="CheXNet' in tree.stdout
        # Full precision: the node's record equals what infer.py's code computes, bit for bit
        record = json.loads((tmp_path / "spool" / "done" / f"{uid_of(files[0])}.json").read_text())
        sys.path.insert(0, str(REPO))
        from images import eval_input
        from backends import data_defaults, load_openvino, read_metadata
        from images import average_crops
        data = data_defaults(read_metadata(model_dir))  # infer.py --image without data flags
        backend = load_openvino(model_dir, "int8", read_metadata(model_dir), data.crop_size)
        out = {}
        backend.run_all([(0, eval_input(files[0], data.resize, data.crop_size))],
                        lambda k, o: out.update(p=np.asarray(average_crops(o[:10])[0], np.float64)))
        assert [row["probability"] for row in record["findings"]] == out["p"].tolist()

        # HTTP: the PNG itself, the bearer token
        png = nih_images[0] / (Path(files[0]).stem + ".png")
        url = f"http://127.0.0.1:{http}"
        request = urllib.request.Request(f"{url}/predict", data=png.read_bytes())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 401
        request.add_header("Authorization", "Bearer s3cret")
        body = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert "trained on the bundled 200-image sample" in body["notice"]  # as every output
        want = infer_image(model_dir, png)[str(png)]
        for row in body["findings"]:
            assert round(row["probability"], 4) == pytest.approx(want[row["finding"]][0], abs=1e-12)
            assert row["decision"] == want[row["finding"]][1]
        bad = urllib.request.Request(f"{url}/predict", data=b"not an image",
                                     headers={"Authorization": "Bearer s3cret"})
        with pytest.raises(urllib.error.HTTPError) as rejected:
            urllib.request.urlopen(bad, timeout=60)
        assert rejected.value.code == 400
        health = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{url}/health", headers={"Authorization": "Bearer s3cret"}), timeout=10).read())
        assert health["counters"]["received"] == 3 and health["counters"]["processed"] == 3
        assert health["queues"] == {"inbox": 0, "outbox": 0, "quarantine": 0}
        assert "warming up the report writer failed" not in node.text()
        # where the time went, per stage: each of the 3 DICOM images passed every stage once,
        # the PNG of /predict the model's two
        per_image = health["seconds"]["per_image"]
        assert set(per_image) == set(health["seconds"]["stages"])
        assert {k: v["images"] for k, v in per_image.items()} == {
            "receive": 3, "decode": 3, "wait": 4, "infer": 4, "results": 3, "send": 3, "total": 3}
        assert all(0 <= v["p50"] <= v["p95"] for v in per_image.values())
        assert health["model"]["files"]["chexnet_int8.xml"] == files_sha
        assert "Traceback" not in node.text()
    finally:
        node.stop()


@pytest.mark.system
def test_kill_9_during_a_burst_then_restart_answers_each_image_once(model_dir, dx_files, pacs,
                                                                      tmp_path):
    """kill -9 while images arrive, and again while results are being sent; each restart
    finishes what was accepted; the sender resends everything (as it would after failures):
    every image has exactly one report at the PACS, and the node's records one per image."""
    spool = tmp_path / "spool"
    node = NodeProcess(model_dir, spool, pacs)
    try:
        burst = subprocess.Popen([need("storescu"), "-aet", "STORESCU", "-aec", NODE_AE,
                                  "127.0.0.1", str(node.port), *map(str, dx_files)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: node.text().count("accepted DX") >= 4, 120, "4 images accepted",
                 every=0.02)
        node.kill9()  # mid-burst: some accepted, some not yet received, none finished
        burst.wait(60)
        accepted_first = node.text().count("accepted DX")
        node.start()
        wait_for(lambda: "sent to" in node.text(), 120, "a result sent after the restart")
        node.kill9()  # mid-processing / mid-sending
        node.start()
        wait_for(lambda: "classified" in node.text(), 120, "an image classified", every=0.02)
        stopped = time.monotonic()
        node.stop()  # SIGTERM mid-processing: out at once, what was begun stays in the inbox
        took = time.monotonic() - stopped
        assert took < 10 and node.proc.returncode == 0, (took, node.proc.returncode,
                                                         node.text()[-3000:])
        node.start()
        resend = storescu(dx_files, node.port)  # the sender retries all of them
        assert resend.returncode == 0, resend.stderr
        uids = {uid_of(p) for p in dx_files}
        done = spool / "done"
        wait_for(lambda: len(list(done.glob("*.json"))) == len(uids), 240, "every image done")
        wait_for(lambda: not any((spool / "outbox").iterdir()), 120, "the outbox to empty")
        srs = pacs.instances("SR")
        sources = [sr_findings(sr)[1] for sr in srs]
        assert sorted(sources) == sorted(uids)  # one report each, none twice
        assert len({sr.SOPInstanceUID for sr in srs}) == len(uids)
        assert {p.stem for p in done.glob("*.json")} == uids
        assert not list((spool / "inbox").iterdir())
        assert not list((spool / "quarantine").iterdir())
        assert accepted_first >= 4
        assert "duplicate" in node.text()  # the resent ones already accepted
        whole = node.text(since_start=False)
        assert "Traceback" not in whole, whole[max(0, whole.index("Traceback") - 2000):][:5000]
    finally:
        node.stop()


@pytest.mark.system
def test_results_wait_for_a_pacs_that_is_down(model_dir, dx_files, pacs, tmp_path):
    """Orthanc stopped while images arrive: the results wait in the outbox, retried with
    backoff; Orthanc back: they arrive."""
    spool = tmp_path / "spool"
    node = NodeProcess(model_dir, spool, pacs, "--no-heatmaps")
    try:
        pacs.stop()
        assert storescu(dx_files[:3], node.port).returncode == 0
        wait_for(lambda: len(list((spool / "done").glob("*.json"))) == 3, 120, "3 classified")
        wait_for(lambda: "retry in" in node.text(), 30, "a failed send")
        assert len(list((spool / "outbox").iterdir())) == 3
        pacs.start()
        wait_for(lambda: len(pacs.instances("SR")) == 3, 60, "the 3 reports after the restart")
        wait_for(lambda: not any((spool / "outbox").iterdir()), 30, "the outbox to empty")
    finally:
        node.stop()


@pytest.mark.system
def test_refusals_and_quarantine_keep_the_node_serving(model_dir, dx_files, pacs, tmp_path):
    """A caller outside the allow-list, one association too many, a PDU longer than the node
    accepts, a non-image SOP class, a declared 65535x65535 image, a truncated object, a
    malformed UID, undecodable pixel data, a full queue: each refused with its status (or
    quarantined with its reason) and a log line, and the node still classifies the next image."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless, generate_uid
    from pynetdicom import AE
    spool = tmp_path / "spool"
    http = free_port()
    node = NodeProcess(model_dir, spool, pacs, "--max-associations", "2", "--max-queue", "1",
                       "--max-image-mb", "64", "--no-heatmaps", "--http-port", http)
    try:
        # not on the allow-list: refused at association
        assert storescu(dx_files[:1], node.port, aet="INTRUDER").returncode != 0
        assert "refused association from INTRUDER" in node.text()
        # two held associations: the third refused
        held = []
        for _ in range(2):
            ae = AE(ae_title="SENDER")
            ae.add_requested_context("1.2.840.10008.1.1")
            held.append(ae.associate("127.0.0.1", node.port, ae_title=NODE_AE))
        assert all(a.is_established for a in held)
        assert send([pydicom.dcmread(dx_files[0])], node.port) is None
        for a in held:
            a.release()
        assert "more than --max-associations 2" in node.text()
        # a PDU declared (and begun) longer than the node accepts, before any AE check: the
        # connection is closed, nothing of that length is held (the doorman: a request over
        # 256 KiB never reaches pynetdicom; its bytes unread, the close may be a reset)
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as raw:
            raw.sendall(b"\x01\x00\xff\xff\xff\xf0" + b"\0" * 65536)
            try:
                assert raw.recv(100) == b""  # closed by the node
            except ConnectionResetError:
                pass
        wait_for(lambda: "an association request over the size the node accepts"
                 in node.text(), 20, "the oversized request's log line")

        def variant(**changes):
            ds = pydicom.dcmread(dx_files[1])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            for key, value in changes.items():
                setattr(ds, key, value)
            return ds

        text_sr = variant()
        text_sr.SOPClassUID = text_sr.file_meta.MediaStorageSOPClassUID = \
            "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: not an image
        bomb = variant(Rows=65535, Columns=65535)
        truncated = variant()
        truncated.PixelData = truncated.PixelData[:len(truncated.PixelData) // 3]
        bad_uid = variant()
        bad_uid.SOPInstanceUID = "../../etc/passwd"
        # JPEG 2000 whose codestream is noise between its intact headers and its end marker:
        # it passes the checks of what a stream declares, and decoding fails later
        garbage = variant()
        garbage.compress(JPEG2000Lossless, garbage.pixel_array)
        frame = next(pydicom.encaps.generate_frames(garbage.PixelData, number_of_frames=1))
        garbage.PixelData = pydicom.encaps.encapsulate(
            [frame[:200] + os.urandom(5000) + b"\xff\xd9"])
        noise = variant()  # noise from its first byte: refused at the door
        noise.compress(JPEG2000Lossless, noise.pixel_array)
        noise.PixelData = pydicom.encaps.encapsulate([os.urandom(5000)])
        statuses = send([text_sr, bomb, truncated, bad_uid, noise, garbage], node.port)
        assert statuses[:5] == [0x0122, 0xA700, 0xA900, 0xA900, 0xA900], \
            [hex(s) for s in statuses]
        assert statuses[5] == 0x0000  # well-formed header and stream: accepted, quarantined
        wait_for(lambda: "serve: quarantined" in node.text(), 60,
                 "the undecodable image quarantined")
        reasons = [p.read_text() for p in (spool / "quarantine").glob("*.txt")]
        assert any("declared image 65535x65535" in r for r in reasons)
        assert any("pixel data truncated" in r for r in reasons)
        assert any("is not a UID" in r for r in reasons)
        assert any("cannot classify" in r and "cannot decode" in r for r in reasons)
        assert any("its JPEG 2000 stream does not start with its SOC and SIZ" in r
                   for r in reasons)
        # an image accepted (success went back) and not classified is answered: a report in
        # its study, no findings, saying why; /health counts them. Undecodable, colour, and
        # several frames (one at a time: the queue holds one)
        colour = variant()
        gray8 = (colour.pixel_array >> 4).astype(np.uint8)
        colour.PixelData = np.repeat(gray8[..., None], 3, axis=2).tobytes()
        colour.SamplesPerPixel, colour.PhotometricInterpretation = 3, "RGB"
        colour.PlanarConfiguration, colour.BitsAllocated, colour.BitsStored = 0, 8, 8
        colour.HighBit = 7
        frames = variant(NumberOfFrames=2)
        frames.PixelData = frames.PixelData * 2
        for n, ds in enumerate((colour, frames), 2):
            wait_for(lambda: not list((spool / "inbox").iterdir()), 60, "the inbox to empty")
            assert send([ds], node.port) == [0x0000]
            wait_for(lambda: len([d for d in pacs.instances("SR") if unclassified_reason(d)])
                     == n, 60, f"{n} no-result reports")
        answers = {evidence_uids(ds)[0]: ds for ds in pacs.instances("SR")
                   if unclassified_reason(ds)}
        for ds, why in ((garbage, "cannot decode"), (colour, "RGB DICOM"), (frames, "2 frames")):
            answer = answers[ds.SOPInstanceUID]
            findings, _, texts = sr_findings(answer)
            assert answer.StudyInstanceUID == ds.StudyInstanceUID and findings == {}
            reason = unclassified_reason(answer)
            assert reason.startswith("cannot classify") and why in reason, reason
            assert "RESEARCH USE ONLY" in texts["Intended use"]
            assert "trained on the bundled 200-image sample" in texts["Notice"]
        assert dicom_errors(need("dciodvfy"), answer, tmp_path / "answer.dcm") == []
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http}/health",
                                                   timeout=10).read())
        assert health["counters"]["unclassified_reported"] == 3
        bomb_kept = [p for p in (spool / "quarantine").glob("*.dcm")
                     if p.stat().st_size < 64 * 1024]  # its header, not 8 GiB
        assert bomb_kept
        for line in ("not a chest X-ray SOP class", "declared image", "pixel data truncated"):
            assert line in node.text()
        assert not [p for p in (spool / "quarantine").iterdir()
                    if "passwd" in p.name] and not Path("/etc/passwd.dcm").exists()
        # a full queue: 8 at once into a queue of 1 (each takes longer to classify than to send)
        burst = [variant() for _ in range(8)]
        statuses = send(burst, node.port)
        assert 0xA700 in statuses and 0x0000 in statuses
        assert "queue full" in node.text()
        # still serving
        wait_for(lambda: not list((spool / "inbox").iterdir()), 120, "the queue to drain")
        assert storescu(dx_files[2:3], node.port).returncode == 0
        want = uid_of(dx_files[2])
        wait_for(lambda: want in [sr_findings(s)[1] for s in pacs.instances("SR")], 120,
                 "the next image's report")
        assert node.proc.poll() is None
        assert "Traceback" not in node.text()
    finally:
        node.stop()


@pytest.mark.system
def test_tls(model_dir, dx_files, pacs, tmp_path):
    """--tls-cert/--tls-key/--tls-ca: a sender with a certificate the CA signed is served; a
    plain-TCP sender is not. --destination-tls-ca: the results reach a PACS that speaks DICOM
    TLS only (Orthanc with DicomTlsEnabled, checking the node's certificate)."""
    import ssl
    need("openssl")
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "node.pem", tmp_path / "node.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    # a CA and a TLS peer at once (Python >= 3.13 checks X.509 strictly)
                    "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    shutil.copy(cert, ca)  # self-signed: the node's certificate is its own CA, and the client's
    # one certificate for all three parties (its CN and SAN are 127.0.0.1)
    tls_pacs = node = None
    try:
        tls_pacs = Orthanc(tmp_path / "tls-pacs", pacs.node_port, DicomTlsEnabled=True,
                           DicomTlsCertificate=str(cert), DicomTlsPrivateKey=str(key),
                           DicomTlsTrustedCertificates=str(ca),
                           DicomTlsRemoteCertificateRequired=True)
        node = NodeProcess(model_dir, tmp_path / "spool", pacs, "--tls-cert", cert, "--tls-key",
                           key, "--tls-ca", ca, "--no-heatmaps", "--destination",
                           f"PACS@127.0.0.1:{tls_pacs.dicom}", "--destination-tls-ca", ca,
                           "--timeout", "5")
        import pydicom
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        context.load_cert_chain(cert, key)
        ds = pydicom.dcmread(dx_files[3])
        # a connection that never begins its handshake holds up nobody else; one that begins
        # it and stalls is closed at --timeout
        with socket.create_connection(("127.0.0.1", node.port), timeout=30):
            # nor do ten that send a whole first TLS record, then nothing: their handshakes
            # wait in the doorman, not in an association slot
            held = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(10)]
            for s in held:
                s.sendall(b"\x16\x03\x01\x00\x01\x01")
            assert send([ds], node.port, tls=(context, "127.0.0.1")) == [0x0000]
            for s in held:
                s.close()
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as stalled:
            stalled.sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes
            started = time.monotonic()
            try:  # closed by the node (its bytes unread: the close may be a reset)
                assert stalled.recv(100) == b""
            except ConnectionResetError:
                pass
            assert time.monotonic() - started < 15
        assert send([ds], node.port) is None  # no TLS: no association
        wait_for(lambda: len(tls_pacs.instances("SR")) == 1, 120, "the report over TLS")
        # the PACS itself takes no plain TCP, even from the AE title it knows
        assert send([ds], tls_pacs.dicom, aet=NODE_AE) is None
        assert not pacs.instances("SR")
    finally:
        for process in (node, tls_pacs):
            if process is not None:
                process.stop()


@pytest.mark.integration
def test_bad_settings_fail_with_one_line(model_dir, tmp_path):
    """Settings a user gets wrong: one line naming the flag or file, before listening."""
    port = str(free_port())
    base = ["serve.py", "--spool", tmp_path / "spool", "--port", port, "--host", "127.0.0.1"]
    ok = ["--allow-ae", "STORESCU", "--destination", "PACS@127.0.0.1:104"]
    assert_clean_error(run_script(*base, "--destination", "PACS@127.0.0.1:104", "--model-dir",
                                  model_dir), "--allow-ae")
    assert_clean_error(run_script(*base, "--allow-ae", "A", "--destination", "PACS:104",
                                  "--model-dir", model_dir), "--destination")
    assert_clean_error(run_script(*base, *ok, "--allow-ae", "WAY_TOO_LONG_AE_TITLE_X"), "--allow-ae")
    assert_clean_error(run_script(*base, *ok, "--model-dir", model_dir, "--no-heatmaps",
                                  "--uncompressed-heatmaps"), "--uncompressed-heatmaps")
    assert_clean_error(run_script(*base, *ok, "--model-dir", tmp_path / "none"), "chexnet.json")
    no_points = tmp_path / "no_points"
    shutil.copytree(model_dir, no_points)
    (no_points / "operating_points.json").unlink()
    assert_clean_error(run_script(*base, *ok, "--model-dir", no_points),
                       "no operating points", "--no-operating-points")
    assert_clean_error(run_script(*base, *ok, "--model-dir", model_dir, "--tls-cert",
                                  tmp_path / "missing.pem", "--tls-key", tmp_path / "k.pem"),
                       "--tls-cert")
    odd = tmp_path / "odd_names"  # a class name no DICOM report can carry
    shutil.copytree(model_dir, odd)
    meta = json.loads((odd / "chexnet.json").read_text())
    meta["class_names"][3] = "Nodule\nsecond line"
    (odd / "chexnet.json").write_text(json.dumps(meta))
    assert_clean_error(run_script(*base, *ok, "--model-dir", odd), "chexnet.json",
                       "control character")
    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    with open(damaged / "chexnet_int8.bin", "r+b") as f:
        f.write(b"\0" * 64)
    assert_clean_error(run_script(*base, *ok, "--model-dir", damaged), "chexnet_int8.bin")


@pytest.mark.system
def test_results_the_destination_refuses_go_to_failed(model_dir, dx_files, tmp_path):
    """A destination that answers but refuses a result (here every C-STORE, 0xA700): after 5
    refusals the result moves to SPOOL/failed/ with its reason instead of blocking the outbox."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    refusing = ae.start_server(("127.0.0.1", 0), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)])
    fake = type("Pacs", (), {"node_port": free_port(), "dicom": refusing.server_address[1]})
    spool = tmp_path / "spool"
    node = NodeProcess(model_dir, spool, fake, "--no-heatmaps")
    try:
        assert storescu(dx_files[5:6], node.port).returncode == 0
        uid = uid_of(dx_files[5])
        wait_for(lambda: (spool / "failed" / uid).is_dir(), 60, "the refused result in failed/")
        assert "0xA700" in (spool / "failed" / f"{uid}.txt").read_text()
        assert not any((spool / "outbox").iterdir())
        assert "refused 5 times" in node.text() and node.proc.poll() is None
    finally:
        node.stop()
        refusing.shutdown()


@pytest.mark.system
def test_results_reach_a_destination_that_takes_implicit_vr_only(model_dir, dx_files,
                                                                  tmp_path):
    """The node sends its result files as written (Explicit VR Little Endian, heatmaps JPEG
    Baseline) where the destination accepts that; one that accepts Implicit VR Little Endian
    only still gets the report (decoded, encoded again by pynetdicom), with its values, and each
    heatmap decompressed to RGB, still marked lossy, under the UID it was written with."""
    import io

    import pydicom
    from pydicom.uid import ImplicitVRLittleEndian
    stored = []

    def on_store(event):
        stored.append((event.context.transfer_syntax, event.encoded_dataset()))
        return 0x0000

    implicit, fake = destination({SR_CLASS: [ImplicitVRLittleEndian],
                                  SC_CLASS: [ImplicitVRLittleEndian]}, on_store)
    spool = tmp_path / "spool"
    node = NodeProcess(model_dir, spool, fake)
    try:
        assert storescu(dx_files[6:9], node.port).returncode == 0
        wait_for(lambda: all_sent(spool, 3), 120, "every result sent")
        received = [(syntax, pydicom.dcmread(io.BytesIO(data), force=True))
                    for syntax, data in stored]
        assert {syntax for syntax, _ in received} == {ImplicitVRLittleEndian}
        reports = [ds for _, ds in received if ds.Modality == "SR"]
        heatmaps = [ds for _, ds in received if ds.Modality != "SR"]
        assert len(reports) == 3
        expected = set()  # each positive finding's heatmap, under the UID the node derives
        sys.path.insert(0, str(REPO))
        from node.results import result_uid
        for sr in reports:
            findings, source, _ = sr_findings(sr)
            record = json.loads((spool / "done" / f"{source}.json").read_text())
            assert {row["finding"]: pytest.approx(row["probability"], abs=1e-12)
                    for row in record["findings"]} == {n: p for n, (p, _, _) in findings.items()}
            expected |= {result_uid(source, record["model"], f"sc-{row['finding']}",
                                    "1.2.826.0.1.3680043.8.498.")
                         for row in record["findings"] if row["decision"] == "positive"}
        # (not a new UID made while decompressing: a resend must replace, not add)
        assert expected and {str(sc.SOPInstanceUID) for sc in heatmaps} == expected
        for sc in heatmaps:
            assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
            assert sc.LossyImageCompression == "01"
            assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
        assert "does not accept JPEG Baseline" in node.text()  # the cost, said once
    finally:
        node.stop()
        implicit.shutdown()


@pytest.mark.system
@pytest.mark.parametrize("failure", ["abort", "status"])
def test_a_destination_that_fails_on_jpeg_gets_the_heatmaps_decompressed(model_dir, dx_files,
                                                                         tmp_path, failure):
    """A destination that accepts JPEG Baseline at association but aborts (or answers 0xC000)
    on a JPEG object, and also accepts uncompressed: the node says so once and sends every
    heatmap decompressed; every report and heatmap arrives, none in failed/."""
    import io

    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
    stored = []

    def on_store(event):
        if event.context.transfer_syntax == JPEGBaseline8Bit:
            if failure == "abort":
                event.assoc.abort()
            return 0xC000
        stored.append(pydicom.dcmread(io.BytesIO(event.encoded_dataset()), force=True))
        return 0x0000

    picky, fake = destination({SR_CLASS: [ExplicitVRLittleEndian],
                               SC_CLASS: [JPEGBaseline8Bit, ExplicitVRLittleEndian]}, on_store)
    spool = tmp_path / "spool"
    node = NodeProcess(model_dir, spool, fake)
    try:
        assert storescu(dx_files[9:12], node.port).returncode == 0
        wait_for(lambda: all_sent(spool, 3), 120, "every result sent")
        positives = sum(row["decision"] == "positive"
                        for record in (spool / "done").glob("*.json")
                        for row in json.loads(record.read_text())["findings"])
        heatmaps = [ds for ds in stored if ds.Modality != "SR"]
        assert len(stored) - len(heatmaps) == 3 and len(heatmaps) == positives > 0
        assert all(ds.PhotometricInterpretation == "RGB" for ds in heatmaps)
        assert not (spool / "failed").exists() or not any((spool / "failed").iterdir())
        assert node.text().count("failed a JPEG heatmap") == 1
    finally:
        node.stop()
        picky.shutdown()


@pytest.mark.system
def test_a_destination_without_secondary_capture_is_named_once(model_dir, dx_files, tmp_path):
    """A destination that stores reports but no Secondary Capture: the reports arrive, the log
    says once that heatmaps cannot be sent (they go to failed/ after their refusals)."""
    from pydicom.uid import ExplicitVRLittleEndian
    stored = []
    reports_only, fake = destination(
        {SR_CLASS: [ExplicitVRLittleEndian]},
        lambda event: stored.append(event.request.AffectedSOPInstanceUID) or 0x0000)
    node = NodeProcess(model_dir, tmp_path / "spool", fake)
    try:
        assert storescu(dx_files[12:14], node.port).returncode == 0
        wait_for(lambda: len(stored) == 2, 120, "both reports")
        wait_for(lambda: "accepts no Secondary Capture" in node.text(), 30, "the warning")
        assert node.text().count("accepts no Secondary Capture") == 1
    finally:
        node.stop()
        reports_only.shutdown()


@pytest.mark.system
def test_a_burst_goes_over_few_associations_each_released(model_dir, dx_files, tmp_path):
    """A burst's results, which come one at a time, go over one association per sending
    association while images are waiting, not one association each (a negotiation each, and
    in DCMTK's storescp a process each). Each is released: when nothing is left to classify,
    and when the node stops while one is open."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import evt
    reports = []
    events = {"established": [], "released": [], "aborted": []}
    server, fake = destination(
        {SR_CLASS: [ExplicitVRLittleEndian]},
        lambda event: reports.append(event.request.AffectedSOPInstanceUID) or 0x0000)
    for name, event in (("established", evt.EVT_ESTABLISHED), ("released", evt.EVT_RELEASED),
                        ("aborted", evt.EVT_ABORTED)):
        server.bind(event, lambda e, name=name: events[name].append(e.assoc))
    spool = tmp_path / "spool"
    node = NodeProcess(model_dir, spool, fake, "--no-heatmaps")
    try:
        assert storescu(dx_files[:8], node.port).returncode == 0
        wait_for(lambda: all_sent(spool, 8), 120, "the first burst's results")
        wait_for(lambda: len(events["released"]) == len(events["established"]), 10,
                 "the associations released when nothing was left")
        # two sending associations (--send-associations 2)
        assert len(events["established"]) <= 2, events
        sender = subprocess.Popen([need("storescu"), "-aet", "STORESCU", "-aec", NODE_AE,
                                   "127.0.0.1", str(node.port), *map(str, dx_files[8:16])],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: len(reports) >= 10, 120, "the second burst's first results")
        node.stop()  # images still waiting: an association is open
        sender.wait(60)
        wait_for(lambda: len(events["released"]) == len(events["established"]), 15,
                 "the associations released when the node stopped")
        assert not events["aborted"], node.text()
    finally:
        node.stop()
        server.shutdown()


@pytest.mark.system
def test_two_nodes_on_one_spool_refused(model_dir, tmp_path):
    """A second node on the same spool would process the same inbox twice: refused."""
    from common import exclusive_lock  # the lock a running node holds (POSIX, not flock)
    spool = tmp_path / "spool"
    spool.mkdir()
    with exclusive_lock(spool / ".lock", "another serve.py", "wait"):
        proc = run_script("serve.py", "--spool", spool, "--allow-ae", "A", "--destination",
                          "PACS@127.0.0.1:104", "--model-dir", model_dir, "--port",
                          str(free_port()), "--host", "127.0.0.1", timeout=120)
    assert_clean_error(proc, "in use by another serve.py", "--spool")


def test_done_records_pruned_by_age(tmp_path):
    """--keep-done-days: records older than that go, younger ones stay."""
    from node.spool import Spool
    spool = Spool(tmp_path / "spool")
    old, young = spool.done / "1.2.3.json", spool.done / "1.2.4.json"
    for path in (old, young):
        path.write_text("{}\n")
    then = time.time() - 3 * 86400
    os.utime(old, (then, then))
    assert spool.prune_done(2) == 1
    assert not old.exists() and young.exists() and not spool.is_done("1.2.3")


def test_outbox_listing_skips_a_result_sent_meanwhile(tmp_path, monkeypatch):
    """The sending associations and GET /health list the outbox while another association
    removes a folder it sent: the listing skips it, it never fails (a sending thread died of
    that once, and its share of the results waited forever)."""
    from node.spool import Spool
    spool = Spool(tmp_path / "spool")
    for uid in ("1.2.3", "1.2.4", "1.2.5"):
        (spool.outbox / uid).mkdir()
    real_stat = Path.stat

    def stat(self, *a, **k):
        if self.name == "1.2.4":  # listed, then sent and removed before its time is read
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_stat(self, *a, **k)

    monkeypatch.setattr(Path, "stat", stat)
    assert [p.name for p in spool.pending_results()] == ["1.2.3", "1.2.5"]


def stop_own_process(crash, seconds=0.0):
    """A task for node.workers.Workers: sleeps, then kills its own process (as a decoder's crash
    would) or returns its process id."""
    time.sleep(seconds)
    if crash:
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def divide(a, b):
    """A task for node.workers.Workers, its errors handled as in_worker's tasks' are."""
    from node.workers import in_worker
    return in_worker(lambda: a / b)()


@pytest.mark.system
def test_a_task_that_kills_its_worker_is_singled_out_the_others_finish(tmp_path):
    """A worker process that dies (a crash in a decoder) takes every running task of the pool
    with it: each is tried again alone; the one that kills its process again is reported
    (WorkerDied: the node quarantines its image), the others' results come back, and the
    pool works on."""
    import threading

    from node.dicom import VERSION
    from node.workers import Stopping, WorkerDied, Workers
    identity = {"name": "test", "mode": "int8", "files": {}, "sha256": "0" * 64,
                "exported": None, "version": VERSION, "runtime": "none", "classes": ["A"]}
    workers = Workers(2, {"spool": str(tmp_path / "spool"), "identity": identity,
                          "points_note": "none", "uid_root": "1.2.3.", "resize": 256,
                          "crop": 224, "heatmaps": False, "log_level": "WARNING"})
    try:
        first = set()
        for _ in range(4):
            first.add(workers.run(stop_own_process, False))
        bystander = {}
        thread = threading.Thread(target=lambda: bystander.update(
            pid=workers.run(stop_own_process, False, 2.0)))
        thread.start()
        time.sleep(0.5)  # the bystander is running in the other process
        with pytest.raises(WorkerDied):
            workers.run(stop_own_process, True)
        thread.join(60)
        assert bystander["pid"] not in first  # tried again in a new process, and finished
        assert workers.run(stop_own_process, False) not in first  # a new pool
        with pytest.raises(RuntimeError, match="ZeroDivisionError: division by zero"):
            workers.run(divide, 1, 0)  # a task's own error comes back, the pool stays
        assert workers.run(divide, 6, 3) == 2
        workers.TASK_SECONDS = 3  # a task that hangs: stopped, tried alone, hangs again
        started = time.monotonic()
        with pytest.raises(WorkerDied):
            workers.run(stop_own_process, False, 60)
        assert time.monotonic() - started < 30
        assert workers.run(divide, 6, 3) == 2  # and the pool works on
    finally:
        workers.shutdown()
    with pytest.raises(Stopping):  # the node is stopping: nothing starts (its image waits)
        workers.run(stop_own_process, False)


def worker_processes(node):
    """The node's worker processes (multiprocessing's spawned children, not its tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if parent == node.proc.pid and "spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.system
def test_a_worker_killed_during_a_burst_loses_nothing(model_dir, dx_files, pacs, tmp_path):
    """kill -9 of a worker process (decoding, building results) while a burst is processed:
    its tasks are done again in new processes; every image has one report at the PACS,
    nothing is quarantined, and the node serves on."""
    spool = tmp_path / "spool"
    node = NodeProcess(model_dir, spool, pacs, "--no-heatmaps", "--workers", "1",
                       "--result-workers", "2")
    try:
        workers = worker_processes(node)
        assert len(workers) == 3
        burst = subprocess.Popen([need("storescu"), "-aet", "STORESCU", "-aec", NODE_AE,
                                  "127.0.0.1", str(node.port), *map(str, dx_files)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: "classified" in node.text(), 120, "a first image classified",
                 every=0.02)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        assert burst.wait(120) == 0
        wait_for(lambda: len(pacs.instances("SR")) == len(dx_files), 180,
                 "every image's report at the PACS")
        reports = [sr_findings(sr)[1] for sr in pacs.instances("SR")]
        assert sorted(reports) == sorted(uid_of(f) for f in dx_files)
        assert "a worker process stopped" in node.text()
        assert not list((spool / "quarantine").iterdir())
        assert node.proc.poll() is None and "Traceback" not in node.text()
        assert set(worker_processes(node)).isdisjoint(workers)
    finally:
        node.stop()
