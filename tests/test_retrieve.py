"""retrieve.py, query/retrieve in: a real PACS (Orthanc, started on 127.0.0.1 with the node in
its DicomModalities) holding DX and CR images made from real NIH images in studies of several
dates, plus what must not move (a study out of the range, a study and a series of another
modality); the real node (serve.py) receiving the C-MOVEs and sending its reports back to the
same Orthanc. Between retrieve.py and Orthanc a TCP relay on 127.0.0.1 counts the associations
open at once (--max-retrievals seen from outside) and slows each one down, so that a kill -9
lands half-way. Below: the journal and the C-MOVE outcomes alone, and every bad flag."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, assert_clean_error, run_main
from dicom_files import dx_file, evidence_uids
from test_serve import NODE_AE, NodeProcess, Orthanc, free_port, wait_for

CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # for presentation
STUDY_FIND, STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2"
RANGE = ("--from", "2025-03-01", "--to", "2025-03-31")


# ---------------------------------------------------------------------------------------------
# The relay: retrieve.py -> relay -> Orthanc

class Relay:
    """A TCP relay on 127.0.0.1 to `port`: each connection waits `delay` seconds before it is
    joined to the PACS. most(): the connections open at once since reset(), counting only
    overlaps of over 0.2 s (one association released and the next opened at once do not
    overlap: the relay's threads see the close a moment late)."""

    def __init__(self, port, delay=0.0):
        self.port, self.delay = port, delay
        self.lock = threading.Lock()
        self.open, self.spans, self.since = 0, [], 0.0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self):
        self.since = time.monotonic()

    def most(self):
        with self.lock:
            now = time.monotonic()
            spans = [(a, b if b is not None else now) for a, b in self.spans
                     if a >= self.since]
        return max((sum(1 for a, b in spans if a <= t < b - 0.2) for t, _ in spans), default=0)

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        with self.lock:
            self.open += 1
            span = [time.monotonic(), None]
            self.spans.append(span)
        try:
            time.sleep(self.delay)
            upstream = socket.create_connection(("127.0.0.1", self.port))
            done = threading.Event()
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, done), daemon=True).start()
            done.wait()
            close(upstream)
        except OSError:
            pass
        finally:
            close(client)
            with self.lock:
                self.open -= 1
                span[1] = time.monotonic()

    @staticmethod
    def _pump(source, target, done):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        done.set()

    def close(self):
        self.server.close()


def close(sock):
    """Closed at once, both ways: a bare close() leaves the connection open while the other
    pump's thread waits in recv() on it (the PACS would wait for its timeout)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# ---------------------------------------------------------------------------------------------
# The PACS's content

def upload(pacs, path):
    request = urllib.request.Request(f"http://127.0.0.1:{pacs.http}/instances",
                                     data=Path(path).read_bytes())
    with urllib.request.urlopen(request, timeout=30) as r:
        assert json.loads(r.read())["Status"] == "Success"


def make_archive(pngs, out):
    """Studies of several dates as DICOM files: {name: [SOP Instance UIDs]} of those to move
    (CR and DX series from 2025-03-01 to 2025-03-31) and of those not to move."""
    import pydicom
    from pydicom.uid import generate_uid
    layout = [  # study, date, series, modality, images
        ("A", "20250310", "A1", "DX", 2),
        ("B", "20250312", "B1", "CR", 1),
        ("B", "20250312", "B2", "OT", 1),  # a secondary capture in a CR study: stays
        ("C", "20250314", "C1", "DX", 1),
        ("C", "20250314", "C2", "DX", 1),
        ("D", "20250402", "D1", "DX", 1),  # after the range: stays
        ("E", "20250311", "E1", "OT", 1),  # a study of another modality: stays
    ]
    studies, series, files = {}, {}, {"move": [], "stay": []}
    pngs = iter(pngs)
    for study, date, name, modality, count in layout:
        studies.setdefault(study, generate_uid())
        series[name] = generate_uid()
        for n in range(count):
            sop_class = {"CR": CR_CLASS, "OT": SC_CLASS}.get(modality, DX_CLASS)
            path = dx_file(next(pngs), out / f"{name}-{n}.dcm", studies[study], series[name],
                           n + 1, sop_class=sop_class)
            ds = pydicom.dcmread(path)
            ds.Modality, ds.StudyDate, ds.SeriesNumber = modality, date, int(name[1])
            ds.PatientID = f"NIH-{study}"  # one patient per study, as a PACS expects
            ds.save_as(path, enforce_file_format=True)
            moved = modality in ("CR", "DX") and date.startswith("202503")
            files["move" if moved else "stay"].append((name, path, str(ds.SOPInstanceUID)))
    return series, files


def accepted(node_text, uid):
    """How many times the node's log says it accepted this image from the PACS."""
    return sum(1 for line in node_text.splitlines()
               if " accepted " in line and f" {uid} from PACS@" in line)


