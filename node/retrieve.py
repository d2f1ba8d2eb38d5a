"""Query/retrieve in (retrieve.py): the chest X-rays of a date range asked of a PACS and moved
to the node, so that they flow through its durable C-STORE path like any image sent to it.

- C-FIND at STUDY level (Study Root), one query per modality (StudyDate as a range,
  ModalitiesInStudy one value: what every PACS matches; a list of values is optional in the
  standard), the answers merged by Study Instance UID;
- C-FIND at SERIES level in each study: only the series of the modalities asked for are moved
  (a study holds the node's own reports and heatmaps too, which the node would refuse);
- C-MOVE per series to the node's AE title (the PACS opens its own association to the node and
  C-STOREs each image: the node's receive path, nothing new), at most `max_retrievals` at once;
- a journal (`state`), one JSON line per series the PACS moved with no failed sub-operation,
  appended and fsynced: a rerun skips those and moves the rest. A kill between a move and its
  line costs a second move of that series, which the node answers as a duplicate (success,
  not classified again: its done/ record or its queue).

Failures that are the whole PACS's (no association, rejected, the move destination unknown)
stop the run before the next move; a series' own failure (failed sub-operations, out of
resources, no final answer) is said in one line and left out of the journal. Only pynetdicom's
public API (any version the node runs with).
"""
import datetime
import json
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from common import DataError, exclusive_lock, os_reason
from node.settings import Destination

JOURNAL_HEADER = {"journal": "chexnet retrieve.py", "version": 1}
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model FIND
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"  # ... MOVE
PENDING = (0xFF00, 0xFF01)
MOVE_DESTINATION_UNKNOWN = 0xA801
# C-MOVE failure statuses (PS3.4 C.4.2.1.5, PS3.7 C) as a line says them
MOVE_STATUSES = {
    0xA701: "out of resources: unable to calculate the number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    0xA900: "identifier does not match SOP class",
    0xB000: "sub-operations complete, one or more failures or warnings",
    0xFE00: "sub-operations cancelled",
    0x0122: "SOP class not supported",
}


class RetrieveError(DataError):
    """The run cannot go on: one line naming the flag (or the PACS) at fault."""


@dataclass(frozen=True)
class RetrieveSettings:
    """retrieve.py's flags as values (checked by its command line already)."""
    pacs: Destination
    node_ae: str  # the C-MOVE destination: the node's AE title, as the PACS knows it
    ae_title: str  # this command's calling AE title (default: the node's)
    date_from: datetime.date
    date_to: datetime.date
    modalities: Tuple[str, ...]
    state: str
    max_retrievals: int
    timeout: float
    dry_run: bool


@dataclass(frozen=True)
class Series:
    study: str
    series: str
    modality: str
    study_date: str  # YYYYMMDD as the PACS gave it ('' where it gave none)
    images: Optional[int]  # Number of Series Related Instances, where the PACS says

    def __str__(self):
        date = self.study_date
        when = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else "no date"
        count = "" if self.images is None else f", {self.images} image(s)"
        return f"series {self.series} ({self.modality}, study {self.study}, {when}{count})"


MAX_MATCHES = 100_000  # studies or series one query may find (a month of a large hospital: ~10,000)
QUERY_TIMEOUTS = 10  # one query's whole time, in --timeout (a month's query takes seconds)


@dataclass
class Moved:
    """How one C-MOVE ended: whole (journaled) or not, and why not."""
    whole: bool
    completed: int = 0
    failed: int = 0
    why: str = ""
    global_failure: bool = False  # the PACS's or the set-up's, not this series': stop


# ---------------------------------------------------------------------------------------------
# The journal

