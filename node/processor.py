"""The process path: an accepted image from the inbox to its results in the outbox and its
done/ record. Decoded in a worker process, its ten crops to the model's inference thread, its
report and heatmaps built and written in a worker process, then recorded done. An image the
node cannot classify is quarantined with the reason, and answered at the destination by a
report saying so (the sender was told success: silence would leave the reader waiting); one
the spool or the workers cannot take now waits in the inbox and is tried again (_later); one
whose task kills its worker is tried again, and quarantined at the MAX_WORKER_DEATHS-th
time."""
import threading
import time

import numpy as np

from common import DataError, one_line, os_reason
from images import normalize_gray
from node.dicom import SpoolError
from node.logs import log
from node.workers import (NoWorkers, Stopping, WorkerDied, decode_in_worker, results_in_worker,
                          unclassified_in_worker)

MAX_WORKER_DEATHS = 3  # times an image's task stops its worker, alone, before quarantine


class Processor:
    """Node's process path (node/core.py: its state, and which lock guards what). Runs in the
    decoding threads (decode_forever, one per --workers), the model's inference thread (its
    callback hands over at once) and the results threads (Node.post: _finish); takes node.lock
    for the per-image bookkeeping (records, worker_deaths, retries, queued, accepted_at)."""

    def decode_forever(self):
        while not self.stopping.is_set():
            uid = self.todo.get()
            if uid is None:
                return
            try:
                self._decode(uid)
            except (SpoolError, NoWorkers) as e:
                self._later(uid, e)
            except Exception as e:
                if self.stopping.is_set():  # interrupted by the stop: finished at the next start
                    return
                log.exception("processing %s failed", uid)
                self._quarantine_image(uid, f"processing failed: {one_line(e)}")

    def _decode(self, uid):
        path = self.spool.image(uid)
        with self.lock:
            record = self.records.get(uid)
        if record is not None:  # its results are written: only its done/ record is not
            self.spool.finish(uid, record)  # a SpoolError: tried again later (_later)
            self.trouble("spool", None)
            self._forget(uid)
            self.count("processed")
            log.info("%s: recorded done (its results were written before)", uid)
            return
        if self.spool.is_done(uid) or not path.exists():
            # a retry of an image recorded done, or quarantined, before its inbox entry could
            # be removed (a full or failing disk): only that is left to do
            if path.exists():
                self.spool.finish(uid)
            log.info("%s: finished already (%s)", uid, "done" if self.spool.is_done(uid)
                     else "quarantined")
            self._forget(uid)
            return
        t0 = time.perf_counter()
        try:
            gray, source = self.workers.run(decode_in_worker, str(path))
        except DataError as e:
            self._quarantine_image(uid, f"cannot classify: {one_line(e)}")
            return
        except WorkerDied:
            self._worker_died(uid, "decoding")
            return
        except Stopping:  # left in the inbox: finished at the next start
            return
        crops = normalize_gray(gray)  # as eval_input: (10, 3, crop, crop), what infer.py feeds
        decoded = time.perf_counter()
        self.stages.add("decode", decoded - t0)

        self.model.submit(crops, lambda p, m: self.post.submit(self._finish, uid, source, p, m,
                                                               t0))

    def _finish(self, uid, source, probs, maps, t0):
        started = time.perf_counter()
        try:
            if probs is None:
                raise RuntimeError("inference failed")
            if not np.isfinite(probs).all():
                self._quarantine_image(uid, "the model gives non-finite probabilities")
                return
            findings = self.model.findings(probs)
            positive = [k for k, row in enumerate(findings) if row["decision"] == "positive"]
            if not positive or self.settings.no_heatmaps:
                maps = None
            try:
                names = self.workers.run(results_in_worker, uid, source, findings,
                                         None if maps is None else maps[:, positive], positive)
            except WorkerDied:
                self._worker_died(uid, "building the results of")
                return
            except Stopping:  # left in the inbox: finished at the next start
                return
            record = {"sop_instance_uid": uid, "status": "classified",
                      "study_instance_uid": str(source.StudyInstanceUID),
                      "model": self.model.identity["sha256"], "findings": findings,
                      "results": names, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            for ready in self.results_ready:  # the results are in the outbox: sent now
                ready.set()
            try:
                self.spool.finish(uid, record)
            except SpoolError:
                # the results are written (and may be sent already): only the record is
                # tried again, never the results (they were built and sent again each time)
                with self.lock:
                    self.records[uid] = record
                raise
        except (SpoolError, NoWorkers) as e:
            self._later(uid, e)
            return
        except Exception as e:  # a worker's error comes back as one line (in_worker)
            if self.stopping.is_set():  # interrupted by the stop: finished at the next start
                return
            log.error("results for %s failed: %s", uid, one_line(e))
            self._quarantine_image(uid, f"cannot build results: {one_line(e)}")
            return
        self.trouble("spool", None)
        self.trouble("workers", None)
        self._forget(uid)
        self.count("processed")
        self.stages.add("results", time.perf_counter() - started)
        positives = ", ".join(row["finding"] for row in findings if row["decision"] == "positive")
        log.info("classified %s in %.2f s: %s", uid, time.perf_counter() - t0,
                 positives or "no positive finding")

    def _worker_died(self, uid, what):
        """A task of this image stopped or hung its worker process, alone: the image is tried
        again from the start (something else may have killed it: the OOM killer, an operator)
        and quarantined the MAX_WORKER_DEATHS-th time."""
        with self.lock:
            deaths = self.worker_deaths[uid] = self.worker_deaths.get(uid, 0) + 1
        if deaths < MAX_WORKER_DEATHS:
            log.warning("%s %s stopped or hung its worker process: tried again (%d of %d)",
                        what, uid, deaths, MAX_WORKER_DEATHS)
            self.todo.put(uid)
            return
        self._quarantine_image(uid, f"{what} it stopped or hung its worker process "
                                    f"{deaths} times (a crash in a decoder, or over "
                                    f"--worker-memory-mb {self.memory_mb:g})")

    def _quarantine_image(self, uid, reason):
        """The report saying it was not classified into the outbox, the image into the
        quarantine with its reason, then out of the inbox: in that order, each durable, so that
        a full disk never loses it (_later)."""
        path = self.spool.image(uid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # gone already (quarantined, then the inbox not written)
            data = None
        except OSError as e:  # unreadable now (EIO, too many open files): tried again later
            self._later(uid, SpoolError(f"{path}: cannot read ({os_reason(e)})"))
            return
        try:
            # its report in the outbox first, then the quarantine entry, then out of the inbox:
            # a kill or a full disk between them redoes the image, rewriting the same report
            # (same folder, same UID), never a second quarantine entry after a first
            answered = data is not None and self._answer_unclassified(uid, reason)
            self.spool.put_quarantine(data, uid, reason)
            self.spool.finish(uid)  # no record: the same UID sent again is tried again
        except (SpoolError, NoWorkers) as e:
            self._later(uid, e)
            return
        except Stopping:  # left in the inbox: finished at the next start
            return
        self._forget(uid)
        with self.lock:
            self.accepted_at.pop(uid, None)  # its results' times are not a classified image's
        self.trouble("spool", None)
        self.count("quarantined")
        if answered:
            self.count("unclassified_reported")
        log.warning("quarantined %s: %s%s", uid, reason,
                    "; a report saying so goes to the destination" if answered else "")

    def _answer_unclassified(self, uid, reason):
        """The report saying that the image was not classified, and why, into the outbox (in a
        worker: its header is read there); whether it is. An image whose header cannot be read,
        or not encoded into a report, has none: the log and the quarantine say why."""
        try:
            self.workers.run(unclassified_in_worker, uid, reason)
        except (WorkerDied, DataError, RuntimeError) as e:
            log.warning("%s: no report that it was not classified (%s)", uid,
                        "its worker stopped" if isinstance(e, WorkerDied) else one_line(e))
            return False
        for ready in self.results_ready:  # sent now
            ready.set()
        return True

    def _forget(self, uid):
        """The image is finished: nothing of it is kept in memory (but when it was accepted,
        until its results are sent: the total time)."""
        with self.lock:
            self.queued.discard(uid)
            self.worker_deaths.pop(uid, None)
            self.retries.pop(uid, None)
            self.records.pop(uid, None)

    def _later(self, uid, error):
        """The spool cannot take this image's results, done/ record or quarantine entry (a
        full or failing disk: SpoolError), or no worker process can start (NoWorkers): the
        image stays in the inbox, accepted, and is tried again from the start after the retry
        backoff, for as long as it takes; GET /health says why meanwhile."""
        if self.stopping.is_set():  # finished at the next start
            return
        with self.lock:
            tries = self.retries[uid] = self.retries.get(uid, 0) + 1
        delay = min(self.settings.retry_max_seconds,
                    self.settings.retry_seconds * 2 ** min(tries - 1, 20))
        what = "spool" if isinstance(error, SpoolError) else "workers"
        self.trouble(what, str(error))
        log.error("%s for %s (%s): it stays in %s, tried again in %.1f s",
                  "cannot write to the spool" if what == "spool" else "no worker process",
                  uid, error, self.spool.inbox, delay)
        timer = threading.Timer(delay, self.todo.put, (uid,))
        timer.daemon = True
        timer.start()