def journal_series(state):
    lines = Path(state).read_bytes().split(b"\n")
    return [json.loads(line)["series"] for line in lines[1:] if line.strip()]


def retrieve_cmd(relay, state, *extra):
    return [sys.executable, "retrieve.py", "--pacs", f"PACS@127.0.0.1:{relay.address}",
            "--node-ae", NODE_AE, *RANGE, "--state", str(state), *extra]


def run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def archive(nih_images, tmp_path):
    """Orthanc holding the archive (the node known to it as CHEXNET at a free port), a relay in
    front of its DICOM port, and which files it holds."""
    image_dir, _ = nih_images
    pngs = sorted(image_dir.glob("*.png"))[:8]
    node_port = free_port()
    pacs = Orthanc(tmp_path / "pacs", node_port)
    pacs.node_port = node_port
    relay = Relay(pacs.dicom)
    (tmp_path / "files").mkdir()
    series, files = make_archive(pngs, tmp_path / "files")
    for _, path, _ in files["move"] + files["stay"]:
        upload(pacs, path)
    try:
        yield SimpleNamespace(pacs=pacs, relay=relay, series=series, files=files)
    finally:
        relay.close()
        pacs.stop()


# ---------------------------------------------------------------------------------------------

@pytest.mark.system
def test_retrieve_moves_the_range_s_cr_dx_once_resumes_after_kill9_and_is_polite(
        archive, small_model, tmp_path):
    """Node down: each series fails in one line, nothing journaled, exit 1. Node up: a run
    killed (-9) once its journal has a line, a torn line added; the rerun moves only the
    series not journaled, never more than --max-retrievals at once. Exactly the 5 CR/DX images
    of March 2025 reach the node, each accepted once, and each gets one report in Orthanc;
    nothing of April, of the OT study or the OT series. A rerun with a new journal moves all
    again: the node answers each image as a duplicate, classifies none again."""
    work, _ = small_model
    pacs, relay, series = archive.pacs, archive.relay, archive.series
    move_uids = {uid for _, _, uid in archive.files["move"]}
    state = tmp_path / "retrieve.jsonl"

    dry = run(retrieve_cmd(relay, state, "--dry-run"))
    assert dry.returncode == 0, dry.stderr
    assert "4 CR/DX series in 3 study(ies)" in dry.stdout and "4 to move" in dry.stdout
    listed = {line.split()[3] for line in dry.stdout.splitlines()
              if line.startswith("would move")}
    assert listed == {series[n] for n in ("A1", "B1", "C1", "C2")}
    assert not state.exists()

    # the node is not running yet: every move fails, each said once, nothing journaled
    down = run(retrieve_cmd(relay, state))
    assert down.returncode == 1
    failures = [line for line in down.stderr.splitlines() if line.startswith("failed: series")]
    assert len(failures) == 4, down.stderr
    assert all("0 image(s) stored at the node" in f and f"PACS@127.0.0.1:{relay.address}" in f
               for f in failures)
    assert_clean_error(down, "4 of 4 series failed", "rerun")
    assert journal_series(state) == []

    node = NodeProcess(work / "models", tmp_path / "spool", pacs, "--allow-ae", "PACS",
                       "--no-operating-points")
    try:
        relay.delay = 1.0  # each association waits 1 s: a kill lands between two moves
        relay.reset()
        first = subprocess.Popen(retrieve_cmd(relay, state, "--max-retrievals", "1"), cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: journal_series(state) or first.poll() is not None, 60,
                 "a first series in the journal", every=0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        done_before = journal_series(state)
        assert 1 <= len(done_before) < 4, done_before
        assert relay.most() == 1  # --max-retrievals 1, the queries before included
        wait_for(lambda: relay.open == 0, 30, "the killed run's connections to close")
        with open(state, "ab") as f:  # as a kill half-way through a line leaves it
            f.write(b'{"series": "1.2.3", "study": "1.2')

        relay.reset()
        rerun = run(retrieve_cmd(relay, state, "--max-retrievals", "2"))
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "1 unreadable line(s) ignored" in rerun.stderr
        assert f"{len(done_before)} moved already" in rerun.stdout
        moved_now = [line.split()[2] for line in rerun.stdout.splitlines()
                     if line.startswith("moved series")]
        assert sorted(moved_now) == sorted(set(series[n] for n in ("A1", "B1", "C1", "C2"))
                                           - set(done_before))
        assert relay.most() == min(2, 4 - len(done_before))  # two moves at once, never three
        assert sorted(journal_series(state)) == sorted(series[n] for n in ("A1", "B1", "C1", "C2"))
        assert Path(state).read_bytes().endswith(b"\n")  # the torn line was cut off

        # exactly the range's CR/DX images, each accepted once, each with one report
        spool = tmp_path / "spool"
        wait_for(lambda: len(list((spool / "done").glob("*.json"))) == 5
                 and not any((spool / "outbox").iterdir()), 120, "5 images classified, sent")
        text = node.text()
        for uid in move_uids:
            assert accepted(text, uid) == 1, uid
        for _, _, uid in archive.files["stay"]:
            assert uid not in text
        reports = wait_for(lambda: len(pacs.instances("SR")) == 5 and pacs.instances("SR"),
                           60, "5 reports in Orthanc")
        referenced = [uid for sr in reports for uid in evidence_uids(sr)]
        assert sorted(referenced) == sorted(move_uids)

        # a journal lost: everything moves again, the node classifies nothing twice
        again = run(retrieve_cmd(relay, tmp_path / "new.jsonl", "--max-retrievals", "2"))
        assert again.returncode == 0, again.stdout + again.stderr
        assert "moved 4 series (5 image(s))" in again.stdout
        text = node.text()
        for uid in move_uids:
            assert accepted(text, uid) == 1 and f"duplicate {uid} from PACS@" in text, uid
        assert len(list((spool / "done").glob("*.json"))) == 5
        assert len(pacs.instances("SR")) == 5
    finally:
        node.stop()


@pytest.mark.system
def test_retrieve_set_up_failures_are_one_line_each(archive, tmp_path):
    """What a PACS not set up for the node says, through retrieve.py: a calling AE title it
    does not know (Orthanc ends the association at the query), a move destination it does not
    know (Orthanc: 0xC000, nothing stored), a PACS that is down. Nothing is journaled."""
    pacs, relay = archive.pacs, archive.relay
    stranger = run(retrieve_cmd(relay, tmp_path / "a.jsonl", "--ae-title", "STRANGER"))
    assert_clean_error(stranger, f"--pacs PACS@127.0.0.1:{relay.address}",
                       "ended the association at the study query", "--ae-title STRANGER")

    unknown = run([sys.executable, "retrieve.py", "--pacs", f"PACS@127.0.0.1:{pacs.dicom}",
                   "--node-ae", "NOBODY", "--ae-title", NODE_AE, *RANGE,
                   "--state", str(tmp_path / "b.jsonl")])
    assert unknown.returncode == 1
    failures = [line for line in unknown.stderr.splitlines() if line.startswith("failed:")]
    assert len(failures) == 4 and all("answered 0xC000" in f and "does it know NOBODY as a "
                                      "DICOM modality" in f for f in failures), unknown.stderr
    assert journal_series(tmp_path / "b.jsonl") == []

    pacs.stop()
    gone = run([sys.executable, "retrieve.py", "--pacs", f"PACS@127.0.0.1:{pacs.dicom}",
                "--node-ae", NODE_AE, *RANGE, "--state", str(tmp_path / "c.jsonl")])
    assert_clean_error(gone, f"--pacs PACS@127.0.0.1:{pacs.dicom}", "no association",
                       "connection refused")


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the flag, before any association

@pytest.mark.integration
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, capsys):
    state = ["--state", str(tmp_path / "s.jsonl")]
    ok = ["--pacs", "PACS@127.0.0.1:104", "--node-ae", "CHEXNET", *RANGE, *state]

    def fails(argv, *fragments):
        proc = run_main(capsys, *argv, module="retrieve")
        assert_clean_error(proc, *fragments)
        return proc

    fails([*ok[:4], "--from", "2025-02-30", "--to", "2025-03-01", *state],
          "--from", "'2025-02-30'", "YYYY-MM-DD")
    fails([*ok[:4], "--from", "2025/03/01", "--to", "2025-03-02", *state], "--from")
    fails([*ok[:4], "--from", "2025-03-02", "--to", "2025-03-01", *state],
          "--from", "2025-03-02 is after --to 2025-03-01")
    for bad in ("PACS@10.0.0.5", "10.0.0.5:104", "PACS@10.0.0.5:0", "PACS@10.0.0.5:70000",
                "A_TITLE_OF_17_CHRS@h:104", "PACS@h:104:5"):
        fails(["--pacs", bad, *ok[2:]], "--pacs", "AE@HOST:PORT")
    fails([*ok, "--node-ae", "A_TITLE_OF_17_CHRS"], "--node-ae", "1-16")
    fails([*ok, "--ae-title", "BACK\\SLASH"], "--ae-title")
    fails([*ok, "--max-retrievals", "0"], "--max-retrievals")
    fails([*ok, "--max-retrievals", "9"], "--max-retrievals", "at most 8")
    fails([*ok, "--modality", "MR"], "--modality")
    fails([*ok[:4], "--from", "0999-01-01", *ok[6:]], "--from")  # not 8 digits as DICOM
    fails([*ok, "--timeout", "1e10"], "--timeout", "at most 3600")
    fails(ok[2:], "--pacs")
    assert not (tmp_path / "s.jsonl").exists()

    # a file that is no journal is never written to; a --state that cannot be written
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    fails([*ok[:-1], str(other)], "--state", "not a journal of retrieve.py")
    assert other.read_text() == "my notes\n"
    (tmp_path / "dir").mkdir()
    fails([*ok[:-1], str(tmp_path / "dir")], "--state", "not a regular file")
    # nor written through or replaced: a device, a symlink (dangling or not)
    fails([*ok[:-1], "/dev/null"], "--state", "not a regular file")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "nowhere" / "x.jsonl")
    fails([*ok[:-1], str(tmp_path / "link.jsonl")], "--state", "not a regular file")
    assert not (tmp_path / "nowhere").exists()

    # an unreachable PACS: one line naming --pacs and the system's reason
    port = free_port()
    proc = fails(["--pacs", f"PACS@127.0.0.1:{port}", *ok[2:]],
                 f"--pacs PACS@127.0.0.1:{port}", "no association", "refused")
    assert "Traceback" not in proc.stderr


