"""The DICOM node under attack (issue 31), with real parts: each class of failure a hostile
round found, at the mechanism that owns it.

    class                                         mechanism                                   test
    a stream declaring 65500x65500 (15 GB)        node.checks.image_problem -> images.pixel_data_problem  test_hostile_objects_*
    a decoder that ignores the check anyway       node.workers.limit_memory (RLIMIT_AS in each worker)  test_a_worker_*
    a worker outliving the node                   node.workers.die_with_parent, Workers' spawner thread  test_workers_die_*
    a truncated stream classified                 codestreams.frame_problem (end marker)            test_hostile_objects_*
    a deflate bomb parsed in the node             node.checks.read_dataset -> codestreams.inflated_problem test_hostile_objects_*
    a full disk losing an accepted image          Spool (SpoolError), Node._later                   test_a_full_disk_*
    idle sockets holding every slot               node.network.Doorman, _recv's A-ASSOCIATE deadline  test_idle_connections_*
    HTTP lengths and the bearer scheme            node.http.body_length, start_http.authorised      test_http_*
    words: called AE, /health, a missing package  on_rejected (the RJ sent), Node.trouble, optional  test_*_words_*
    a de-identified image without type 2          node.results.with_type2                           test_hostile_objects_*
    an 8-bit image without VOI read as stored     images._stored_range                              test_hostile_objects_*
"""
import base64
import json
import struct
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from dicom_files import (compressed_dicom, declare_size, deflate_bomb, dx_file, sr_findings,
                         write_dicom)
from test_serve import (NODE_AE, NO_TORCH, SR_CLASS, SC_CLASS, NodeProcess,  # noqa: F401
                        dx_files, free_port, model_dir, uid_of, wait_for)


JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def as_dx(path, study):
    """A file of dicom_files' made a DX for presentation of `study` (the node takes CR/DX)."""
    import pydicom
    from pydicom.uid import generate_uid
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientName, ds.PatientID = "Test^Hostile", "H1"
    ds.save_as(path, enforce_file_format=True)
    return path


def send_files(paths, port, aet="SENDER", called=NODE_AE):
    """pynetdicom sending files as they are on disk (their own transfer syntax, not parsed
    and encoded again): the C-STORE status of each, or None where not associated."""
    import pydicom
    from pynetdicom import AE
    ae = AE(ae_title=aet)
    for path in paths:
        meta = pydicom.filereader.read_file_meta_info(path)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        return [getattr(assoc.send_c_store(path), "Status", None) for path in paths]
    finally:
        assoc.release()


