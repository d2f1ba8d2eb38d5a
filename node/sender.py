"""The send path: the results in the outbox to the destination by C-STORE (or STOW-RS:
node/stow.py), on --send-associations associations (or HTTP connections), each sending its
share (by the source UID's hash) one result after another, and lingering while more are
coming. Accepted results leave the outbox; a network failure is retried with the backoff; a
result refused MAX_REFUSALS times goes to SPOOL/failed/; JPEG heatmaps go decompressed to a
destination that takes no JPEG, or fails on it."""
import os
import shutil
import time
import zlib
from pathlib import Path

import pydicom
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from common import one_line
from node.dicom import (OLD_SR_CLASS, PM_CLASS, SC_CLASS, SR_CLASS, STORED_WARNINGS, SUCCESS,
                        Refused)
from node.logs import log
from node.pynetdicom_internals import quick_ack, tuned
from node.results import uncompressed
from node.settings import WebDestination
from node.stow import StowLink, authorization

SEND_LINGER_SECONDS = 2.0  # how long an association to the destination waits for the next result
MAX_REFUSALS = 5  # a result the destination refuses this often goes to SPOOL/failed/


class Sender:
    """Node's send path (node/core.py: its state, and which lock guards what). Runs in the
    sending threads (send_forever, one per --send-associations); takes node.lock to see
    whether images are still in progress (queued), for the warnings given once (told), the
    JPEG failures and the accepted time."""

    def send_forever(self, i):
        """The results of sending association i of --send-associations: those whose folder name
        (the source UID) hashes to i, so that no two associations send one result."""
        failures, ready = 0, self.results_ready[i]
        while not self.stopping.is_set():
            try:
                if not self._pending(i):
                    ready.wait(5.0)
                    ready.clear()
                    continue
                self._send(i)
                failures = 0
                self.trouble("destination", None)
            except Exception as e:
                failures += 1
                self.count("send_failures")
                delay = min(self.settings.retry_max_seconds,
                            self.settings.retry_seconds * 2 ** min(failures - 1, 20))
                try:
                    waiting = f"{len(self._pending(i))} result sets waiting"
                except OSError as listing:  # the outbox itself unreadable: said, not raised
                    waiting = f"outbox unreadable: {one_line(listing)}"
                self.trouble("destination", f"sending results to {self.settings.destination} "
                                            f"failed: {one_line(e)[:200]}")
                log.warning("sending results to %s failed (%s): %s, retry in %.1f s",
                            self.settings.destination, one_line(e), waiting, delay)
                self.stopping.wait(delay)

    def _pending(self, i):
        """The result folders in the outbox that sending association i sends."""
        share = len(self.results_ready)
        return [f for f in self.spool.pending_results()
                if zlib.crc32(f.name.encode()) % share == i]

    def _send(self, i):
        """One association (or, to a STOW-RS destination, one HTTP connection: node/stow.py)
        to the destination: the results of sending association i, and those that come while
        it is open, as long as images are waiting or in progress and the next result comes
        within SEND_LINGER_SECONDS (at most half --timeout). In a burst results come one at a
        time: an association each cost both ends a negotiation, here two threads and in
        DCMTK's storescp a process (279 associations for 300 images, 0.02 CPU-s per image
        here); with nothing queued it is released at once (an open association's thread
        polls every 1 ms)."""
        link = self._open_link()
        try:
            ready = self.results_ready[i]
            linger = min(SEND_LINGER_SECONDS, self.settings.timeout / 2)
            idle_since = time.monotonic()
            while not self.stopping.is_set() and link.is_open:
                ready.clear()  # before the listing: a result written after it sets it again
                pending = self._pending(i)
                for folder in pending:
                    try:
                        self._send_folder(link, folder)
                    except Refused as e:
                        tries = self.refused.get(folder.name, 0) + 1
                        self.refused[folder.name] = tries
                        if tries < MAX_REFUSALS:
                            raise ConnectionError(str(e)) from None
                        self._give_up(folder, str(e))
                    if self.stopping.is_set():
                        return
                if pending:
                    idle_since = time.monotonic()
                    continue
                with self.lock:
                    more = bool(self.queued)  # images accepted, their results not yet written
                if not (more and ready.wait(idle_since + linger - time.monotonic())):
                    return
        finally:
            link.close()

    def _open_link(self):
        if isinstance(self.settings.destination, WebDestination):
            return StowLink(self.settings.destination, self.destination_tls,
                            authorization(self.settings.destination_token_file,
                                          self.settings.destination_basic_auth_file),
                            self.settings.timeout)
        from pynetdicom import AE, evt
        ae_title, host, port = self.settings.destination
        ae = AE(ae_title=self.settings.ae_title)
        for sop_class in (SR_CLASS, OLD_SR_CLASS, SC_CLASS) + (
                (PM_CLASS,) if self.settings.parametric_maps else ()):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # JPEG heatmaps in a context of their own: a destination that accepts it takes them as
        # written; one that does not still accepts the context above (_send_folder decompresses)
        if not self.settings.uncompressed_heatmaps:
            ae.add_requested_context(SC_CLASS, JPEGBaseline8Bit)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout
        assoc = ae.associate(host, port, ae_title=ae_title, tls_args=self.destination_tls,
                             evt_handlers=[(evt.EVT_PDU_SENT, quick_ack)])
        if not assoc.is_established:
            raise ConnectionError("association not accepted (destination down, or it refuses "
                                  f"calling AE {self.settings.ae_title}"
                                  + (", or the TLS handshake failed: its certificate and "
                                     "--destination-tls-ca, or --tls-cert"
                                     if self.destination_tls else "")
                                  + (", or it accepts none of the node's presentation contexts:"
                                     " SR and SC in Explicit or Implicit VR Little Endian"
                                     if assoc.is_aborted else "") + ")")
        try:
            tuned(assoc)
            self._tell_about_heatmaps(assoc)
            self._tell_about_parametric_maps(assoc)
        except BaseException:  # not left open behind the error
            assoc.release()
            raise
        return DimseLink(assoc)

    def _tell_about_heatmaps(self, assoc):
        """Once each: a destination that takes no Secondary Capture at all (every heatmap will
        end in SPOOL/failed/), or no JPEG (every heatmap is decompressed, 3 MB)."""
        if self.settings.no_heatmaps:
            return
        syntaxes = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == SC_CLASS}
        if not syntaxes:
            what = ("accepts no Secondary Capture: heatmaps cannot be sent and go to failed/ "
                    "(--no-heatmaps sends reports only)")
        elif JPEGBaseline8Bit not in syntaxes and not self.settings.uncompressed_heatmaps:
            what = ("does not accept JPEG Baseline: each heatmap is decompressed before it is "
                    "sent (--uncompressed-heatmaps writes them so)")
        else:
            return
        self._warn_once(what)

    def _tell_about_parametric_maps(self, assoc):
        """Once: a destination that takes no Parametric Map (--parametric-maps). Each goes to
        SPOOL/failed/ after its refusals, as a heatmap does at a destination without Secondary
        Capture; its image's report and heatmaps are sent before it (node/workers.py names the
        files in that order), so they arrive."""
        if not self.settings.parametric_maps or any(
                cx.abstract_syntax == PM_CLASS for cx in assoc.accepted_contexts):
            return
        what = ("accepts no Parametric Map: parametric maps cannot be sent and go to failed/ "
                "(without --parametric-maps none are made)")
        self._warn_once(what)

    def _warn_once(self, what):
        """A warning about the destination, logged once until the node restarts."""
        with self.lock:
            told = what in self.told
            self.told.add(what)
        if not told:
            log.warning("%s %s", self.settings.destination, what)

    def _jpeg_failed(self, path, folder, code):
        """A JPEG heatmap the destination refused or aborted on, though it accepted JPEG at
        association, and uncompressed too: tried again (not counted as a refusal); the second
        time for one heatmap, every heatmap goes decompressed from then on, until the node
        restarts (else none would arrive, nor the reports queued behind them). Once, not at
        the first failure: a destination restarting mid-send is not a destination that
        cannot take JPEG."""
        key = f"{folder.name}/{path.name}"
        failure = "no response" if code is None else f"status 0x{code:04X}"
        with self.lock:
            self.jpeg_failures[key] = self.jpeg_failures.get(key, 0) + 1
            switch = self.jpeg_failures[key] >= 2 and not self.jpeg_fails
            if switch:
                self.jpeg_fails = True
        if switch:
            log.warning("%s failed a JPEG heatmap twice (%s): heatmaps are sent decompressed "
                        "until the node restarts", self.settings.destination, failure)
        raise ConnectionError(f"{path.name} of {folder.name}: JPEG heatmap failed ({failure}), "
                              "tried again")

    def _send_folder(self, link, folder):
        t0 = time.perf_counter()
        if isinstance(link, StowLink):
            files = sorted(folder.iterdir())
            try:
                link.store(files)
            except Refused as e:
                raise Refused(f"{folder.name}: {e}") from None
            finally:  # those stored are gone from the folder, also where others were refused
                self.count("results_sent", sum(not f.exists() for f in files))
        else:
            self._c_store_folder(link.assoc, folder)
        self._sent(folder, t0)

    def _c_store_folder(self, assoc, folder):
        # Results go as written (from the file, not decoded and encoded again: that cost as
        # much as building the report) where the destination accepted their transfer syntax
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0])
                    for cx in assoc.accepted_contexts}
        for path in sorted(folder.iterdir()):
            try:
                meta = read_file_meta_info(path)
                jpeg = meta.TransferSyntaxUID == JPEGBaseline8Bit
                as_written = (meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID) in accepted \
                    and not (jpeg and self.jpeg_fails)
                if as_written:
                    status = assoc.send_c_store(path)
                else:
                    status = assoc.send_c_store(uncompressed(pydicom.dcmread(path)))
            except ValueError as e:  # the destination accepted no context for this class
                raise Refused(f"{path.name} of {folder.name}: {one_line(e)[:160]}") from None
            code = getattr(status, "Status", None)
            failed = code is None or (code != SUCCESS and code not in STORED_WARNINGS)
            if failed and jpeg and as_written and any(
                    (SC_CLASS, syntax) in accepted
                    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)):
                self._jpeg_failed(path, folder, code)
            if code is None:
                raise ConnectionError("no response to C-STORE")
            if failed:
                raise Refused(f"{path.name} of {folder.name} refused with status 0x{code:04X}")
            path.unlink()  # accepted: never sent again
            self.count("results_sent")

    def _sent(self, folder, t0):
        """Bookkeeping of a result folder the destination accepted whole."""
        folder.rmdir()
        self.refused.pop(folder.name, None)
        now = time.perf_counter()
        self.stages.add("send", now - t0)
        with self.lock:
            accepted = self.accepted_at.pop(folder.name, None)
        if accepted is not None:  # accepted in this run (not one finished from before)
            self.stages.add("total", now - accepted)
        log.info("results of %s sent to %s", folder.name, self.settings.destination)

    def _give_up(self, folder, reason):
        """A result the destination refuses every time (not a network failure) is moved to
        SPOOL/failed/ with its reason, so that it does not hold up the others."""
        target = self.spool.root / "failed" / folder.name
        target.parent.mkdir(exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.rename(folder, target)
        (Path(f"{target}.txt")).write_text(reason + "\n")
        self.refused.pop(folder.name, None)
        with self.lock:
            self.accepted_at.pop(folder.name, None)
        self.count("send_failures")
        log.error("results of %s refused %d times by %s (%s): moved to %s", folder.name,
                  MAX_REFUSALS, self.settings.destination, reason, target)


class DimseLink:
    """An association to the destination, as the send loop uses a link (node/stow.py's
    StowLink the other)."""

    def __init__(self, assoc):
        self.assoc = assoc

    @property
    def is_open(self):
        return self.assoc.is_established

    def close(self):
        if self.assoc.is_established:
            self.assoc.release()