def fake_pacs(moves, reject=False):
    """A PACS of pynetdicom's, for what Orthanc does not do: it rejects the association, or
    knows no move destination (0xA801). Two studies of March 2025 and one of May, which it
    returns whatever the range (retrieve.py drops it), one DX series each."""
    from pydicom import Dataset
    from pynetdicom import AE, evt

    def on_find(event):
        query = event.identifier
        if query.QueryRetrieveLevel == "STUDY":
            for uid, date in (("1.2.1", "20250310"), ("1.2.2", "20250311"), ("1.2.3", "20250501")):
                answer = Dataset()
                answer.QueryRetrieveLevel, answer.StudyInstanceUID = "STUDY", uid
                answer.StudyDate = date
                yield 0xFF00, answer
            return
        answer = Dataset()
        answer.QueryRetrieveLevel, answer.StudyInstanceUID = "SERIES", query.StudyInstanceUID
        answer.SeriesInstanceUID, answer.Modality = f"{query.StudyInstanceUID}.1", "DX"
        answer.NumberOfSeriesRelatedInstances = 1
        yield 0xFF00, answer

    def on_move(event):
        moves.append(event.move_destination)
        yield None, None  # pynetdicom answers 0xA801

    ae = AE(ae_title="PACS")
    ae.add_supported_context(STUDY_FIND)
    ae.add_supported_context(STUDY_MOVE)
    if reject:
        ae.require_calling_aet = ["SOMEONE"]
    return ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_C_FIND, on_find), (evt.EVT_C_MOVE, on_move)])