def node_cpu_seconds(node):
    """The node process's CPU time so far (user + system), seconds."""
    fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def closed_by_node(sock, timeout=15):
    """Whether the node closed this connection (an end of file; a reset where bytes it had
    not read were waiting)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def http(port, path, body=None, headers=None, method=None):
    """(status, parsed JSON) of a request to the node's HTTP endpoint."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def raw_http(port, head):
    """The status line of a hand-written HTTP request (lengths urllib would not send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        return s.recv(65536).decode(errors="replace").split("\r\n", 1)[0]


class Destination:
    """A destination of pynetdicom's that stores what it is sent, on a port chosen now and
    started later (start()), so that the node can first find it down."""

    def __init__(self):
        self.port = free_port()
        self.received, self.server = [], None

    def start(self):
        from pynetdicom import AE, evt
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        ae = AE(ae_title="PACS")
        for sop_class in (SR_CLASS, SC_CLASS):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                                 JPEG_BASELINE])

        def on_store(event):
            self.received.append(event.dataset)
            return 0x0000
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def reports(self):
        return {sr_findings(ds)[1]: sr_findings(ds)[0] for ds in self.received
                if ds.SOPClassUID == SR_CLASS}

    def stop(self):
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def down_destination():
    dest = Destination()
    yield dest
    dest.stop()


def pacs_of(dest):
    return type("Pacs", (), {"node_port": free_port(), "dicom": dest.port})


# ---------------------------------------------------------------------------------------------

@pytest.mark.system
def test_hostile_objects_are_refused_at_the_door_and_every_real_one_answered(
        model_dir, nih_images, down_destination, tmp_path):
    """One node, a destination down at first:
    - a JPEG Baseline DX whose stream declares 65500x65500 (122 KB, 15 GB decoded): 0xA900
      at C-STORE, quarantined with the reason, no worker grows;
    - a JPEG stream cut short (its rows below the cut decoded as flat grey): 0xA900;
    - a deflated data set that inflates to 512 MiB: 0xC000 from the first 64 KiB, quarantined;
    - a de-identified DX without any type 2 attribute, one with values the standard does not
      allow (sex 'U', a date '2026-01-01', two patient names), one with a Study ID sent as US
      and a name as OB: accepted, and their reports arrive (the values left empty, one name,
      the right VRs);
    - an 8-bit MONOCHROME2 DX without VOI and its PNG: the same probabilities (/predict);
    - GET /health: "degraded" with the destination's failure while it is down, "ok" after."""
    import pydicom
    from pydicom.uid import generate_uid
    image_dir, _ = nih_images
    png = sorted(image_dir.glob("*.png"))[3]
    study = generate_uid()
    work = tmp_path / "files"
    work.mkdir()
    bomb = as_dx(compressed_dicom(png, work / "bomb.dcm", JPEG_BASELINE,
                                  lambda f: declare_size(f, 65500, 65500)), study)
    cut = as_dx(compressed_dicom(png, work / "cut.dcm", JPEG_BASELINE,
                                 lambda f: f[:len(f) * 2 // 3]), study)
    deflated = deflate_bomb(work / "deflated.dcm")
    bare = dx_file(png, work / "bare.dcm", study, generate_uid(), 1)
    ds = pydicom.dcmread(bare)
    for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
                    "AccessionNumber", "PatientName", "PatientID", "ReferringPhysicianName"):
        delattr(ds, keyword)
    ds.save_as(bare, enforce_file_format=True)
    eight = as_dx(write_dicom(png, work / "eight.dcm", "no_voi"), study)
    odd = dx_file(png, work / "odd.dcm", study, generate_uid(), 2)  # values real images hold
    ds = pydicom.dcmread(odd)
    ds.PatientSex, ds.StudyDate, ds.StudyTime, ds.PatientBirthDate = "U", "2026-01-01", "25:61", "1950"
    ds.PatientName, ds.AccessionNumber = ["Doe^John", "Roe^Jane"], "A" * 20
    ds.save_as(odd, enforce_file_format=True)
    wrong_vr = dx_file(png, work / "vr.dcm", study, generate_uid(), 3)  # the VRs of a sloppy
    ds = pydicom.dcmread(wrong_vr)  # writer: pydicom wrote them back, or failed to
    del ds.StudyID, ds.ReferringPhysicianName
    ds.add_new(0x00200010, "US", 1)  # Study ID
    ds.add_new(0x00080090, "OB", b"Dr^Who")  # Referring Physician's Name
    ds.save_as(wrong_vr, enforce_file_format=True)
    assert "WindowCenter" not in pydicom.dcmread(eight) and pydicom.dcmread(eight).BitsStored == 8

    spool = tmp_path / "spool"
    http_port = free_port()
    node = NodeProcess(model_dir, spool, pacs_of(down_destination), "--http-port", http_port,
                       "--retry-max-seconds", "0.5")
    try:
        statuses = send_files([bomb, cut, deflated, bare, eight, odd, wrong_vr], node.port)
        assert statuses[:3] == [0xA900, 0xA900, 0xC000], [hex(s or 0) for s in statuses]
        assert statuses[3:] == [0, 0, 0, 0]
        reasons = "".join(p.read_text() for p in (spool / "quarantine").glob("*.txt"))
        assert "its JPEG stream declares 65500x65500 with 1 component(s), the DICOM header " \
               "1024x1024" in reasons, reasons
        assert "its JPEG stream is truncated" in reasons
        assert "its deflated data set inflates to over 144 MiB" in reasons
        assert (spool / "quarantine").stat() and max(
            p.stat().st_size for p in (spool / "quarantine").iterdir()) <= 2 ** 20 + 65536
        # the destination is down: results wait, and /health says so
        wait_for(lambda: http(http_port, "/health")[1]["status"] == "degraded", 60,
                 "/health to say degraded")
        health = http(http_port, "/health")[1]
        assert "destination" in health["problems"], health
        assert "association not accepted" in health["problems"]["destination"]["reason"]
        # the same picture, as the 8-bit DICOM and as its PNG: the same probabilities
        from_dicom = http(http_port, "/predict", eight.read_bytes())
        from_png = http(http_port, "/predict", png.read_bytes())
        assert from_dicom[0] == from_png[0] == 200, (from_dicom, from_png)
        assert [f["probability"] for f in from_dicom[1]["findings"]] == \
            [f["probability"] for f in from_png[1]["findings"]]
        down_destination.start()
        wait_for(lambda: len(down_destination.reports()) == 4, 120, "the four reports")
        assert set(down_destination.reports()) == {uid_of(bare), uid_of(eight), uid_of(odd),
                                                   uid_of(wrong_vr)}
        vr_report = next(ds for ds in down_destination.received if ds.SOPClassUID == SR_CLASS
                         and sr_findings(ds)[1] == uid_of(wrong_vr))
        assert vr_report["StudyID"].VR == "SH" and vr_report.StudyID == "1"
        assert vr_report["ReferringPhysicianName"].VR == "PN"
        odd_report = next(ds for ds in down_destination.received
                          if ds.SOPClassUID == SR_CLASS and sr_findings(ds)[1] == uid_of(odd))
        assert (odd_report.PatientSex, odd_report.StudyDate, odd_report.StudyTime) == ("", "", "")
        assert str(odd_report.PatientName) == "Doe^John" and odd_report.AccessionNumber == ""
        assert "values the standard does not allow, as the results carry them" in node.text()
        wait_for(lambda: http(http_port, "/health")[1]["status"] == "ok", 30, "/health ok")
        assert "Traceback" not in node.text(), node.text()
    finally:
        node.stop()


@pytest.mark.system
def test_idle_connections_lock_no_sender_out_and_words_are_right(model_dir, dx_files,
                                                                 down_destination, tmp_path):
    """20 TCP connections that send nothing held every association slot (8) until --timeout,
    and so did connections that reset, closed or sent one byte: now a connection takes a slot
    only once its whole A-ASSOCIATE-RQ is there, so the allowed sender is served while they
    are open; those silent or unfinished for 5 s are closed, as is one that drips its request,
    and one that declares a 4 MiB request at once. A wrong called AE title is logged as such
    (it was logged as 'more than --max-associations')."""
    down_destination.start()
    node = NodeProcess(model_dir, tmp_path / "spool", pacs_of(down_destination), "--no-heatmaps",
                       "--max-associations", "8")
    idle = []
    try:
        for _ in range(20):
            idle.append(socket.create_connection(("127.0.0.1", node.port)))
        # and connections that reset at once, close at once, send one byte, or a whole request
        # of garbage: before, each took a slot for --timeout (9 resets every 30 s kept every
        # sender out), the garbage one for 5 s with a traceback in the log
        for how in ("reset", "close", "byte", "garbage") * 4:
            s = socket.create_connection(("127.0.0.1", node.port))
            if how == "reset":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            elif how == "close":
                s.close()
            elif how == "garbage":
                s.sendall(b"\x01\x00\x00\x00\x00\x44" + bytes(68))
                idle.append(s)
            else:
                s.sendall(b"\x01")
                idle.append(s)
        stalled = socket.create_connection(("127.0.0.1", node.port))
        stalled.sendall(b"\x01\x00\x00\x00")  # the first bytes of an A-ASSOCIATE-RQ
        # an A-ASSOCIATE-RQ of 100 KB begun and dripped: closed 5 s after its first byte
        dripping = socket.create_connection(("127.0.0.1", node.port))
        dripping.sendall(b"\x01\x00\x00\x01\x90\x00" + b"\0" * 100)
        # one declaring 4 MiB (a real one is a few KB): closed at once, nothing of it held
        huge = socket.create_connection(("127.0.0.1", node.port))
        huge.sendall(b"\x01\x00\x00\x40\x00\x00" + b"\0" * 100)
        assert closed_by_node(huge)
        for _ in range(150):  # requests begun: the kernel wakes the doorman when they are whole
            s = socket.create_connection(("127.0.0.1", node.port))
            s.sendall(b"\x01\x00\x00\x00\x03\xe8" + bytes(100))
            idle.append(s)
        time.sleep(1.0)
        cpu = node_cpu_seconds(node)
        time.sleep(3.0)  # they cost the node no CPU to speak of (polled, they took 30%)
        assert node_cpu_seconds(node) - cpu < 0.4
        started = time.monotonic()
        assert send_files(dx_files[:1], node.port) == [0]
        assert time.monotonic() - started < 10
        wait_for(lambda: len(down_destination.reports()) == 1, 60, "the report")
        # the idle ones are closed by the node (a read returns end of file)
        dripped_for = time.monotonic()
        dripping.settimeout(0.5)
        while time.monotonic() - dripped_for < 15:  # a byte each 0.5 s, until it is closed
            try:
                dripping.sendall(b"\0")
                if dripping.recv(10) == b"":
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        assert time.monotonic() - dripped_for < 8
        for s in idle + [stalled]:
            assert closed_by_node(s)
        # one line for them all (at most one each 10 s), each reason counted
        for reason in ("no whole request within 5 s", "connection closed before association",
                       "an association request over the size the node accepts",
                       "a malformed A-ASSOCIATE-RQ (ValueError)"):
            wait_for(lambda: f"connection(s): {reason}" in node.text(), 20, reason)
        assert send_files(dx_files[1:2], node.port, called="WRONG") is None
        wait_for(lambda: "called AE title 'WRONG' is not 'CHEXNET'" in node.text(), 10,
                 "the refusal's words")
        assert "more than --max-associations" not in node.text()
        assert "Traceback" not in node.text() and "the doorman failed" not in node.text()
    finally:
        for s in idle:
            s.close()
        node.stop()


@pytest.mark.system
def test_http_lengths_are_parsed_strictly_and_the_bearer_scheme_in_any_case(
        model_dir, down_destination, tmp_path):
    """Content-Length: -1 read the body to the end of the connection (300 MiB held, past
    --max-image-mb), a negative length dropped the connection with a traceback, "bearer"
    got 401, a body dripped slowly held a slot for good. Now: 400 for a length that is not
    digits, 413 over the limit before any of it is read, 411 without one, 408 for a body too
    slow; the scheme in any case."""
    down_destination.start()
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    http_port = free_port()
    node = NodeProcess(model_dir, tmp_path / "spool", pacs_of(down_destination), "--no-heatmaps",
                       "--http-port", http_port, "--http-token-file", token,
                       "--max-image-mb", "8", "--timeout", "3")
    try:
        auth = b"Authorization: Bearer s3cret\r\n"
        for length, status in ((b"-1", "400"), (b"abc", "400"), (b"+5", "400"),
                               (b"314572800", "413"), (b"1, 2", "400")):
            line = raw_http(http_port, b"POST /predict HTTP/1.1\r\nHost: x\r\n" + auth
                            + b"Content-Length: " + length + b"\r\n\r\n")
            assert line.split()[1] == status, (length, line)
        line = raw_http(http_port, b"POST /predict HTTP/1.1\r\nHost: x\r\n" + auth
                        + b"Transfer-Encoding: chunked\r\n\r\n")
        assert line.split()[1] == "411", line
        for scheme in ("bearer", "BEARER", "Bearer"):
            assert http(http_port, "/health", headers={
                "Authorization": f"{scheme} s3cret"})[0] == 200
        assert http(http_port, "/health", headers={"Authorization": "Basic " + base64.b64encode(
            b"s3cret").decode()})[0] == 401
        assert "Traceback" not in node.text(), node.text()
        assert "POST /predict refused (400): Content-Length '-1' is not one length" in node.text()
        # a body dripped a byte now and then held a /predict slot for good: now 408 after
        # --timeout (3 s) plus its length at 64 KB/s
        with socket.create_connection(("127.0.0.1", http_port), timeout=30) as slow:
            slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n" + auth
                         + b"Content-Length: 100000\r\n\r\nxx")
            started = time.monotonic()
            for _ in range(20):
                time.sleep(0.5)
                try:
                    slow.sendall(b"x")
                except OSError:
                    break
            slow.settimeout(30)
            answer = slow.recv(65536).decode(errors="replace")
        assert answer.split()[1] == "408", answer
        assert time.monotonic() - started < 12
    finally:
        node.stop()


@pytest.mark.system
def test_a_full_disk_loses_no_accepted_image(model_dir, dx_files, down_destination, tmp_path):
    """The spool on a small file system (tmpfs), nearly full: the image is accepted (it fits),
    its results do not (ENOSPC), nor would its quarantine entry. It used to be removed from
    the inbox with no record, no quarantine entry and no report, after the sender was told
    success. Now it stays in the inbox, no staging folder is left, GET /health says why, and
    once space is freed its report arrives and it is recorded done."""
    down_destination.start()
    mount = small_disk(tmp_path / "small", "8m")
    http_port = free_port()
    node = None
    try:
        spool = mount / "spool"
        node = NodeProcess(model_dir, spool, pacs_of(down_destination), "--http-port", http_port,
                           "--retry-seconds", "0.5", "--retry-max-seconds", "1")
        image = dx_files[0]
        # fill the file system, leaving room for the image (written aside, then renamed) and
        # a few KB: not for its report, nor for a copy of it in the quarantine
        ballast = mount / "ballast"
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        ballast.write_bytes(b"\0" * (free - image.stat().st_size - 8192))
        assert send_files([image], node.port) == [0]
        uid = uid_of(image)
        wait_for(lambda: "cannot write to the spool for" in node.text(), 60, "the spool error")
        time.sleep(2)  # retried meanwhile, and failed again
        assert (spool / "inbox" / f"{uid}.dcm").is_file()
        assert not list((spool / "outbox").iterdir()), list((spool / "outbox").iterdir())
        assert not list((spool / "done").iterdir())
        assert not list((spool / "quarantine").glob("*.dcm"))
        health = http(http_port, "/health")[1]
        assert health["status"] == "degraded" and "spool" in health["problems"], health
        assert "No space left on device" in health["problems"]["spool"]["reason"]
        ballast.unlink()
        wait_for(lambda: uid in down_destination.reports(), 60, "the report, once space is free")
        wait_for(lambda: (spool / "done" / f"{uid}.json").is_file()
                 and not (spool / "inbox" / f"{uid}.dcm").exists(), 30, "the done record")
        wait_for(lambda: http(http_port, "/health")[1]["status"] == "ok", 30, "/health ok")
        assert "Traceback" not in node.text(), node.text()
    finally:
        if node is not None:
            node.stop()
        subprocess.run(["umount", "-l", str(mount)])


def small_disk(path, size):
    """A tmpfs of `size` mounted at path (made), or the test skipped (failed under CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                       str(path)]).returncode:
        if os.environ.get("CI"):
            pytest.fail("cannot mount a tmpfs for the full-disk test")
        pytest.skip("cannot mount a tmpfs here")
    return path


@pytest.mark.system
def test_results_are_sent_once_while_their_record_cannot_be_written(model_dir, dx_files,
                                                                    down_destination, tmp_path):
    """done/ full (its own small file system), the rest of the spool not: the results were
    written and sent, then the record failed, and the whole image was tried again: its
    results built and sent to the PACS again every few seconds for as long as done/ was
    full. Now only the record is tried again; the PACS gets each result once."""
    down_destination.start()
    spool = tmp_path / "spool"
    done = small_disk(spool / "done", "64k")
    try:
        ballast = done / "ballast.bin"  # not a dot file: the node removes those at start
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
        try:  # to the brim
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        http_port = free_port()
        node = NodeProcess(model_dir, spool, pacs_of(down_destination), "--no-heatmaps",
                           "--retry-seconds", "0.3", "--retry-max-seconds", "0.5",
                           "--http-port", http_port)
        try:
            assert send_files(dx_files[:1], node.port) == [0]
            uid = uid_of(dx_files[0])
            wait_for(lambda: uid in down_destination.reports(), 60, "the report")
            wait_for(lambda: node.text().count("cannot write to the spool") >= 3, 30,
                     "the record tried again")
            assert len(down_destination.received) == 1  # sent once, not once per try
            assert (spool / "inbox" / f"{uid}.dcm").is_file()
            for _ in range(3):  # degraded, however much room the spool's own disk has
                health = http(http_port, "/health")[1]
                assert health["status"] == "degraded" and "spool" in health["problems"], health
                time.sleep(0.5)
            ballast.unlink()
            wait_for(lambda: (done / f"{uid}.json").is_file(), 30, "the done record")
            wait_for(lambda: not (spool / "inbox" / f"{uid}.dcm").exists(), 30,
                     "the inbox emptied")
            wait_for(lambda: "recorded done (its results were written before)" in node.text(),
                     10, "the record's log line")
            assert len(down_destination.received) == 1
            assert "Traceback" not in node.text(), node.text()
        finally:
            node.stop()
    finally:
        subprocess.run(["umount", "-l", str(done)])


def test_an_error_building_a_result_is_no_full_disk(tmp_path):
    """pydicom's writer raises OSError for a value it cannot encode: that was taken for a full
    spool, and the image retried forever with /health 'ok'. Now it is the results' error
    (quarantined with the reason); nothing of them is left in the outbox."""
    from node.dicom import ResultsError, SpoolError
    from node.spool import Spool

    def files():
        yield "0-sr.dcm", b"report"
        raise OSError("(0020,0010) Study ID US: '1'")
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ResultsError, match="Study ID US") as e:
        spool.put_results("1.2.3", files())
    assert not isinstance(e.value, SpoolError) and not list(spool.outbox.iterdir())


@pytest.mark.integration
def test_serve_without_a_dicom_package_is_one_line(tmp_path):
    """The edge docs promise one line naming what to install; it was a traceback."""
    code = NO_TORCH.replace('("torch", "torchvision", "nncf")',
                            '("torch", "torchvision", "nncf", "pynetdicom")')
    proc = subprocess.run([sys.executable, "-c", code, "serve.py", "--spool", str(tmp_path),
                           "--allow-any-ae", "--destination", "PACS@127.0.0.1:104"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith(
        "error: the DICOM node (serve.py) needs the pynetdicom package"), line
    assert line.endswith(": pip install -r requirements-edge.txt"), line


# ---------------------------------------------------------------------------------------------
# The worker processes: bounded memory, and none outlives the node

def allocate(gigabytes):
    """A task for node.workers.Workers that allocates (and touches) this much, as a decoder misled
    by a stream's declared size would."""
    from node.workers import in_worker
    return in_worker(lambda: np.ones(int(gigabytes * 2 ** 30), np.uint8).sum())()


def address_space():
    """A task: (this worker's peak address space, its limit), bytes."""
    import resource
    status = Path("/proc/self/status").read_text()
    peak = int(status.split("VmPeak:")[1].split()[0]) * 1024
    return peak, resource.getrlimit(resource.RLIMIT_AS)[0]


def worker_settings(tmp_path, memory_mb):
    from node.dicom import VERSION
    identity = {"name": "test", "mode": "int8", "files": {}, "sha256": "0" * 64,
                "exported": None, "version": VERSION, "runtime": "none", "classes": ["A"]}
    return {"spool": str(tmp_path / "spool"), "identity": identity, "points_note": "none",
            "uid_root": "1.2.3.", "resize": 256, "crop": 224, "heatmaps": False,
            "log_level": "WARNING", "memory_bytes": memory_mb * 2 ** 20,
            "stand_in_findings": [{"finding": "A", "probability": 0.5, "threshold": None,
                                   "decision": None}]}


@pytest.mark.system
@pytest.mark.parametrize("syntax", [JPEG_BASELINE, "1.2.840.10008.1.2.1"])
def test_the_largest_image_and_its_heatmaps_fit_the_default_limit(syntax, tmp_path, nih_images):
    """An 8192x8192 16-bit DX, the largest --max-image-mb allows (128 MiB of pixels), decoded
    and given its report and three heatmaps at its own resolution (JPEG, or uncompressed:
    192 MB each, written one at a time) in worker processes under the default limit (2048 + 8
    x 128 MB): the limit stops a runaway, not a real image."""
    import pydicom
    from PIL import Image

    from node.checks import read_dataset
    from node.dicom import DX_PRESENTATION
    from node.spool import Spool
    from node.workers import Workers, decode_in_worker, results_in_worker
    image_dir, _ = nih_images
    png = sorted(image_dir.glob("*.png"))[0]
    path = dx_file(png, tmp_path / "small.dcm", "1.2.3.4", "1.2.3.5", 1)
    ds = pydicom.dcmread(path)
    big = np.asarray(Image.open(png).convert("L").resize((8192, 8192)), np.uint16) * 16
    ds.Rows, ds.Columns, ds.PixelData = 8192, 8192, big.tobytes()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_PRESENTATION
    spool = Spool(tmp_path / "spool")
    uid = str(ds.SOPInstanceUID)
    ds.save_as(spool.image(uid), enforce_file_format=True)
    del big, ds
    settings = worker_settings(tmp_path, 2048 + 8 * 128)
    classes = ["A", "B", "C", "D"]
    settings.update(heatmaps=True, heatmap_syntax=syntax,
                    identity={**settings["identity"], "classes": classes},
                    stand_in_findings=[{"finding": c, "probability": 0.5, "threshold": 0.5,
                                        "decision": "positive"} for c in classes])
    workers = Workers(1, settings)
    try:
        gray, source = workers.run(decode_in_worker, str(spool.image(uid)))
        assert gray.shape == (10, 224, 224)
        findings = [{"finding": c, "probability": 0.9, "threshold": 0.5,
                     "decision": "positive"} for c in classes[:3]] + [
            {"finding": "D", "probability": 0.1, "threshold": 0.5, "decision": "negative"}]
        maps = np.random.default_rng(0).random((10, 3, 7, 7)).astype(np.float32)
        names = workers.run(results_in_worker, uid, source, findings, maps, [0, 1, 2])
        assert len(names) == 4  # the report and three heatmaps
        heatmap = read_dataset((spool.outbox / uid / names[1]).read_bytes(), 128)
        assert (heatmap.Rows, heatmap.Columns) == (8192, 8192)
        peak, limit = workers.run(address_space)
        print(f"worker address space: peak {peak / 2 ** 20:.0f} MB of {limit / 2 ** 20:.0f}")
    finally:
        workers.shutdown()


@pytest.mark.system
def test_a_worker_that_allocates_without_bound_fails_alone(tmp_path):
    """A decoder that ignores every size check and allocates what the stream says (the 15 GB
    of the hostile JPEG) fails in its worker with the worker's limit named, and the pool works
    on: the host's memory is never at stake."""
    from common import DataError
    from node.workers import Workers
    workers = Workers(1, worker_settings(tmp_path, 512))
    try:
        started = time.monotonic()
        with pytest.raises(DataError, match=r"more memory than a worker may take "
                                            r"\(--worker-memory-mb 512\)"):
            workers.run(allocate, 15)
        assert time.monotonic() - started < 30
        assert workers.run(allocate, 0.1) == int(0.1 * 2 ** 30)
    finally:
        workers.shutdown()


def crash_then_sleep(marker, seconds):
    """A task that kills its worker the first time, then sleeps (tried alone: a long task)."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds)
    return "done"


@pytest.mark.system
def test_a_stop_during_a_lone_retry_is_stopping_never_a_failure(tmp_path):
    """shutdown() stops the lone retry's pool too: the task then ends in Stopping (its image
    stays in the inbox for the next start), never in an error that would quarantine it."""
    import threading

    from node.workers import Stopping, Workers
    workers = Workers(1, worker_settings(tmp_path, 1024))
    outcome = {}

    def run():
        try:
            outcome["value"] = workers.run(crash_then_sleep, str(tmp_path / "crashed"), 60)
        except Exception as e:
            outcome["error"] = e
    thread = threading.Thread(target=run)
    thread.start()
    def spawned():
        return [p for p in children(os.getpid()) if alive(p) and "spawn_main" in Path(
            f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    # the task crashed its worker: a new pool of 1, and the task alone in a second process
    wait_for(lambda: (tmp_path / "crashed").exists() and len(spawned()) == 2, 60,
             "the lone retry")
    time.sleep(1.0)
    workers.shutdown()
    thread.join(30)
    assert isinstance(outcome.get("error"), Stopping), outcome


HOLD_WORKERS = """
import ctypes, os, sys, time
sys.path.insert(0, ".")
from node.workers import Workers
sys.path.insert(0, "tests")
from test_serve_hostile import worker_settings, stuck
from pathlib import Path
workers = Workers(2, worker_settings(Path(sys.argv[1]), 1024))
import threading
threading.Thread(target=workers.run, args=(stuck, sys.argv[1] + "/crashed"),
                 daemon=True).start()
