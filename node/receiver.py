"""The receive path: a C-STORE from a sender, checked from the cheapest check up (its SOP
class, the queue's room, the object read in full, its header), written durably to the inbox
before success goes back, then queued for the process path (Node.todo). A refused object
gets its DIMSE status and a log line; a malformed one goes to the quarantine, kept by its
header."""
import time

from common import DataError, one_line
from node.checks import image_problem, read_dataset, without_pixels
from node.dicom import (CANNOT_UNDERSTAND, DOES_NOT_MATCH, OUT_OF_RESOURCES,
                        SOP_CLASS_NOT_SUPPORTED, SUCCESS, UID_RE, XRAY_CLASSES, SpoolError)
from node.logs import log
from node.spool import durable_write


class Receiver:
    """Node's receive path (node/core.py: its state, and which lock guards what). Runs in
    pynetdicom's association threads, one per sender; takes node.lock for the queue's depth,
    the duplicate check (with the done/ record) and the accepted time."""

    def handle_store(self, event):
        """C-STORE: checks from the cheapest, the image on disk before success is returned."""
        caller = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        try:
            return self._store(event, caller)
        except Exception as e:  # the node never stops for one object
            log.exception("C-STORE from %s failed", caller)
            return self.refuse("internal error", OUT_OF_RESOURCES, caller, one_line(e))

    def _store(self, event, caller):
        t0 = time.perf_counter()
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class not in XRAY_CLASSES:
            name = getattr(event.request.AffectedSOPClassUID, "name", sop_class)
            return self.refuse("not a chest X-ray SOP class", SOP_CLASS_NOT_SUPPORTED, caller,
                               name)
        with self.lock:
            depth = len(self.queued)
        if depth >= self.settings.max_queue:
            return self.refuse("queue full", OUT_OF_RESOURCES, caller,
                               f"{depth} images waiting, --max-queue {self.settings.max_queue}")
        data = event.encoded_dataset(include_meta=True)
        try:
            ds = read_dataset(data, self.settings.max_image_mb)
        except DataError as e:  # a deflate bomb: kept by its first 64 KiB, as what cannot be read
            self._quarantine_refused(data[:65536], None, f"{one_line(e)} (from {caller})")
            return self.refuse("malformed object", CANNOT_UNDERSTAND, caller, one_line(e)[:200])
        except Exception as e:
            self._quarantine_refused(data[:65536], None,
                                     f"unreadable DICOM from {caller}: {one_line(e)}")
            return self.refuse("malformed object", CANNOT_UNDERSTAND, caller, one_line(e)[:200])
        uid = str(ds.get("SOPInstanceUID", ""))
        problem, status = self.check_header(ds, sop_class)
        if problem:
            # kept by its header (a sender sending large refused objects again and again must
            # not fill the spool's disk): the reason says what was wrong with the rest
            self._quarantine_refused(without_pixels(ds), uid, f"{problem} (from {caller})")
            return self.refuse(problem, status, caller, uid)
        with self.lock:
            duplicate = uid in self.queued or self.spool.is_done(uid)
            if not duplicate:
                self.queued.add(uid)
        if duplicate:
            self.count("duplicates")
            log.info("duplicate %s from %s: already accepted, answered once", uid, caller)
            return SUCCESS
        try:
            durable_write(self.spool.image(uid), data)
        except SpoolError as e:
            with self.lock:
                self.queued.discard(uid)
            self.trouble("spool", str(e))
            return self.refuse("cannot store", OUT_OF_RESOURCES, caller, one_line(e))
        self.count("received")
        self.trouble("spool", None)
        log.info("accepted %s %s from %s", XRAY_CLASSES[sop_class], uid, caller)
        now = time.perf_counter()
        self.stages.add("receive", now - t0)
        with self.lock:
            self.accepted_at[uid] = now
        self.todo.put(uid)
        return SUCCESS

    def _quarantine_refused(self, data, uid, reason):
        """A refused object into the quarantine, if the spool can take it (the sender is told
        of the refusal either way: nothing was accepted)."""
        try:
            self.spool.put_quarantine(data, uid, reason)
            self.count("quarantined")
            self.trouble("spool", None)
        except SpoolError as e:
            self.trouble("spool", str(e))
            log.error("cannot quarantine a refused object (%s): %s", reason, e)

    def check_header(self, ds, sop_class):
        """(problem, status) from the header alone, before anything is decoded."""
        uid = str(ds.get("SOPInstanceUID", ""))
        if not (UID_RE.match(uid) and len(uid) <= 64):
            return f"SOP Instance UID {uid[:70]!r} is not a UID", DOES_NOT_MATCH
        if str(ds.get("SOPClassUID", "")) != sop_class:
            return "SOP Class UID differs from the request's", DOES_NOT_MATCH
        for key in ("StudyInstanceUID", "SeriesInstanceUID"):
            value = str(ds.get(key, ""))
            if not (UID_RE.match(value) and len(value) <= 64):  # copied into the results
                return f"no valid {key}", DOES_NOT_MATCH
        return image_problem(ds, self.settings.max_image_mb)