@pytest.mark.integration
def test_a_pacs_that_rejects_or_knows_no_move_destination_is_one_line(tmp_path, capsys):
    moves = []
    server = fake_pacs(moves)
    try:
        port = server.server_address[1]
        argv = ["--pacs", f"PACS@127.0.0.1:{port}", "--node-ae", "CHEXNET", *RANGE,
                "--state", tmp_path / "s.jsonl"]
        proc = run_main(capsys, *argv, module="retrieve")
        assert "2 CR/DX series in 2 study(ies)" in proc.stdout  # May's study dropped
        assert_clean_error(proc, "does not know the move destination CHEXNET (0xA801)",
                           "add the node to its DICOM modalities", "stopped")
        assert moves == ["CHEXNET"]  # the second series is not tried after that
        assert journal_series(tmp_path / "s.jsonl") == []
    finally:
        server.shutdown()
    server = fake_pacs(moves, reject=True)
    try:
        port = server.server_address[1]
        proc = run_main(capsys, "--pacs", f"PACS@127.0.0.1:{port}", "--node-ae", "CHEXNET",
                        *RANGE, "--state", tmp_path / "t.jsonl", module="retrieve")
        assert_clean_error(proc, f"--pacs PACS@127.0.0.1:{port}: association rejected",
                           "Calling AE title not recognised", "--ae-title CHEXNET")
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------
# The journal and the C-MOVE outcomes, alone