print("ready", flush=True)
if sys.argv[2] == "term":
    sys.stdin.readline()
    workers.shutdown()
    print("shut", flush=True)
time.sleep(600)
"""


def stuck(marker):
    """A task that kills its worker the first time (so that it is tried again alone, in a
    pool of its own), then never lets its process's other threads run: a C call holding the
    interpreter lock (as a decoder stuck in a loop would)."""
    import ctypes
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    ctypes.PyDLL(None).sleep(600)


def children(pid):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.system
@pytest.mark.parametrize("how", ["kill -9", "shutdown"])
def test_workers_die_with_the_node_even_when_stuck(how, tmp_path):
    """A worker stuck in a call that holds its interpreter lock never ran the thread that
    watched for its node, and outlived it (parent 1). Now the kernel kills it with the node
    (kill -9), and shutdown() stops every pool, the lone retry's included (it was left to
    itself, and lived on after SIGTERM)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_WORKERS, str(tmp_path),
                             "term" if how == "shutdown" else "kill"], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"

        def running():
            return [p for p in children(proc.pid) if alive(p) and "spawn_main" in Path(
                f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        # the task crashed its worker: a new pool of 2, and the task alone in a third, stuck
        wait_for(lambda: (tmp_path / "crashed").exists() and len(running()) == 3, 60,
                 "the lone worker")
        time.sleep(1.0)
        workers = running()
        if how == "kill -9":
            proc.kill()
            proc.wait(30)
        else:
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "shut"
        wait_for(lambda: not any(alive(p) for p in workers), 10, "every worker gone")
    finally:
        proc.kill()
        proc.wait(30)