class Journal:
    """--state: a header line, then one JSON line per series moved whole ({"series", "study",
    "pacs", "node", "images", "at"}), each appended and fsynced before the next move is
    counted on. A kill -9 leaves whole lines and at most one torn last line: read back, a line
    that does not parse is ignored (its series is moved again, which the node answers once)
    and a torn end is cut off before the next line is appended. A series counts as done for
    the same PACS AE title and node AE title only, and only while the PACS holds no more of
    its images than were moved (images added later move the series again)."""

    def __init__(self, path, pacs_ae, node_ae, create=True):
        self.path, self.pacs_ae, self.node_ae = Path(path), pacs_ae, node_ae
        self.done, self.ignored, self.fd = {}, 0, None
        self.lock = threading.Lock()
        # a device (/dev/null), a FIFO or a symlink would be written through, replaced or read
        # for ever: a journal is a regular file of its own
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise RetrieveError(f"--state {path}: not a regular file (a symlink, a device, a "
                                "FIFO or a folder); name a new file")
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = None
        except OSError as e:
            raise RetrieveError(f"--state {path}: cannot read ({os_reason(e)})") from None
        if data is None or (b"\n" not in data and not data.strip()):
            data = None  # none yet, or an empty one
        elif not data.startswith(json.dumps(JOURNAL_HEADER).encode() + b"\n"):
            raise RetrieveError(f"--state {path}: not a journal of retrieve.py (its first line "
                                f"is not {json.dumps(JOURNAL_HEADER)}); name a new file")
        if data is not None:
            self._read(data)
        if not create:
            return
        try:
            if data is None:
                self._create()
            elif not data.endswith(b"\n"):  # a torn last line: cut off, durably
                with open(self.path, "r+b") as f:
                    f.truncate(data.rindex(b"\n") + 1)
                    os.fsync(f.fileno())
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as e:
            raise RetrieveError(f"--state {path}: cannot write ({os_reason(e)})") from None

    def _read(self, data):
        lines = data.split(b"\n")[1:]
        if lines and lines[-1]:
            lines[-1] = b""  # torn: no newline after it
            self.ignored += 1
        for line in filter(None, lines):
            try:
                entry = json.loads(line)
                key = (entry["pacs"], entry["node"], entry["series"])
                images = int(entry["images"])
            except (ValueError, KeyError, TypeError):
                self.ignored += 1
                continue
            if key[:2] == (self.pacs_ae, self.node_ae):
                self.done[key[2]] = max(images, self.done.get(key[2], 0))

    def _create(self):
        """The header, whole or not at all: written aside, fsynced, renamed, the folder
        fsynced."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(json.dumps(JOURNAL_HEADER).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def is_done(self, series):
        recorded = self.done.get(series.series)
        return recorded is not None and (series.images is None or series.images <= recorded)

    def record(self, series, images):
        """One line for a series moved whole, on disk before this returns (one write(2) of
        the whole line, then fsync)."""
        line = json.dumps({"series": series.series, "study": series.study,
                           "pacs": self.pacs_ae, "node": self.node_ae, "images": images,
                           "at": datetime.datetime.now().isoformat(timespec="seconds")})
        data = line.encode() + b"\n"
        with self.lock:
            if os.write(self.fd, data) != len(data):  # a full disk; the torn line is ignored
                raise OSError(28, "No space left on device")
            os.fsync(self.fd)
            self.done[series.series] = images

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------------
# The PACS

def quiet_pynetdicom():
    """pynetdicom's own log lines (association refused, aborted) stay out of the output: each
    failure is said once, in this module's words."""
    import logging
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def associate(settings, sop_class):
    """An association with the PACS for one Query/Retrieve SOP class, or RetrieveError saying
    why not (rejected: the PACS's words; no connection: the system's)."""
    from pynetdicom import AE
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout
    ae.connection_timeout = min(settings.timeout, 10.0)
    ae.add_requested_context(sop_class)
    pacs = settings.pacs
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.ae_title)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        why = (f"association rejected ({getattr(rj, 'result_str', '?')}, "
               f"{getattr(rj, 'source_str', '?')}: {getattr(rj, 'reason_str', '?')})")
        hint = (f": is --ae-title {settings.ae_title} one of its modalities, and "
                f"{pacs.ae_title} its AE title?")
        raise RetrieveError(f"--pacs {pacs}: {why}{hint}")
    what = "C-FIND" if sop_class == STUDY_FIND else "C-MOVE"
    if assoc.rejected_contexts:
        raise RetrieveError(f"--pacs {pacs}: it does not offer Study Root query/retrieve "
                            f"{what} (presentation context rejected)")
    raise RetrieveError(f"--pacs {pacs}: no association for {what} "
                        f"({connect_reason(pacs, settings.timeout)})")


def connect_reason(pacs, timeout):
    """Why no association came: asked of the system by a plain TCP connection, once the
    association has failed (never before: a PACS logs every connection)."""
    try:
        with socket.create_connection((pacs.host, pacs.port), timeout=min(timeout, 10.0)):
            return "it answers, but ended the association: is it a DICOM port?"
    except socket.gaierror:
        return f"cannot resolve {pacs.host}"
    except socket.timeout:
        return f"no answer within {min(timeout, 10.0):g} s"
    except OSError as e:
        return os_reason(e).lower()