def series(uid, images=1):
    from node.retrieve import Series
    return Series("1.2.9", uid, "DX", "20250310", images)


def test_the_journal_keeps_whole_lines_ignores_a_torn_one_and_cuts_it(tmp_path):
    from node.retrieve import Journal
    path = tmp_path / "state.jsonl"
    journal = Journal(path, "PACS", "CHEXNET")
    journal.record(series("1.1", 2), 2)
    journal.record(series("1.2", 1), 1)
    journal.close()
    with open(path, "ab") as f:
        f.write(b'{"series": "1.3", "study": "1.2.9", "pa')  # a kill -9 mid-write
    again = Journal(path, "PACS", "CHEXNET")
    assert again.ignored == 1
    assert again.is_done(series("1.1", 2)) and again.is_done(series("1.2", None))
    assert not again.is_done(series("1.1", 3))  # images added since: moved again
    assert not again.is_done(series("1.3"))
    again.record(series("1.3"), 1)
    again.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])
    assert Journal(path, "PACS", "CHEXNET", create=False).ignored == 0
    # another PACS or node: nothing of this journal counts for it
    assert not Journal(path, "PACS2", "CHEXNET", create=False).is_done(series("1.1", 2))
    assert not Journal(path, "PACS", "NODE2", create=False).is_done(series("1.1", 2))
    # a line that is no entry (a disk's garbage) is ignored, the rest kept
    with open(path, "ab") as f:
        f.write(b"\0\0\0\n")
    assert Journal(path, "PACS", "CHEXNET", create=False).ignored == 1
    # --dry-run: nothing made
    Journal(tmp_path / "none.jsonl", "PACS", "CHEXNET", create=False)
    assert not (tmp_path / "none.jsonl").exists()


