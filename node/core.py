"""The Node: the state the node's three paths share (receive: node/receiver.py, process:
node/processor.py, send: node/sender.py), its counters and problems, GET /health, and the
pruning of done/ records."""
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from common import os_reason
from node.logs import log
from node.pipeline import Stages
from node.processor import Processor
from node.receiver import Receiver
from node.sender import Sender
from node.tls import sending_tls
from node.workers import Workers


class Node(Receiver, Processor, Sender):
    """The DICOM node: a NodeSettings, the Model, the Spool, and what the paths share.

    An image's way: receive (Receiver.handle_store, in pynetdicom's association threads) ->
    inbox/ and `todo` -> process (Processor.decode_forever in the decoding threads: decoded
    in a worker process, inferred on the model's thread, its results built in a worker
    process from Node.post's threads: _finish) -> outbox/ and done/ -> send
    (Sender.send_forever in the sending threads) -> the destination.

    Locking. One lock, `lock`, guards the node's shared bookkeeping; it is held for a few
    dictionary or set operations at a time, never across the network, a worker's task or a
    wait (the one file system call under it: the duplicate check's look for a done/ record,
    taken with `queued` so that two senders of one image get one accepted), and no other
    lock is taken while it is held (Stages, the spool's quarantine and the workers' pools
    have their own). It guards:
      queued         UIDs accepted, not finished: receive reads it (the queue's depth,
                     duplicates) and adds (removes again where the inbox cannot take the
                     image), process removes (_forget), send reads (whether to linger),
                     serve.py's run() fills it at the start, health counts it
      accepted_at    UID -> when accepted: receive sets, process (quarantined) and send (sent,
                     given up) remove
      worker_deaths, retries, records
                     per image, the process path's own (_worker_died, _later, _finish); health
                     reads retries and records
      counters, refusals
                     count(), refuse() from every path; start_dicom's on_rejected, the Doorman
                     and the HTTP server add their refusals; health copies them
      problems       trouble() from every path; health reads it
      told, jpeg_failures, jpeg_fails
                     the send path's (jpeg_fails is read without it: a flag that only turns on)
    Not under it: `refused` (result folder -> refusals), each folder touched only by the one
    sending association whose share it is; `todo` (a Queue), `results_ready` and `stopping`
    (Events) are thread-safe; settings, model, spool, workers do not change."""

    def __init__(self, settings, model, spool):
        self.settings, self.model, self.spool = settings, model, spool
        self.lock = threading.Lock()
        self.queued = set()  # UIDs accepted and not finished
        self.counters = {k: 0 for k in ("received", "duplicates", "processed", "quarantined",
                                        "unclassified_reported", "results_sent", "send_failures",
                                        "refused")}
        self.refusals = {}
        self.refused = {}  # result folder -> times the destination refused it
        self.stages = model.stages
        self.destination_tls = sending_tls(settings)
        self.accepted_at = {}  # UID -> when it was accepted (this run), for the total
        self.worker_deaths = {}  # UID -> times its task stopped its worker process, alone
        self.todo = queue.Queue()
        # one per sending association: each waits on its own (a shared event, cleared by one,
        # would leave the others asleep)
        self.results_ready = [threading.Event() for _ in range(settings.send_associations)]
        self.stopping = threading.Event()
        self.post = ThreadPoolExecutor(settings.result_workers, thread_name_prefix="results")
        if model.points is None:
            self.points_note = "none: no decisions (probabilities only)"
        else:
            self.points_note = (f"{settings.rule} rule, thresholds and Platt calibration chosen on "
                                f"{model.points.get('images')} validation images")
        # the largest image's pixels, decoded, lie in a worker several times over (stored, as
        # the lookup table's index, displayed); 2 GB more for its libraries' allocations
        self.memory_mb = settings.worker_memory_mb or 2048 + 8 * settings.max_image_mb
        self.workers = Workers(settings.workers + settings.result_workers, {
            "spool": str(spool.root), "identity": model.identity, "points_note": self.points_note,
            "uid_root": settings.uid_root, "resize": model.resize, "crop": model.crop,
            "heatmaps": not settings.no_heatmaps, "log_level": settings.log_level.upper(),
            "parametric_maps": settings.parametric_maps,
            "memory_bytes": int(self.memory_mb * 2 ** 20),
            "heatmap_syntax": (ExplicitVRLittleEndian if settings.uncompressed_heatmaps
                               else JPEGBaseline8Bit),
            "stand_in_findings": model.findings(np.full(len(model.class_names), 0.5))})
        self.ae = self.doorman = None  # start_dicom's
        self.told = set()  # warnings about the destination, each given once
        self.jpeg_fails = False  # the destination accepts JPEG but fails on it (_jpeg_failed)
        self.jpeg_failures = {}
        self.retries = {}  # UID -> times it waited for the spool or the workers (_later)
        self.records = {}  # UID -> its done/ record, where only that could not be written
        self.problems = {}  # what -> {since, reason}: GET /health says "degraded" (trouble)

    def count(self, key, n=1):
        with self.lock:
            self.counters[key] += n

    def refuse(self, reason, status, caller, detail=""):
        with self.lock:
            self.counters["refused"] += 1
            self.refusals[reason] = self.refusals.get(reason, 0) + 1
        log.warning("refused C-STORE from %s: %s%s -> status 0x%04X", caller, reason,
                    f" ({detail})" if detail else "", status)
        return status

    def trouble(self, what, reason):
        """GET /health's problems: what -> {since, reason} while it lasts (reason None: over)."""
        with self.lock:
            if reason is None:
                self.problems.pop(what, None)
            else:
                since = self.problems.get(what, {}).get("since", time.strftime(
                    "%Y-%m-%dT%H:%M:%S%z"))
                self.problems[what] = {"since": since, "reason": reason}

    def prune_forever(self, days):
        """--keep-done-days: prune done/ at the start and then every hour."""
        while True:
            try:
                pruned = self.spool.prune_done(days)
                if pruned:
                    log.info("pruned %d done/ records older than %g days", pruned, days)
            except OSError as e:  # tried again in an hour; the node goes on
                log.warning("cannot prune %s: %s", self.spool.done, os_reason(e))
            if self.stopping.wait(3600):
                return

    def health(self):
        with self.lock:
            spool_trouble = "spool" in self.problems
        with self.lock:
            waiting = bool(self.retries) or bool(self.records)
        if spool_trouble and not waiting:  # a receive refused, since then nothing to do: the
            try:  # disk may have been freed meanwhile (an image waiting says it when it can)
                stat = os.statvfs(self.spool.root)
                if (stat.f_bavail * stat.f_frsize >= 2 * self.settings.max_image_mb * 2 ** 20
                        and stat.f_favail >= 1000):  # room for the largest image, its results
                    self.trouble("spool", None)
            except OSError:
                pass
        with self.lock:
            counters, refusals, queued = dict(self.counters), dict(self.refusals), len(self.queued)
            problems = {k: dict(v) for k, v in self.problems.items()}
        return {"status": "degraded" if problems else "ok", "problems": problems,
                "ae_title": self.settings.ae_title, "model": self.model.identity,
                "rule": self.settings.rule if self.model.points is not None else None,
                "queues": {"inbox": queued, "outbox": len(self.spool.pending_results()),
                           "quarantine": len(list(self.spool.quarantine.glob("*.txt")))},
                "counters": counters, "refusals": refusals,
                "seconds": {"per_image": self.stages.summary(), "stages": Stages.MEANING}}