def status_of(response):
    """The Status of a DIMSE response, None where none came (timed out, aborted)."""
    return int(response.Status) if response is not None and "Status" in response else None


def find(assoc, identifier, settings, what):
    """The identifiers a C-FIND answers with; RetrieveError where the PACS refuses it."""
    found, since = [], time.monotonic()
    started = progress = since
    for response, answer in assoc.send_c_find(identifier, STUDY_FIND):
        now = time.monotonic()
        status, waited, since = status_of(response), now - since, now
        if status in PENDING:
            # --timeout bounds each answer; these bound the whole query: a PACS answering
            # "pending" for ever, with nothing or without end, holds no run for ever
            if answer is not None:
                found.append(answer)
                progress = now
            too_long = now - started > QUERY_TIMEOUTS * settings.timeout
            if len(found) > MAX_MATCHES or too_long or now - progress > settings.timeout:
                assoc.abort()
                raise RetrieveError(
                    f"--pacs {settings.pacs}: the {what} query "
                    + (f"found over {MAX_MATCHES} matches: narrow --from/--to"
                       if len(found) > MAX_MATCHES else
                       f"took over {QUERY_TIMEOUTS} x --timeout ({len(found)} matches so far): "
                       "narrow --from/--to" if too_long else
                       f"answered 'pending' without a match for --timeout "
                       f"{settings.timeout:g} s"))
        elif status == 0x0000:
            return found
        elif status is None and waited < settings.timeout and ended_by_peer(assoc):
            # Orthanc's answer to a calling AE title it does not know: an A-ABORT
            raise RetrieveError(f"--pacs {settings.pacs}: the PACS ended the association at the "
                                f"{what} query: may --ae-title {settings.ae_title} query it (is "
                                "it one of its modalities)?")
        elif status is None:
            raise RetrieveError(f"--pacs {settings.pacs}: no answer to the {what} query within "
                                f"--timeout {settings.timeout:g} s")
        else:
            raise RetrieveError(f"--pacs {settings.pacs}: the {what} query was refused (status "
                                f"0x{status:04X}{comment(response)}): may --ae-title "
                                f"{settings.ae_title} query it?")
    raise RetrieveError(f"--pacs {settings.pacs}: the {what} query ended without a status")


def ended_by_peer(assoc):
    """Whether a DIMSE exchange that gave no status ended because the PACS aborted (pynetdicom
    gives the empty status before its reactor thread has marked the association)."""
    deadline = time.monotonic() + 1.0
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    return assoc.is_aborted


def comment(response):
    text = str(response.get("ErrorComment", "") or "").strip()
    return f", {text[:100]}" if text else ""


def find_series(settings):
    """The series of the modalities asked for in the studies of the date range, in study date
    order; one association for every query."""
    from pydicom import Dataset
    span = f"{settings.date_from:%Y%m%d}-{settings.date_to:%Y%m%d}"
    assoc = associate(settings, STUDY_FIND)
    try:
        studies = {}
        for modality in settings.modalities:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = ""
            query.StudyDate = span
            query.ModalitiesInStudy = modality
            for answer in find(assoc, query, settings, "study"):
                uid = str(answer.get("StudyInstanceUID", ""))
                date = str(answer.get("StudyDate", ""))
                # a PACS that ignores the range must not widen it
                if uid and (not date or span[:8] <= date[:8] <= span[9:]):
                    studies[uid] = date
        found, seen = [], set()
        for study, date in sorted(studies.items(), key=lambda s: (s[1], s[0])):
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES"
            query.StudyInstanceUID = study
            query.SeriesInstanceUID = ""
            query.Modality = ""
            query.NumberOfSeriesRelatedInstances = ""
            for answer in find(assoc, query, settings, f"series (study {study})"):
                modality = str(answer.get("Modality", "")).upper()
                series = str(answer.get("SeriesInstanceUID", ""))
                if series and modality in settings.modalities and series not in seen:
                    seen.add(series)  # a PACS may list a series twice (Orthanc: per patient)
                    count = str(answer.get("NumberOfSeriesRelatedInstances", "") or "")
                    found.append(Series(study, series, modality, date,
                                        int(count) if count.strip().isdigit() else None))
        return found
    finally:
        assoc.release()