def test_a_c_move_counts_as_done_only_on_success_without_failed_suboperations():
    from pydicom import Dataset

    from node.retrieve import RetrieveSettings, ended, suboperations
    from node.settings import Destination
    settings = RetrieveSettings(Destination("PACS", "h", 104), "CHEXNET", "CHEXNET", None, None,
                                ("DX",), "s", 1, 60.0, False)

    def response(status, completed=None, failed=None, comment=None):
        ds = Dataset()
        ds.Status = status
        if completed is not None:
            ds.NumberOfCompletedSuboperations = completed
        if failed is not None:
            ds.NumberOfFailedSuboperations = failed
        if comment:
            ds.ErrorComment = comment
        return ds

    counts = suboperations(response(0xFF00, 1, 0), (0, 0))
    assert suboperations(response(0xC000, 0, 0), counts) == (1, 0)  # Orthanc's final says 0
    assert ended(settings, 0x0000, (3, 0), response(0)).whole
    for status, counts, words in [
            (0x0000, (2, 1), "1 of 3 image(s) not stored at the node CHEXNET"),
            (0xB000, (2, 1), "failed sub-operations"),
            (0xA702, (0, 0), "0xA702 (out of resources: unable to perform sub-operations"),
            (0xC000, (1, 0), "0xC000 (unable to process); 1 image(s) stored at the node"),
            (None, (1, 0), "no answer before the move was complete (--timeout 60 s)")]:
        outcome = ended(settings, status, counts, response(status or 0))
        assert not outcome.whole and not outcome.global_failure and words in outcome.why, \
            outcome.why
    unknown = ended(settings, 0xA801, (0, 0), response(0xA801))
    assert unknown.global_failure and not unknown.whole
    assert "does not know the move destination CHEXNET (0xA801)" in unknown.why
    assert "the PACS ended the association before the move was complete; 0 image(s) stored " \
        "at the node so far: may --ae-title CHEXNET move from it?" in ended(
            settings, None, (0, 0), None, True).why
    assert "0xB000 (sub-operations complete with warnings); 2 image(s)" in ended(
        settings, 0xB000, (2, 0), response(0xB000)).why
    assert "0xC001 (unable to process, no such series)" in ended(
        settings, 0xC001, (0, 0), response(0xC001, comment="no such series")).why


def test_a_success_that_counts_fewer_images_than_the_series_holds_is_not_journaled():
    """A PACS answering success with 0 images, no count at all, or 1 of 5: not whole (a rerun
    moves the series again); all 5, or more: whole."""
    from node.retrieve import Moved, counted
    for completed, images in [(0, 5), (0, None), (1, 5)]:
        outcome = counted(Moved(True, completed), series("1.1", images))
        assert not outcome.whole and "not recorded" in outcome.why
    assert counted(Moved(True, 5), series("1.1", 5)).whole
    assert counted(Moved(True, 1), series("1.1", None)).whole
    assert not counted(Moved(False, 5), series("1.1", 5)).whole