def move(settings, series):
    """One C-MOVE of one series to the node, on an association of its own: how it ended."""
    from pydicom import Dataset
    try:
        assoc = associate(settings, STUDY_MOVE)
    except RetrieveError as e:
        return Moved(False, why=str(e), global_failure=True)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = series.study
    identifier.SeriesInstanceUID = series.series
    last, counts, since, waited = None, (0, 0), time.monotonic(), 0.0
    progress, seen = time.monotonic(), None
    try:
        for response, _ in assoc.send_c_move(identifier, settings.node_ae, STUDY_MOVE):
            now = time.monotonic()
            last, waited, since = response, now - since, now
            counts = suboperations(response, counts)
            if status_of(response) not in PENDING:
                break
            # pending answers whose counts stay the same for --timeout: a move that does not
            # move (each answer within --timeout, the whole never ending) is given up
            state = tuple(response.get(k, None) for k in (
                "NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
                "NumberOfFailedSuboperations", "NumberOfWarningSuboperations"))
            if state != seen:
                seen, progress = state, now
            elif now - progress > settings.timeout:
                assoc.abort()
                return Moved(False, counts[0], counts[1], why=(
                    f"the PACS answered 'pending' without progress for --timeout "
                    f"{settings.timeout:g} s; {counts[0]} image(s) stored at the node"))
    finally:
        aborted = (status_of(last) is None and waited < settings.timeout
                   and ended_by_peer(assoc))
        if assoc.is_established:
            assoc.release()
    return ended(settings, status_of(last), counts, last, aborted)


def suboperations(response, before):
    """(completed, failed) sub-operations: the most any response said (Orthanc's final
    failure says 0 completed after pending answers counted some)."""
    if response is None:
        return before
    counts = [response.get(k, None) for k in ("NumberOfCompletedSuboperations",
                                              "NumberOfFailedSuboperations")]
    return tuple(max(int(c), b) if c is not None else b for c, b in zip(counts, before))


def counted(outcome, series):
    """A move that ended in success but counted fewer images stored than the series holds (or
    none, where the PACS gave no number): not whole, so not journaled, and a rerun moves it
    again (the node answers the images it has as duplicates)."""
    if not outcome.whole or outcome.completed >= (series.images or 1):
        return outcome
    return Moved(False, outcome.completed, why=(
        f"the PACS answered success but counted {outcome.completed} image(s) stored at the "
        f"node of {series.images or 'at least 1'}: not recorded, a rerun moves it again"))


def ended(settings, status, counts, response, aborted=False):
    """A C-MOVE's last response (None: none came) -> Moved: whole only on success with no
    failed sub-operation."""
    completed, failed = counts
    pacs, node = settings.pacs, settings.node_ae
    if status == 0x0000 and failed == 0:
        return Moved(True, completed)
    if status == MOVE_DESTINATION_UNKNOWN:
        return Moved(False, completed, failed, global_failure=True, why=(
            f"--pacs {pacs} does not know the move destination {node} (0xA801): add the "
            f"node to its DICOM modalities (AE title {node}, the node's address and port; "
            "docs/serve.md, Query/retrieve)"))
    if status is None and aborted:
        hint = "" if completed else f": may --ae-title {settings.ae_title} move from it?"
        return Moved(False, completed, failed, why=(
            f"the PACS ended the association before the move was complete; {completed} "
            f"image(s) stored at the node so far{hint}"))
    if status is None:
        return Moved(False, completed, failed, why=(
            f"no answer before the move was complete (--timeout {settings.timeout:g} s); "
            f"{completed} image(s) stored at the node so far"))
    if failed:
        return Moved(False, completed, failed, why=(
            f"{failed} of {completed + failed} image(s) not stored at the node {node} "
            f"(status 0x{status:04X}, failed sub-operations: the node refused them or could "
            "not be reached; its log says why)"))
    if status in (0x0000, 0xB000):  # no failure counted, but not a plain success
        return Moved(False, completed, failed, why=(
            f"{pacs} answered 0x{status:04X} (sub-operations complete with warnings); "
            f"{completed} image(s) stored at the node"))
    what = MOVE_STATUSES.get(status, "unable to process" if 0xC000 <= status <= 0xCFFF else
                             "failure" if status >= 0xA000 else "unexpected status")
    hint = "" if completed else (
        f": does it know {node} as a DICOM modality, is the node up and does it allow the "
        "PACS's AE title (--allow-ae)? The PACS's log says which")
    return Moved(False, completed, failed, why=(
        f"{pacs} answered 0x{status:04X} ({what}{comment(response)}); {completed} image(s) "
        f"stored at the node{hint}"))


# ---------------------------------------------------------------------------------------------
# The run

class Run:
    """One retrieval: the series found, the journal's skipped, the rest moved by
    `max_retrievals` threads (each one association at a time); say(line) and warn(line) print
    progress and failures."""

    def __init__(self, settings, say, warn):
        self.settings, self.say, self.warn = settings, say, warn
        self.moved, self.failed, self.images = [], [], 0
        self.stop_reason = None
        self.lock = threading.Lock()

    def run(self):
        """0 where every series found is in the journal now (or listed: --dry-run);
        RetrieveError where one failed (each said in its line), where the run stopped (the
        PACS, the set-up, the journal), or before any move where the query cannot be made.
        One run per journal at a time (two would move everything twice, each within
        --max-retrievals: twice that at the PACS)."""
        state = Path(self.settings.state)
        if self.settings.dry_run:
            return self._run()
        with exclusive_lock(state.with_name(f".{state.name}.lock"), "another retrieve.py",
                            "give each run its own --state"):
            return self._run()

    def _run(self):
        s = self.settings
        journal = Journal(s.state, s.pacs.ae_title, s.node_ae, create=not s.dry_run)
        try:
            if journal.ignored:
                self.warn(f"--state {s.state}: {journal.ignored} unreadable line(s) ignored (a "
                          "kill while writing): their series are moved again")
            quiet_pynetdicom()
            found = find_series(s)
            todo = [x for x in found if not journal.is_done(x)]
            skipped = len(found) - len(todo)
            studies = len({x.study for x in found})
            self.say(f"{len(found)} {'/'.join(s.modalities)} series in {studies} "
                     f"study(ies) from {s.date_from} to {s.date_to} at {s.pacs}; {skipped} "
                     f"moved already (--state), {len(todo)} to move")
            if s.dry_run:
                for x in todo:
                    self.say(f"would move {x}")
                return 0
            self._move_all(todo, journal)
        finally:
            journal.close()
        images = self.images
        self.say(f"moved {len(self.moved)} series ({images} image(s)) to {s.node_ae}; "
                 f"{len(self.failed)} failed, {len(todo) - len(self.moved) - len(self.failed)} "
                 "not tried")
        if self.stop_reason:
            raise RetrieveError(f"{self.stop_reason}; stopped, the journal holds what was "
                                "moved: rerun once it is fixed")
        if self.failed:
            raise RetrieveError(f"{len(self.failed)} of {len(todo)} series failed (each said "
                                "above); a rerun with the same --state moves only those")
        return 0

    def _move_all(self, todo, journal):
        tasks = queue.SimpleQueue()
        for x in todo:
            tasks.put(x)
        threads = [threading.Thread(target=self._mover, args=(tasks, journal),
                                    name=f"move-{i}", daemon=True)
                   for i in range(min(self.settings.max_retrievals, len(todo)))]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # a timed join: Ctrl-C reaches the main thread
                t.join(0.5)

    def _mover(self, tasks, journal):
        while self.stop_reason is None:
            try:
                series = tasks.get_nowait()
            except queue.Empty:
                return
            t0 = time.monotonic()
            try:
                outcome = move(self.settings, series)
            except Exception as e:  # a failure of this series, never of the run's bookkeeping
                outcome = Moved(False, why=f"{type(e).__name__}: {e}")
            outcome = counted(outcome, series)
            if outcome.whole:
                images = max(outcome.completed, series.images or 0)
                try:
                    journal.record(series, images)
                except OSError as e:
                    with self.lock:
                        self.stop_reason = (f"--state {self.settings.state}: cannot write "
                                            f"({os_reason(e)})")
                    return
                with self.lock:
                    self.moved.append(series)
                    self.images += outcome.completed
                self.say(f"moved {series}: {outcome.completed} image(s) in "
                         f"{time.monotonic() - t0:.1f} s")
                continue
            with self.lock:
                if outcome.global_failure:
                    if self.stop_reason is None:
                        self.stop_reason = outcome.why
                    return
                self.failed.append(series)
            self.warn(f"failed: {series} from {self.settings.pacs}: {outcome.why}")
