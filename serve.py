"""A DICOM node for the clinic: a Storage SCP that classifies every chest X-ray sent to it with
the exported OpenVINO model (INT8 by default) and sends the results back by C-STORE.

    python serve.py --model-dir models --ae-title CHEXNET --port 11112 \\
        --allow-ae PACS MODALITY1 --destination PACS@10.0.0.5:104 --spool /var/lib/chexnet

For each CR or DX image (for presentation or processing) it receives: the ten-crop prediction of
`python infer.py --mode int8 --image FILE` (the same functions, the same probabilities), a
DICOM Structured Report (highdicom) in the image's study with every finding's probability,
threshold and decision, the model's identity and a research-use-only statement, and for each
positive finding a secondary-capture heatmap (the exported model's class activation maps).

Nothing is lost: an image is written to SPOOL/inbox/ (fsync, atomic rename) before the success
status goes back; its results wait in SPOOL/outbox/ until the destination accepts them (retried
with backoff); SPOOL/done/ records every finished SOP Instance UID. After a kill -9, a restart
finishes every accepted image once: a resent image is recognised by its UID, and the results'
UIDs derive from the source UID and the model digest, so a PACS never sees two reports.
Refusals (caller not allowed, too many associations, queue full, image declared too large, not a
chest X-ray SOP class, malformed object) each get their DIMSE status and a log line; malformed
objects go to SPOOL/quarantine/ with a .txt reason. Optional HTTP: POST /predict, GET /health.

Torch is never imported: an edge box needs openvino, numpy, pillow, pydicom (+ pylibjpeg
decoders), pynetdicom, highdicom and matplotlib (heatmap colours). See docs/serve.md.
"""
import errno
import functools
import hashlib
import hmac
import io
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import unicodedata
import weakref
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

import optional

if __name__ == "__main__":  # a missing package is one line, before the imports below fail
    try:
        optional.dicom_node()
    except optional.MissingPackage as e:
        sys.exit(f"error: {e}")
# Imported here, once, before any thread: a first import racing in several threads fails
import highdicom as hd  # noqa: E402
from highdicom.frame import encode_frame
import pydicom
import pydicom.pixels  # noqa: F401
import pynetdicom
import pynetdicom.transport
from pydicom.charset import python_encoding
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pydicom.valuerep import DS

from backends import (METADATA, MODEL_NAMES, file_digest, load_openvino, metadata_classes,
                      read_metadata, with_data_defaults)
from common import (ArgumentParser, DataError, SetupError, atomic_path, exclusive_lock, one_line,
                    os_reason, positive_float, positive_int)
from images import (MAX_DECODED_BYTES, TEN_CROPS, average_crops, normalize_gray,
                    pixel_data_problem, read_dicom)

# A file path given to send_c_store is sent as it is on disk (Node._send_folder); _config is
# pynetdicom's documented settings module, its name notwithstanding
pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True

VERSION = "chexnet-serve 1.0"
log = logging.getLogger("serve")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The chest X-ray storage SOP classes this node classifies.
CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
XRAY_CLASSES = {CR: "CR", DX_PRESENTATION: "DX for presentation",
                DX_PROCESSING: "DX for processing"}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture

# DIMSE C-STORE statuses (PS3.4 B.2.3, PS3.7 C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900  # data set does not match SOP class
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
STORED_WARNINGS = (0xB000, 0xB006, 0xB007)  # stored, with coercion or elements discarded

DUL_IDLE_SECONDS = 0.005
SEND_LINGER_SECONDS = 2.0  # how long an association to the destination waits for the next result
QUICK_ACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
RECV_BYTES = 2 ** 20  # _recv
MIN_RECV_RATE = 64 * 1024  # bytes per second a PDU must arrive at, after --timeout (_recv)
MAX_PDU_BYTES = 4 * 2 ** 20  # the largest PDU the node accepts (A-ASSOCIATE: Maximum Length)
ASSOCIATE_SECONDS = 5.0  # from connecting to a complete A-ASSOCIATE-RQ (at most --timeout)
# The largest A-ASSOCIATE-RQ the node reads: a real one is a few KB (presentation contexts of
# every storage class, about 13 KB; a user identity of some KB)
MAX_REQUEST_BYTES = 256 * 1024
MAX_REFUSALS = 5  # a result the destination refuses this often goes to SPOOL/failed/
MAX_WORKER_DEATHS = 3  # times an image's task stops its worker, alone, before quarantine
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class Refused(Exception):
    """The destination answered, and refused this object."""


class ServeError(DataError):
    """A bad setting or model directory for the node; one line."""


class ResultsError(Exception):
    """Building a result failed with an OSError that is no disk's (pydicom's writer raises
    OSError for a value it cannot encode): the image's fault, not the spool's."""


class SpoolError(Exception):
    """The spool cannot be written (a full disk, a read-only or failing file system): never the
    image's fault. What was being written is not there (nothing half-written), and the image
    it was for stays in the inbox and is tried again (Node._later)."""


# ---------------------------------------------------------------------------------------------
# Durable files

def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path, data):
    """`data` at `path`, on disk before this returns: written aside, fsynced, renamed, the
    directory fsynced. Never half-written, even after kill -9 or a power cut; SpoolError where
    it cannot be written."""
    try:
        with atomic_path(path, "spool file") as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(Path(path).parent)
    except (OSError, DataError) as e:
        raise SpoolError(one_line(e) if isinstance(e, DataError) else
                         f"{path}: cannot write ({os_reason(e)})") from None


class Spool:
    """SPOOL/inbox/UID.dcm (accepted, not yet finished), outbox/UID/ (results the destination
    has not accepted yet), done/UID.json (finished: the results, or quarantined), quarantine/
    (malformed objects and why)."""

    def __init__(self, root):
        self.root = Path(root)
        self.inbox, self.outbox = self.root / "inbox", self.root / "outbox"
        self.done, self.quarantine = self.root / "done", self.root / "quarantine"
        for d in (self.inbox, self.outbox, self.done, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._quarantine_lock = threading.Lock()

    def image(self, uid):
        return self.inbox / f"{uid}.dcm"

    def is_done(self, uid):
        return (self.done / f"{uid}.json").is_file()

    def finish(self, uid, record=None):
        """Done: recorded (record) or quarantined (None: its quarantine entry is written
        already; a resend is tried again), and out of the inbox. The image leaves the inbox
        only after its record is on disk: SpoolError, and it stays, where it cannot be."""
        if record is not None:
            durable_write(self.done / f"{uid}.json",
                          (json.dumps(record, indent=1) + "\n").encode())
        try:
            os.unlink(self.image(uid))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SpoolError(f"{self.image(uid)}: cannot remove ({os_reason(e)})") from None
        try:
            fsync_dir(self.inbox)
        except OSError as e:
            raise SpoolError(f"{self.inbox}: {os_reason(e)}") from None

    def clean_leftovers(self):
        """Temp files of writes a kill interrupted (never renamed into place)."""
        for d in (self.inbox, self.done, self.outbox, self.quarantine):
            for p in d.iterdir():
                if p.name.startswith("."):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    def prune_done(self, days):
        """Delete the done/ records older than `days` (an image sent again after that is
        classified again, under the same result UIDs): how many went. A record whose results
        still wait in the outbox stays (a resend would rewrite what is being sent)."""
        cutoff, pruned = time.time() - days * 86400, 0
        for p in self.done.glob("*.json"):
            try:
                if p.stat().st_mtime < cutoff and not (self.outbox / p.stem).exists():
                    p.unlink()
                    pruned += 1
            except FileNotFoundError:
                pass
        return pruned

    def pending_images(self):
        """UIDs in the inbox, oldest first; those already done are removed."""
        found = []
        for p in self.inbox.glob("*.dcm"):
            uid = p.stem
            if self.is_done(uid):
                p.unlink()
                continue
            found.append((p.stat().st_mtime, uid))
        return [uid for _, uid in sorted(found)]

    def pending_results(self):
        """Result folders waiting, oldest first. Other threads send and remove folders while
        this lists them (the sending associations, GET /health): one gone is not waiting."""
        found = []
        for p in self.outbox.iterdir():
            try:
                if p.is_dir() and not p.name.startswith("."):
                    found.append((p.stat().st_mtime, p))
            except FileNotFoundError:
                continue
        return [p for _, p in sorted(found)]

    def put_results(self, uid, files):
        """(name, bytes) pairs -> outbox/UID/, all files or none (staged and renamed); their
        names. Each file is written as it comes, so that only one is held at a time (the
        heatmaps of an 8192x8192 image are 192 MB each, uncompressed). SpoolError, the
        staging folder removed, where they cannot be written."""
        staging, names, files = None, [], iter(files)
        try:
            staging = Path(tempfile.mkdtemp(dir=self.outbox, prefix=f".{uid}."))
            while True:
                try:  # building the next file: its errors are the results', never the spool's
                    name, data = next(files)
                except StopIteration:
                    break
                except OSError as e:
                    raise ResultsError(f"{type(e).__name__}: {one_line(e)}") from None
                with open(staging / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                names.append(name)
                del data
            fsync_dir(staging)
            target = self.outbox / uid
            if target.exists():  # a kill after the rename, before done/: the same bytes again
                shutil.rmtree(target)
            os.rename(staging, target)
            staging = None
            fsync_dir(self.outbox)
        except OSError as e:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise SpoolError(f"{self.outbox}: cannot write the results of {uid} "
                             f"({os_reason(e)})") from None
        except BaseException:  # building a heatmap failed half-way: nothing is left of them
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        return sorted(names)

    def put_quarantine(self, data, uid, reason):
        """The object (or what the caller keeps of it) and a .txt reason, written last: an
        entry is complete once its .txt is there. SpoolError (nothing left of the entry) where
        it cannot be written."""
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uid if uid and UID_RE.match(uid) else 'unknown'}"
        with self._quarantine_lock:
            n = 0
            while (self.quarantine / f"{name}-{n}.txt").exists():
                n += 1
            stem = self.quarantine / f"{name}-{n}"
            try:
                if data is not None:
                    durable_write(Path(f"{stem}.dcm"), data)
                durable_write(Path(f"{stem}.txt"), (reason + "\n").encode())
            except SpoolError:
                Path(f"{stem}.dcm").unlink(missing_ok=True)
                raise
        return stem


# ---------------------------------------------------------------------------------------------
# The model: the exported OpenVINO model with its operating points, run in one pipeline

class Stages:
    """Seconds spent in each stage of the pipeline, per image (the last WINDOW of each):
    what GET /health reports, so that where the time goes is visible on a live node."""
    WINDOW = 1000
    NAMES = ("receive", "decode", "wait", "infer", "results", "send", "total")
    MEANING = {"receive": "C-STORE handler: parse, checks, durable write",
               "decode": "decode and ten crops", "wait": "queued before inference",
               "infer": "inference (ten crops)", "results": "report and heatmaps built, written",
               "send": "C-STORE of the results to the destination, per image",
               "total": "accepted -> results accepted by the destination"}

    def __init__(self):
        self.lock = threading.Lock()
        self.samples = {name: [] for name in self.NAMES}

    def add(self, name, seconds):
        with self.lock:
            kept = self.samples[name]
            kept.append(seconds)
            if len(kept) > 2 * self.WINDOW:
                del kept[:-self.WINDOW]

    def summary(self):
        with self.lock:
            samples = {k: v[-self.WINDOW:] for k, v in self.samples.items()}
        out = {}
        for name, values in samples.items():
            if values:
                v = np.asarray(values)
                out[name] = {"images": len(v), "mean": round(float(v.mean()), 4),
                             "p50": round(float(np.percentile(v, 50)), 4),
                             "p95": round(float(np.percentile(v, 95)), 4)}
        return out


class Model:
    """The exported model as infer.py --image runs it (backends.load_openvino, one image of
    ten crops per request, images.eval_input's crops), its identity and its operating points.
    Requests come from any thread (submit); decoded crops queue for one inference thread that
    keeps every OpenVINO infer request busy while worker processes decode."""

    def __init__(self, args):
        from report import operating_points_for
        meta = read_metadata(args.model_dir, required=True)
        settings = with_data_defaults(args, meta, Path(args.model_dir) / METADATA)
        self.resize, self.crop = settings.resize, settings.crop_size
        problem = class_name_problem(metadata_classes(meta, args.model_dir))
        if problem:  # before the model is compiled
            raise ServeError(f"{Path(args.model_dir) / METADATA}: {problem}")
        # One image (ten crops) per request, as infer.py --image: identical probabilities; the
        # files are checked against the manifest.
        self.backend = load_openvino(args.model_dir, args.mode, meta, self.crop, 1, args.streams)
        self.class_names = self.backend.class_names
        xml = Path(args.model_dir) / MODEL_NAMES[args.mode]
        digests = {p.name: file_digest(p) for p in (xml, xml.with_suffix(".bin"))}
        model_id = "".join(digests.values())  # infer.py's key of the operating points
        self.points, why = operating_points_for(args.model_dir, args.mode, model_id,
                                                self.class_names)
        if self.points is None and not args.no_operating_points:
            raise ServeError(f"{why} (or pass --no-operating-points to report probabilities "
                             "without decisions)")
        import openvino
        self.identity = {
            "name": f"CheXNet {meta.get('arch', 'densenet121')} OpenVINO {args.mode.upper()}",
            "mode": args.mode, "files": digests,
            "sha256": hashlib.sha256(model_id.encode()).hexdigest(),
            "exported": meta.get("exported"), "version": VERSION,
            "runtime": f"OpenVINO {openvino.get_version()}",
            "classes": self.class_names}
        self.rule = args.rule
        self.thresholds = None
        if self.points is not None:
            from report import thresholds_of
            self.thresholds = thresholds_of(self.points, args.rule)
        self.stages = Stages()
        self.ready = queue.Queue(maxsize=2 * self.backend.requests + args.workers)
        self.thread = threading.Thread(target=self._infer_forever, name="infer", daemon=True)
        self.thread.start()

    def submit(self, crops, done):
        """Queue one image's ten crops; done(probs (K,) float64, maps (10, K, h, w) or None)
        runs on the inference thread when its request finishes (keep it short)."""
        self.ready.put((crops, done, time.perf_counter()))

    def predict(self, crops):
        """Blocking: (probabilities, maps) of one image's ten crops."""
        future = Future()
        self.submit(crops, lambda p, m: future.set_result((p, m)))
        return future.result()

    def _infer_forever(self):
        callbacks = {}

        def batches():
            key = 0
            item = self.ready.get()
            while True:
                crops, callback, queued = item
                started = time.perf_counter()
                self.stages.add("wait", started - queued)
                callbacks[key] = callback, started
                yield key, crops
                key += 1
                try:  # a burst keeps every request busy; alone, an image waits 50 ms more
                    item = self.ready.get(timeout=0.05)
                except queue.Empty:
                    return

        def on_result(key, out):
            probs, maps = out if self.backend.has_cams else (out, None)
            # as infer.py classify_images: the mean of the ten crops, then float64
            p = np.asarray(average_crops(probs[:TEN_CROPS])[0], dtype=np.float64)
            callback, started = callbacks.pop(key)
            self.stages.add("infer", time.perf_counter() - started)
            try:
                callback(p, None if maps is None else maps[:TEN_CROPS])
            except Exception:  # a callback never stops the pipeline
                log.exception("result handler failed")

        while True:
            try:
                self.backend.run_all(batches(), on_result, cams=self.backend.has_cams)
            except Exception:
                log.exception("inference failed")
                for callback, _ in callbacks.values():
                    try:
                        callback(None, None)
                    except Exception:
                        pass
                callbacks.clear()

    def findings(self, probs):
        """[{finding, probability, threshold, decision, calibrated_probability}]."""
        calibrated = None
        if self.points is not None:
            from report import calibrate
            calibrated = calibrate(probs[None], self.points)[0]
        rows = []
        for k, name in enumerate(self.class_names):
            row = {"finding": name, "probability": float(probs[k])}
            t = None if self.thresholds is None else float(self.thresholds[k])
            if t is None or not math.isfinite(t):
                row.update(threshold=None, decision=None)
            else:
                row.update(threshold=t, decision="positive" if probs[k] >= t else "negative")
            if calibrated is not None:
                row["calibrated_probability"] = float(calibrated[k])
            rows.append(row)
        return rows


# ---------------------------------------------------------------------------------------------
# Results as DICOM: a Structured Report and secondary-capture heatmaps

def class_name_problem(names):
    """Why the model's class names cannot name findings in the reports and heatmaps, or None:
    each is a report's text value, a heatmap's Image Comments and the title burnt into it (one
    line, not empty), and names its heatmap's UID (no two alike)."""
    for name in names:
        if not name.strip():
            return f"class name {name!r} is empty"
        if any(unicodedata.category(c)[0] == "C" for c in name):
            return f"class name {name!r} holds a control character"
    repeated = sorted({name for name in names if names.count(name) > 1})
    return f"class names repeat: {', '.join(repeated)}" if repeated else None


def result_uid(source_uid, model_digest, what, root):
    """Deterministic: the same image and model always give the same result UIDs, so a result
    sent twice (after a kill) is one instance at the PACS."""
    from pydicom.uid import generate_uid
    return generate_uid(prefix=root, entropy_srcs=[source_uid, model_digest, what])


def _code(value, meaning):
    from pydicom.sr.coding import Code
    return Code(value, "99CHEXNET", meaning)


DECISION_CODES = {"positive": codes.SCT.Present, "negative": codes.SCT.Absent}


def sr_content(source, findings, identity, points_note):
    """The report's content tree (highdicom): the findings, the model, the source image."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    items = [
        hd.sr.TextContentItem(_code("RUO", "Intended use"),
                              "RESEARCH USE ONLY - NOT FOR DIAGNOSIS. Not a medical device; "
                              "findings must not be used for clinical decisions.", contains),
        hd.sr.TextContentItem(codes.DCM.AlgorithmName, identity["name"], contains),
        hd.sr.TextContentItem(codes.DCM.AlgorithmVersion,
                              f"{identity['version']}; model sha256 {identity['sha256']}; "
                              f"exported {identity['exported']}; {identity['runtime']}", contains),
        hd.sr.TextContentItem(_code("MODEL-FILES", "Model files SHA-256"), "; ".join(
            f"{k} {v}" for k, v in identity["files"].items()), contains),
        hd.sr.TextContentItem(_code("OPERATING-POINTS", "Operating points"), points_note,
                              contains),
        _source_item(source),
    ]
    for row in findings:
        group = hd.sr.ContainerContentItem(_code("FINDING-RESULT", "Finding result"),
                                           relationship_type=contains)
        children = [
            hd.sr.TextContentItem(codes.DCM.Finding, row["finding"], contains),
            hd.sr.NumContentItem(_code("PROBABILITY", "Probability"), row["probability"], unit,
                                 relationship_type=contains)]
        if row.get("calibrated_probability") is not None:
            children.append(hd.sr.NumContentItem(
                _code("CALIBRATED", "Calibrated probability (Platt)"),
                row["calibrated_probability"], unit, relationship_type=contains))
        if row["decision"] is None:
            children.append(hd.sr.TextContentItem(_code("DECISION", "Decision"),
                                                  "not determined (no threshold)", contains))
        else:
            children += [
                hd.sr.NumContentItem(_code("THRESHOLD", "Decision threshold"), row["threshold"],
                                     unit, relationship_type=contains),
                hd.sr.CodeContentItem(_code("DECISION", "Decision"),
                                      DECISION_CODES[row["decision"]], contains)]
        group.ContentSequence = children
        items.append(group)
    return _root(items)


def _source_item(source):
    return hd.sr.ImageContentItem(codes.DCM.SourceOfMeasurement, source.SOPClassUID,
                                  source.SOPInstanceUID,
                                  relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _root(items):
    root = hd.sr.ContainerContentItem(_code("CXR-AI", "Chest X-ray AI classification"))
    root.ContentSequence = items
    return root


def result_charset(source, texts):
    """The results' Specific Character Set: the source's where it is one character set
    without code extensions that highdicom knows and that holds `texts` (the model's class
    names: else they would reach the PACS as '?'), else UTF-8 (pydicom has decoded the source's
    names already). highdicom refuses some sets the standard allows, such as the Japanese
    images' ['', 'ISO 2022 IR 87'], and would fail the results."""
    value = source.get("SpecificCharacterSet")
    known = {v.value for v in hd.SpecificCharacterSetValues}
    if value is not None and not (isinstance(value, str) and value in known
                                  and not value.startswith("ISO 2022")):
        return "ISO_IR 192"
    codec = "ascii" if value is None else python_encoding.get(value)
    try:
        for text in texts:
            text.encode(codec)  # no codec (None): TypeError, UTF-8
    except (UnicodeEncodeError, TypeError, LookupError):
        return "ISO_IR 192"
    return value


def _sr_document(source, content, identity, uid_root):
    """A Comprehensive SR in the source's study (patient and study copied by highdicom)."""
    digest = identity["sha256"]
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=content,
        specific_character_set=result_charset(source, identity["classes"]),
        series_instance_uid=result_uid(source.StudyInstanceUID, digest, "sr-series", uid_root),
        series_number=9001, sop_instance_uid=result_uid(source.SOPInstanceUID, digest, "sr",
                                                        uid_root),
        instance_number=1, manufacturer="CheXNet toolkit", is_complete=True,
        series_description="CheXNet AI findings - research use only", software_versions=VERSION)


def build_sr(source, findings, identity, points_note, uid_root):
    """The report, every part of it built by highdicom (ReportWriter's reference)."""
    return _encoded(_sr_document(source, sr_content(source, findings, identity, points_note),
                                 identity, uid_root))


CONTENT_SEQUENCE = 0x0040A730  # (0040,A730): the report's content tree


def _head(document):
    """The document's encoding without its content tree (removed from it), None where an
    element follows the tree (then the tree's bytes cannot simply follow the rest)."""
    del document.ContentSequence
    return None if max(document.keys()) > CONTENT_SEQUENCE else _encoded(document)


class ReportWriter:
    """build_sr's report (the same elements and values) in a tenth of its time.

    highdicom builds and checks every content item, copies the tree twice and pydicom encodes
    it element by element: 0.12-0.25 s of Python per report on this CPU, the node's largest
    cost per image after inference. Every report of one model has the same content tree but
    for the source image's reference and the values, so the tree is built once by highdicom
    (sr_content) with a distinct stand-in in every place that changes, and encoded once (a
    template) with its sequences and items of undefined length (PS3.5 7.5.2: delimited, so a
    value of another length changes no length around it). A report is then highdicom's
    document for this source (patient, study, evidence; the content tree is its last element)
    followed by the template's bytes with this image's values, each encoded by pydicom.
    Findings of another shape (a threshold or calibration more or less) or another character
    set get their own template; a template whose stand-ins are not each found is not used
    (build_sr is)."""
    MAX_TEMPLATES = 16

    def __init__(self, identity, points_note, uid_root):
        self.identity, self.points_note, self.uid_root = identity, points_note, uid_root
        self.lock = threading.Lock()
        self.templates = {}
        # a CODE item's value, as in the template (its sequence and item of undefined length)
        self.decisions = {}
        for decision, code in DECISION_CODES.items():
            ds = pydicom.Dataset()
            ds.ConceptCodeSequence = [hd.sr.CodedConcept.from_code(code)]
            _undefined_lengths(ds["ConceptCodeSequence"])
            self.decisions[decision] = _elements(ds)

    def __call__(self, source, findings):
        key = (str(source.get("SpecificCharacterSet")), tuple(
            (row["finding"], row["threshold"], row["decision"] is None,
             row.get("calibrated_probability") is not None) for row in findings))
        with self.lock:
            template = self.templates.get(key)
        if template is None:
            template = self._template(source, findings)
            with self.lock:
                if len(self.templates) >= self.MAX_TEMPLATES:
                    self.templates.clear()
                self.templates[key] = template
        head = template and _head(_sr_document(source, _root([_source_item(source)]),
                                               self.identity, self.uid_root))
        if not head:
            return build_sr(source, findings, self.identity, self.points_note, self.uid_root)
        parts = [head]
        for chunk, slot in template:
            parts.append(chunk)
            if slot is not None:
                parts.append(self._slot(slot, source, findings))
        return b"".join(parts)

    def _slot(self, slot, source, findings):
        what, k = slot
        if what == "decision":
            return self.decisions[findings[k]["decision"]]
        ds = pydicom.Dataset()
        if what == "image":
            ds.ReferencedSOPClassUID = source.SOPClassUID
            ds.ReferencedSOPInstanceUID = source.SOPInstanceUID
        else:  # a NUM content item's value, as highdicom's NumContentItem writes a float
            ds.FloatingPointValue = findings[k][what]
            ds.NumericValue = DS(findings[k][what], auto_format=True)
        return _elements(ds)

    def _template(self, source, findings):
        """[(bytes, slot or None)] of the encoded content tree; [] where it cannot be."""
        stand_in = iter(range(7, 10 ** 6))  # n / 3 > 2: never a probability or threshold
        rows = []
        for row in findings:
            row = dict(row, probability=next(stand_in) / 3)
            if row.get("calibrated_probability") is not None:
                row["calibrated_probability"] = next(stand_in) / 3
            if row["decision"] is not None:
                row["decision"] = "positive"
            rows.append(row)
        document = _sr_document(source, sr_content(source, rows, self.identity,
                                                   self.points_note), self.identity,
                                self.uid_root)
        _undefined_lengths(document["ContentSequence"])
        whole = _encoded(document)
        head = _head(document)
        content = whole[len(head or b""):]
        if head is None or not content.startswith(b"\x40\x00\x30\xa7SQ"):
            log.warning("report template not usable (the content tree is not the document's "
                        "last element): every report is built by highdicom")
            return []
        slots = [("image", None)]
        for k, row in enumerate(rows):
            slots.append(("probability", k))
            if row.get("calibrated_probability") is not None:
                slots.append(("calibrated_probability", k))
            if row["decision"] is not None:
                slots.append(("decision", k))
        template, at = [], 0
        for slot in slots:
            encoded = self._slot(slot, source, rows)
            found = content.find(encoded, at)
            if found < 0 or (slot[0] != "decision" and content.count(encoded) != 1):
                log.warning("report template not usable (%s of finding %s): every report is "
                            "built by highdicom", *slot)
                return []
            template.append((content[at:found], slot))
            at = found + len(encoded)
        template.append((content[at:], None))
        return template


def _undefined_lengths(sequence):
    sequence.is_undefined_length = True
    for item in sequence.value:
        item.is_undefined_length_sequence_item = True
        for element in item:
            if element.VR == "SQ":
                _undefined_lengths(element)


def _elements(ds):
    """The encoding of ds's elements, as in the reports (Explicit VR Little Endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def build_heatmaps(source, overlays, identity, uid_root, syntax):
    """Secondary captures of the overlays [(k, (H, W, 3) uint8)] of one image, in the source's
    study, encoded in `syntax`: JPEG Baseline (lossy, and marked so; a 1024x1024 overlay is
    0.2 MB instead of 3, which the node writes, sends and the PACS stores once per positive
    finding) or Explicit VR Little Endian (uncompressed). Yields (k, the encoded file).

    highdicom builds the first; the others differ from it only in the instance's own attributes
    (UID, number, comment, pixels), which are put into it in turn: 5 ms less each. So all
    overlays are of one size, the first's."""
    digest = identity["sha256"]
    jpeg = syntax == JPEGBaseline8Bit
    sc = None
    for k, rgb in overlays:
        name = identity["classes"][k]
        uid = result_uid(source.SOPInstanceUID, digest, f"sc-{name}", uid_root)
        if sc is None:
            sc = _heatmap_dataset(source, rgb, uid, identity, uid_root, syntax)
        elif rgb.shape != (sc.Rows, sc.Columns, 3):
            raise ValueError(f"overlay {k} is {rgb.shape}, the first {(sc.Rows, sc.Columns, 3)}")
        else:
            frame = encode_frame(
                rgb, transfer_syntax_uid=syntax, bits_allocated=sc.BitsAllocated,
                bits_stored=sc.BitsStored, photometric_interpretation=sc.PhotometricInterpretation,
                pixel_representation=sc.PixelRepresentation,
                planar_configuration=sc.PlanarConfiguration)
            sc.PixelData = encapsulate([frame]) if jpeg else frame
            sc.SOPInstanceUID = uid  # save_as puts it in the file meta too
        sc.InstanceNumber = k + 1
        if jpeg:  # PS3.3 C.7.6.1.1.5: a lossy image says so, for good (also once decompressed)
            sc.LossyImageCompressionRatio = f"{rgb.nbytes / len(sc.PixelData):.4g}"
        sc.ImageComments = f"{name}: class activation map; research use only, not for diagnosis"
        yield k, _encoded(sc)


def _heatmap_dataset(source, rgb, uid, identity, uid_root, syntax):
    jpeg = syntax == JPEGBaseline8Bit
    # The overlay lies on the source's pixels: its orientation is the source's, when known
    orientation = [str(v) for v in (source.get("PatientOrientation") or [])]
    known = len(orientation) == 2 and all(v in ("A", "P", "L", "R", "H", "F")
                                          for v in orientation)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, bits_allocated=8,
        photometric_interpretation="YBR_FULL_422" if jpeg else "RGB",
        coordinate_system="PATIENT", patient_orientation=orientation if known else ("L", "F"),
        series_instance_uid=result_uid(source.StudyInstanceUID, identity["sha256"], "sc-series",
                                       uid_root),
        series_number=9002, sop_instance_uid=uid, instance_number=1,
        manufacturer="CheXNet toolkit", transfer_syntax_uid=syntax,
        specific_character_set=result_charset(source, identity["classes"]),
        series_description="CheXNet heatmaps - research use only",
        software_versions=VERSION)
    if not known:
        sc.PatientOrientation = None  # type 2: empty, unknown (never guessed)
    sc.BurnedInAnnotation = "YES"
    if jpeg:
        sc.LossyImageCompression = "01"
        sc.LossyImageCompressionMethod = "ISO_10918_1"
    return sc


def uncompressed(ds):
    """A result as a destination that takes no compressed transfer syntax gets it: a JPEG
    heatmap decoded to RGB (still marked lossy), under its own SOP Instance UID (one result,
    however it travels: a resend after a crash must replace it, not add a second)."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    return ds


def _encoded(ds):
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The node

class Node:
    def __init__(self, args, model, spool):
        self.args, self.model, self.spool = args, model, spool
        self.lock = threading.Lock()
        self.queued = set()  # UIDs accepted and not finished
        self.counters = {k: 0 for k in ("received", "duplicates", "processed", "quarantined",
                                        "results_sent", "send_failures", "refused")}
        self.refusals = {}
        self.refused = {}  # result folder -> times the destination refused it
        self.stages = model.stages
        self.destination_tls = destination_tls(args)
        self.accepted_at = {}  # UID -> when it was accepted (this run), for the total
        self.worker_deaths = {}  # UID -> times its task stopped its worker process, alone
        self.todo = queue.Queue()
        # one per sending association: each waits on its own (a shared event, cleared by one,
        # would leave the others asleep)
        self.results_ready = [threading.Event() for _ in range(args.send_associations)]
        self.stopping = threading.Event()
        self.post = ThreadPoolExecutor(args.result_workers, thread_name_prefix="results")
        if model.points is None:
            self.points_note = "none: no decisions (probabilities only)"
        else:
            self.points_note = (f"{args.rule} rule, thresholds and Platt calibration chosen on "
                                f"{model.points.get('images')} validation images")
        # the largest image's pixels, decoded, lie in a worker several times over (stored, as
        # the lookup table's index, displayed); 2 GB more for its libraries' allocations
        self.memory_mb = args.worker_memory_mb or 2048 + 8 * args.max_image_mb
        self.workers = Workers(args.workers + args.result_workers, {
            "spool": str(spool.root), "identity": model.identity, "points_note": self.points_note,
            "uid_root": args.uid_root, "resize": model.resize, "crop": model.crop,
            "heatmaps": not args.no_heatmaps, "log_level": args.log_level.upper(),
            "memory_bytes": int(self.memory_mb * 2 ** 20),
            "heatmap_syntax": (ExplicitVRLittleEndian if args.uncompressed_heatmaps
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

    # -- receiving -------------------------------------------------------------------------

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
        if depth >= self.args.max_queue:
            return self.refuse("queue full", OUT_OF_RESOURCES, caller,
                               f"{depth} images waiting, --max-queue {self.args.max_queue}")
        data = event.encoded_dataset(include_meta=True)
        try:
            ds = read_dataset(data, self.args.max_image_mb)
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
            self._quarantine_refused(_without_pixels(ds), uid, f"{problem} (from {caller})")
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
        return image_problem(ds, self.args.max_image_mb)

    # -- processing ------------------------------------------------------------------------

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
            if not positive or self.args.no_heatmaps:
                maps = None
            try:
                names = self.workers.run(results_in_worker, uid, source, findings,
                                         None if maps is None else maps[:, positive], positive,
                                         probs)
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
        """The image into the quarantine with its reason, then out of the inbox: in that
        order, each durable, so that a full disk never loses it (_later)."""
        path = self.spool.image(uid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # gone already (quarantined, then the inbox not written)
            data = None
        except OSError as e:  # unreadable now (EIO, too many open files): tried again later
            self._later(uid, SpoolError(f"{path}: cannot read ({os_reason(e)})"))
            return
        try:
            self.spool.put_quarantine(data, uid, reason)
            self.spool.finish(uid)  # no record: the same UID sent again is tried again
        except SpoolError as e:
            self._later(uid, e)
            return
        self._forget(uid)
        with self.lock:
            self.accepted_at.pop(uid, None)  # no results will be sent
        self.trouble("spool", None)
        self.count("quarantined")
        log.warning("quarantined %s: %s", uid, reason)

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
        delay = min(self.args.retry_max_seconds,
                    self.args.retry_seconds * 2 ** min(tries - 1, 20))
        what = "spool" if isinstance(error, SpoolError) else "workers"
        self.trouble(what, str(error))
        log.error("%s for %s (%s): it stays in %s, tried again in %.1f s",
                  "cannot write to the spool" if what == "spool" else "no worker process",
                  uid, error, self.spool.inbox, delay)
        timer = threading.Timer(delay, self.todo.put, (uid,))
        timer.daemon = True
        timer.start()

    def trouble(self, what, reason):
        """GET /health's problems: what -> {since, reason} while it lasts (reason None: over)."""
        with self.lock:
            if reason is None:
                self.problems.pop(what, None)
            else:
                since = self.problems.get(what, {}).get("since", time.strftime(
                    "%Y-%m-%dT%H:%M:%S%z"))
                self.problems[what] = {"since": since, "reason": reason}

    # -- sending ---------------------------------------------------------------------------

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
                delay = min(self.args.retry_max_seconds,
                            self.args.retry_seconds * 2 ** min(failures - 1, 20))
                try:
                    waiting = f"{len(self._pending(i))} result sets waiting"
                except OSError as listing:  # the outbox itself unreadable: said, not raised
                    waiting = f"outbox unreadable: {one_line(listing)}"
                self.trouble("destination", f"sending results to {self.args.destination} "
                                            f"failed: {one_line(e)[:200]}")
                log.warning("sending results to %s failed (%s): %s, retry in %.1f s",
                            self.args.destination, one_line(e), waiting, delay)
                self.stopping.wait(delay)

    def _pending(self, i):
        """The result folders in the outbox that sending association i sends."""
        share = len(self.results_ready)
        return [f for f in self.spool.pending_results()
                if zlib.crc32(f.name.encode()) % share == i]

    def _send(self, i):
        """One association to the destination: the results of sending association i, and those
        that come while it is open, as long as images are waiting or in progress and the next
        result comes within SEND_LINGER_SECONDS (at most half --timeout). In a burst results
        come one at a time: an association each cost both ends a negotiation, here two
        threads and in DCMTK's storescp a process (279 associations for 300 images, 0.02
        CPU-s per image here); with nothing queued it is released at once (an open
        association's thread polls every 1 ms)."""
        from pynetdicom import AE, evt
        ae_title, host, port = self.args.destination
        ae = AE(ae_title=self.args.ae_title)
        for sop_class in (SR_CLASS, SC_CLASS):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # JPEG heatmaps in a context of their own: a destination that accepts it takes them as
        # written; one that does not still accepts the context above (_send_folder decompresses)
        if not self.args.uncompressed_heatmaps:
            ae.add_requested_context(SC_CLASS, JPEGBaseline8Bit)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.args.timeout
        assoc = ae.associate(host, port, ae_title=ae_title, tls_args=self.destination_tls,
                             evt_handlers=[(evt.EVT_PDU_SENT, quick_ack)])
        if not assoc.is_established:
            raise ConnectionError("association not accepted (destination down, or it refuses "
                                  f"calling AE {self.args.ae_title}"
                                  + (", or the TLS handshake failed: its certificate and "
                                     "--destination-tls-ca, or --tls-cert"
                                     if self.destination_tls else "")
                                  + (", or it accepts none of the node's presentation contexts:"
                                     " SR and SC in Explicit or Implicit VR Little Endian"
                                     if assoc.is_aborted else "") + ")")
        try:
            tuned(assoc)
            self._tell_about_heatmaps(assoc)
            ready, linger = self.results_ready[i], min(SEND_LINGER_SECONDS, self.args.timeout / 2)
            idle_since = time.monotonic()
            while not self.stopping.is_set() and assoc.is_established:
                ready.clear()  # before the listing: a result written after it sets it again
                pending = self._pending(i)
                for folder in pending:
                    try:
                        self._send_folder(assoc, folder)
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
            if assoc.is_established:
                assoc.release()

    def _tell_about_heatmaps(self, assoc):
        """Once each: a destination that takes no Secondary Capture at all (every heatmap will
        end in SPOOL/failed/), or no JPEG (every heatmap is decompressed, 3 MB)."""
        if self.args.no_heatmaps:
            return
        syntaxes = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == SC_CLASS}
        if not syntaxes:
            what = ("accepts no Secondary Capture: heatmaps cannot be sent and go to failed/ "
                    "(--no-heatmaps sends reports only)")
        elif JPEGBaseline8Bit not in syntaxes and not self.args.uncompressed_heatmaps:
            what = ("does not accept JPEG Baseline: each heatmap is decompressed before it is "
                    "sent (--uncompressed-heatmaps writes them so)")
        else:
            return
        with self.lock:
            told = what in self.told
            self.told.add(what)
        if not told:
            log.warning("%s %s", self.args.destination, what)

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
                        "until the node restarts", self.args.destination, failure)
        raise ConnectionError(f"{path.name} of {folder.name}: JPEG heatmap failed ({failure}), "
                              "tried again")

    def _send_folder(self, assoc, folder):
        t0 = time.perf_counter()
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
        folder.rmdir()
        self.refused.pop(folder.name, None)
        now = time.perf_counter()
        self.stages.add("send", now - t0)
        with self.lock:
            accepted = self.accepted_at.pop(folder.name, None)
        if accepted is not None:  # accepted in this run (not one finished from before)
            self.stages.add("total", now - accepted)
        log.info("results of %s sent to %s", folder.name, self.args.destination)

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
                  MAX_REFUSALS, self.args.destination, reason, target)

    # -- health ----------------------------------------------------------------------------

    def health(self):
        with self.lock:
            spool_trouble = "spool" in self.problems
        with self.lock:
            waiting = bool(self.retries) or bool(self.records)
        if spool_trouble and not waiting:  # a receive refused, since then nothing to do: the
            try:  # disk may have been freed meanwhile (an image waiting says it when it can)
                stat = os.statvfs(self.spool.root)
                if (stat.f_bavail * stat.f_frsize >= 2 * self.args.max_image_mb * 2 ** 20
                        and stat.f_favail >= 1000):  # room for the largest image, its results
                    self.trouble("spool", None)
            except OSError:
                pass
        with self.lock:
            counters, refusals, queued = dict(self.counters), dict(self.refusals), len(self.queued)
            problems = {k: dict(v) for k, v in self.problems.items()}
        return {"status": "degraded" if problems else "ok", "problems": problems,
                "ae_title": self.args.ae_title, "model": self.model.identity,
                "rule": self.args.rule if self.model.points is not None else None,
                "queues": {"inbox": queued, "outbox": len(self.spool.pending_results()),
                           "quarantine": len(list(self.spool.quarantine.glob("*.txt")))},
                "counters": counters, "refusals": refusals,
                "seconds": {"per_image": self.stages.summary(), "stages": Stages.MEANING}}


# ---------------------------------------------------------------------------------------------
# Worker processes: decoding and results out of the node's interpreter lock. In one process
# their Python work (pydicom, highdicom, Pillow) held the lock ~0.05 s per image, a ceiling of
# ~20 images/s whatever the cores, and with heatmaps one results thread bound the node with
# CPU idle. The node's process keeps the network, the spool's bookkeeping and inference
# (OpenVINO runs without the lock).

class WorkerDied(Exception):
    """A task stopped or hung its worker process twice: in the pool, then alone in a new
    one."""


class Stopping(Exception):
    """The node is stopping: the task was not run (its image stays in the inbox)."""


class NoWorkers(Exception):
    """New worker processes cannot start (memory, process limits): the image waits in the
    inbox and is tried again, never quarantined for it."""


class Workers:
    """A pool of `n` worker processes (spawned: nothing of the node's state, its open files or
    the spool's lock, goes with them), each set up once with `settings` (worker_setup).

    Every process is started by one thread of the node's that lives as long as the node (the
    spawner), because each worker asks the kernel to kill it when that thread ends
    (PR_SET_PDEATHSIG, worker_setup): then no worker outlives the node, however it ends, even
    one stuck in a decoder that never lets its own threads run."""
    WATCH_SECONDS = 2.0
    # No task takes this long (the largest image, 8192x8192, decodes in 1.5 s; 14 heatmaps of
    # a 4k image take about 10): one that does hangs, or its pool does (below)
    TASK_SECONDS = 120.0

    def __init__(self, n, settings):
        import multiprocessing
        self.n, self.settings = n, settings
        self.context = multiprocessing.get_context("spawn")
        self.lock, self.alone = threading.Lock(), threading.Lock()
        self.replacing = threading.Lock()  # one replacement of the pool at a time
        self.stopped = False
        self.gone = weakref.WeakSet()  # pools abandoned (_abandon)
        self.pools = weakref.WeakSet()  # every pool started, the lone ones too (shutdown)
        self.spawner = ThreadPoolExecutor(1, thread_name_prefix="spawn")
        # multiprocessing's resource tracker, a helper process started with this process's -W
        # options, would warn of "leaked semaphore objects" at every stop: the node exits
        # without waiting for its pool (see __main__), and the tracker frees them
        sys.warnoptions.append("ignore:resource_tracker:UserWarning")
        try:
            self.pool = self._start(n)
        except NoWorkers as e:
            raise ServeError(str(e)) from None

    def _start(self, n):
        """A pool of n processes, each started and ready (imports done), by the spawner;
        NoWorkers where they cannot start (or are not ready within TASK_SECONDS)."""
        return self.spawner.submit(self._start_now, n).result()

    def _start_now(self, n):
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(n, mp_context=self.context, initializer=worker_setup,
                                   initargs=(os.getpid(), self.settings))
        self.pools.add(pool)
        # CPython starts a process at a submit that finds none idle: n tasks that outlast
        # the submits start all n here, in this thread, and none is started later
        try:
            for ready in [pool.submit(time.sleep, 0.2) for _ in range(n)]:
                ready.result(timeout=self.TASK_SECONDS)
        except Exception as e:  # out of memory or processes, a setup that hangs; or stopping
            self._abandon(pool)
            raise NoWorkers(f"worker processes cannot start ({type(e).__name__}: "
                            f"{one_line(e)[:120]})") from None
        return pool

    def run(self, function, *args):
        """function(*args) in a worker process. A process that stops (a crash in a decoder,
        the kernel's OOM killer) takes every task of the pool with it, and one that hangs
        (a task over TASK_SECONDS) holds it: the pool is replaced and the task tried again
        alone in a process of its own, one such task at a time; WorkerDied if it stops or
        hangs that one too (then most likely the task is the cause, not another's).
        Stopping once shutdown() has begun (whatever it interrupts: the image waits);
        NoWorkers where new processes cannot start (the image waits too)."""
        from concurrent.futures import CancelledError
        from concurrent.futures.process import BrokenProcessPool
        while True:
            with self.lock:
                if self.stopped:
                    raise Stopping()
                pool = self.pool
            if pool in self.gone:  # abandoned, and no new pool could start yet
                self._replace(pool)
                continue
            try:
                future = pool.submit(function, *args)
            except BrokenProcessPool:
                break
            except RuntimeError:  # shut down meanwhile: replaced by another task, or stopping
                if self.stopped:
                    raise Stopping() from None
                if self.pool is pool and pool not in self.gone:
                    raise  # the interpreter is exiting
                continue
            try:
                return self._wait(pool, future)
            except (BrokenProcessPool, CancelledError):  # cancelled: by shutdown()
                if self.stopped:
                    raise Stopping() from None
                break
        self._replace(pool)
        with self.alone:
            try:
                alone = self._start(1)
            except NoWorkers:
                if self.stopped:
                    raise Stopping() from None
                raise
            try:
                return self._wait(alone, alone.submit(function, *args))
            except (BrokenProcessPool, CancelledError, RuntimeError):
                # shutdown() stops the lone pool too: then the image waits for the next start
                if self.stopped:
                    raise Stopping() from None
                raise WorkerDied() from None
            finally:
                self._abandon(alone)

    def _replace(self, pool):
        """A new pool for one that broke or hangs (by the first task to notice; the others
        wait for it). Started without holding self.lock, so that shutdown() never waits for
        processes that are slow to start; NoWorkers where they cannot."""
        with self.replacing:
            with self.lock:
                if self.stopped:
                    raise Stopping()
                if self.pool is not pool:  # replaced meanwhile
                    return
                if pool not in self.gone:
                    log.warning("a worker process stopped or hangs: %d new ones", self.n)
                    self._abandon(pool)
            new = self._start(self.n)
            with self.lock:
                if self.stopped:
                    self._abandon(new)
                    raise Stopping()
                self.pool = new

    def _abandon(self, pool):
        """Stop a pool's processes, waiting for nothing: a worker killed while it wrote its
        result to the pool's pipe leaves the pool's reader waiting for the rest forever, and
        the other workers waiting for the pipe's lock (CPython's ProcessPoolExecutor never
        learns that it broke); a hung task holds its process."""
        self.gone.add(pool)
        # the pool's processes: CPython keeps them in _processes (no public handle), which
        # shutdown() empties
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            try:
                process.kill()
            except Exception:  # gone already
                pass

    def _wait(self, pool, future):
        """The future's result; BrokenProcessPool if its pool broke or was abandoned, or the
        task ran over TASK_SECONDS (then its pool is abandoned: it or the task hangs)."""
        from concurrent.futures import TimeoutError
        from concurrent.futures.process import BrokenProcessPool
        deadline = time.monotonic() + self.TASK_SECONDS
        while True:
            try:
                return future.result(timeout=self.WATCH_SECONDS)
            except TimeoutError:
                # CPython 3.11 can also lose a future submitted just as a broken pool is torn
                # down (terminate_broken clears the work items without the submit lock)
                if getattr(pool, "_broken", False) or pool in self.gone:
                    raise BrokenProcessPool("the task's pool broke") from None
                if time.monotonic() > deadline:
                    log.warning("a task ran over %.0f s: its worker processes are stopped",
                                self.TASK_SECONDS)
                    self._abandon(pool)
                    raise BrokenProcessPool("the task ran over its time") from None

    def shutdown(self):
        """No task starts after this; the workers are stopped, a lone one too (the node exits
        without their tasks: those images stay in the inbox)."""
        with self.lock:
            self.stopped = True
            for pool in list(self.pools):
                self._abandon(pool)


_work = {}  # in a worker process: its settings, spool and report writer (worker_setup)


def worker_setup(node_pid, settings):
    # A worker outlives no node, however the node ends (kill -9 included): it would write into
    # the next node's spool. The kernel kills it when the node's thread that started it (the
    # spawner, Workers) ends; where that is not available (not Linux) a thread watches.
    if not die_with_parent() or os.getppid() != node_pid:
        def watch():
            while os.getppid() == node_pid:
                time.sleep(0.2)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    setup_logging(settings["log_level"])
    _work.update(settings, spool=Spool(settings["spool"]), report=ReportWriter(
        settings["identity"], settings["points_note"], settings["uid_root"]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the node, which stops these
    if settings["heatmaps"]:
        import cam  # noqa: F401
        from matplotlib import colormaps  # noqa: F401
    # One report for a stand-in image, so that the first images of a burst do not wait for
    # highdicom's tables of the standard (loaded once per process) and the report template of
    # images without a character set: 0.27 s idle, several times that under load (images in
    # another character set build theirs at the first one, 5-10 ms more)
    stand_in = pydicom.Dataset()
    stand_in.SOPClassUID, stand_in.Modality = DX_PRESENTATION, "DX"
    stand_in.SOPInstanceUID = stand_in.StudyInstanceUID = stand_in.SeriesInstanceUID = "1.2.3"
    with_type2(stand_in)
    try:
        _work["report"](stand_in, settings["stand_in_findings"])
    except Exception as e:  # only a head start: the first image then pays for it
        log.warning("warming up the report writer failed: %s", one_line(e))
    if settings.get("memory_bytes"):
        limit_memory(settings["memory_bytes"])


def die_with_parent():
    """Ask the kernel to SIGKILL this process when the thread that started it ends (Linux's
    PR_SET_PDEATHSIG); whether it could."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def limit_memory(budget):
    """At most `budget` bytes of address space more than this process holds now (set up, its
    libraries loaded): a decoder that allocates what a hostile stream asks for fails with
    MemoryError (or, in C++, aborts its process: a WorkerDied) instead of taking the host's
    memory. A limit on address space, not on what is resident: it binds whatever allocates."""
    import resource
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = size + budget
        resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY
                                                else min(soft, hard), hard))
    except (OSError, ValueError, StopIteration) as e:  # not Linux: the size checks only
        log.warning("cannot limit the worker's memory: %s", one_line(e))


def in_worker(function):
    """A worker's task: its errors come back to the node as DataError (the input's fault: a
    MemoryError too, under the worker's limit), SpoolError (the spool's) or RuntimeError with
    the message (never an exception the node cannot unpickle, which would break the pool)."""
    @functools.wraps(function)
    def task(*args):
        try:
            return function(*args)
        except (DataError, SpoolError):
            raise
        except MemoryError:
            raise DataError(f"it needs more memory than a worker may take (--worker-memory-mb "
                            f"{(_work.get('memory_bytes') or 0) / 2 ** 20:g})") from None
        except Exception as e:
            raise RuntimeError(f"{type(e).__name__}: {one_line(e)}") from None
    return task


@in_worker
def decode_in_worker(path, header=True):
    """(ten crops (10, crop, crop) uint8, as images.eval_gray; the DICOM header, or None
    without `header`) of an image file."""
    from images import eval_gray
    gray = eval_gray(path, _work["resize"], _work["crop"])
    return gray, with_type2(pydicom.dcmread(path, stop_before_pixels=True)) if header else None


# The results copy the source's patient and study (PS3.3 C.7.1.1, C.7.2.1): these are type 2,
# present but possibly empty; de-identified images often leave them out altogether, and
# real ones hold values the standard does not allow (a sex 'U', a year for a date), which
# highdicom refuses: the results would never be built
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")
SEX_VALUES = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F"}


def with_type2(ds):
    """The header as the results copy it: each TYPE2 attribute present, as text with the
    standard's VR, empty where the source lacks it or holds a value the standard does not allow
    there (said in a log line: the results still come, with that attribute empty). An element
    the source sent with another VR (a Study ID as US, a name as OB, an empty sequence) is made
    again with the right one: pydicom would write the wrong one, or fail. The source's own
    file is not changed."""
    from pydicom.valuerep import DA, TM
    changed = []
    for keyword in TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
            continue
        element = ds[keyword]
        try:
            value = ds[keyword].value
            if ds[keyword].VM > 1:  # one person, one date: the first of several
                value = value[0]
        except Exception:  # a value pydicom cannot even read
            value = None
        text = "" if value is None or isinstance(value, (bytes, bytearray, list)) or \
            ds[keyword].VR in ("SQ", "OB", "OW", "UN") else str(value).strip()
        if keyword == "PatientSex":
            fixed = SEX_VALUES.get(text.upper(), "")
        elif keyword.endswith("Date") and text:
            try:
                fixed = text if len(text) == 8 and DA(text) is not None else ""
            except ValueError:
                fixed = ""
        elif keyword.endswith("Time") and text:
            try:
                fixed = text if TM(text) is not None else ""
            except ValueError:
                fixed = ""
        elif keyword in ("StudyID", "AccessionNumber"):  # SH: at most 16 characters
            fixed = text if len(text) <= 16 else ""
        elif keyword == "PatientID":  # LO: at most 64
            fixed = text if len(text) <= 64 else ""
        else:  # the two person names
            fixed = text
        if fixed != text or str(ds[keyword].value) != text:
            changed.append(f"{keyword} {str(element.value)[:40]!r} ({element.VR}) -> {fixed!r}")
        del ds[keyword]
        setattr(ds, keyword, fixed)  # the dictionary's VR
    if changed:
        log.info("%s: values the standard does not allow, as the results carry them: %s",
                 ds.get("SOPInstanceUID", "?"), ", ".join(changed))
    return ds


@in_worker
def results_in_worker(uid, source, findings, maps, positive, probs):
    """The report, and a heatmap per positive finding where `maps` (10, len(positive), h, w)
    are given, written to the outbox: their file names."""
    identity = _work["identity"]

    def files():  # one at a time, each written before the next is built
        yield "0-sr.dcm", _work["report"](source, findings)
        if maps is not None:
            overlays = _overlays(_work["spool"].image(uid), probs, maps, positive, identity,
                                 _work["resize"], _work["crop"])
            for k, data in build_heatmaps(source, overlays, identity, _work["uid_root"],
                                          _work["heatmap_syntax"]):
                yield f"1-sc-{k:02d}.dcm", data
    return _work["spool"].put_results(uid, files())


def _overlays(path, probs, maps, positive, identity, resize, crop):
    """(k, (H, W, 3) uint8) heatmap overlays at the image's resolution (cam.py)."""
    from cam import registered_overlay, tencrop_heatmap
    from images import load_gray, shorter_to
    gray = np.asarray(load_gray(path))
    # At the resized image's size: registered_overlay scales the colours to the X-ray's
    heat = tencrop_heatmap(maps, shorter_to(gray.shape[::-1], resize)[::-1], crop)
    for j, k in enumerate(positive):
        title = (f"{identity['classes'][k]}  p = {probs[k]:.3f}  (CAM, "
                 f"{identity['mode']}; red = most weight) RESEARCH USE ONLY")
        yield k, registered_overlay(gray, heat[j], title)


def read_dataset(data, max_image_mb):
    """The data set of a received object (bytes of a DICOM file), parsed up to its end (a
    truncated object fails here, pydicom's error); images.read_dicom's DataError for a deflate
    bomb (it would be inflated in the node's own process)."""
    ds = read_dicom(data, max_image_mb * 2 ** 20)
    ds.get("PixelData")
    return ds


def image_problem(ds, max_image_mb):
    """(problem, status) of a header's image attributes: present, their declared size (rows x
    columns x frames x samples x bytes) within the limit, uncompressed pixel data complete,
    compressed pixel data declaring that same image in its own stream and not cut short
    (images.pixel_data_problem). Nothing is decoded: a decompression bomb is refused by what
    it declares, in the DICOM header or in its codestream."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as e:
        return f"image attributes missing or invalid ({one_line(e)[:80]})", DOES_NOT_MATCH
    if min(rows, columns, frames, samples, bits) <= 0 or "PixelData" not in ds:
        return "no image (Rows/Columns/Pixel Data)", DOES_NOT_MATCH
    declared = rows * columns * frames * samples * -(-bits // 8)
    if declared > max_image_mb * 2 ** 20:
        return (f"declared image {columns}x{rows}x{frames} frames x {bits} bits = "
                f"{declared / 2 ** 20:.0f} MiB over --max-image-mb {max_image_mb:g}",
                OUT_OF_RESOURCES)
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is not None and not syntax.is_compressed:
        have = len(ds.PixelData)
        if have < declared:
            return f"pixel data truncated ({have} of {declared} bytes)", DOES_NOT_MATCH
    problem = pixel_data_problem(ds)
    if problem:
        return problem, DOES_NOT_MATCH
    return None, SUCCESS


def _without_pixels(ds):
    """The object's encoding without its pixels (None where even that cannot be encoded: the
    quarantine then keeps the reason alone)."""
    try:
        ds = ds.copy()
        for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if key in ds:
                del ds[key]
        return _encoded(ds)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# DICOM server (pynetdicom)

def start_dicom(node, args):
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEG2000,
                             JPEG2000Lossless, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                             RLELossless)
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification
    use_node_reads()
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                JPEGLosslessSV1, JPEG2000Lossless, JPEG2000, RLELossless]
    ae = AE(ae_title=args.ae_title)
    # Every storage class is accepted at association, so that a sender learns per object
    # (0x0122) that only CR and DX are classified, not by a failed association.
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax,
                                 syntaxes if cx.abstract_syntax in XRAY_CLASSES
                                 else [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context(Verification)
    ae.maximum_associations = args.max_associations
    # Senders may send an image in a few large PDUs, not pynetdicom's default 16 KB ones: each
    # PDU costs Python work in the receiving thread (a 2 MB image: 15 ms of CPU -> 12.5)
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    # the A-ASSOCIATE-RQ is whole when pynetdicom sees the connection (Doorman): nothing to
    # wait for, and a connection that fails then does not hold its slot for --timeout
    ae.acse_timeout = min(args.timeout, ASSOCIATE_SECONDS)
    if args.allow_ae:
        ae.require_calling_aet = args.allow_ae
    ae.require_called_aet = True  # a sender must call this node by its AE title

    def on_rejected(event):
        caller = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        # the words of the rejection sent (A-ASSOCIATE-RJ's source and reason), not a guess
        sent = event.assoc.acceptor.primitive
        reason = (getattr(sent, "result_source", None), getattr(sent, "diagnostic", None))
        if reason == (0x01, 0x03):
            why = "calling AE title not in --allow-ae"
        elif reason == (0x01, 0x07):
            called = getattr(event.assoc.requestor.primitive, "called_ae_title", "?")
            why = f"called AE title {str(called).strip()[:16]!r} is not {args.ae_title!r}"
        elif reason == (0x03, 0x02):
            why = f"more than --max-associations {args.max_associations}"
        else:
            why = f"rejected (source {reason[0]}, reason {reason[1]})"
        log.warning("refused association from %s: %s", caller, why)
        with node.lock:
            node.counters["refused"] += 1
            node.refusals[why] = node.refusals.get(why, 0) + 1

    ssl_context = tls_context(args)
    handlers = [(evt.EVT_C_STORE, node.handle_store), (evt.EVT_REJECTED, on_rejected),
                (evt.EVT_CONN_OPEN, lambda event: tuned(event.assoc)),
                (evt.EVT_PDU_SENT, quick_ack)]
    server = ae.start_server((args.host, args.port), block=False, evt_handlers=handlers,
                             ssl_context=ssl_context)
    node.doorman = Doorman(server, min(args.timeout, ASSOCIATE_SECONDS), node)
    # a burst of connections is queued by the kernel, not refused (socketserver listens with
    # a backlog of 5)
    server.socket.listen(128)

    # pynetdicom does each TLS handshake in its one accepting thread, with no timeout: a
    # connection that never says hello held up every other sender. The handshake is the
    # doorman's, without blocking. (A connection in the moment between start_server and this
    # line, before the node says it listens, still gets pynetdicom's handshake.) Out of file
    # descriptors, the accepting thread pauses instead of spinning on the listening socket.
    def get_request():
        try:
            client, address = server.socket.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.warning("cannot accept a connection: %s", os_reason(e))
                time.sleep(0.2)
            raise
        if ssl_context is None:
            return client, address
        return ssl_context.wrap_socket(client, server_side=True,
                                       do_handshake_on_connect=False), address
    server.get_request = get_request
    node.ae = ae
    return server


class Doorman:
    """Connections wait here, before pynetdicom sees them, until their request is there.

    pynetdicom counts every open connection against --max-associations from the moment it is
    accepted, and holds it until --timeout when the peer says nothing, one byte, garbage, or
    resets: 20 such connections held every slot, and no sender got through. Here a
    connection becomes an association (a pynetdicom thread, a slot) only once:
    - plain DICOM: its whole A-ASSOCIATE-RQ (PDU type 1, at most MAX_REQUEST_BYTES) is in the
      socket's buffer and pynetdicom's own decoder reads it (peeked at, not read: pynetdicom
      reads it again); garbage, a reset, a close or another PDU closes the connection;
    - TLS: its handshake is done (here, without blocking: with --tls-ca the peer's certificate
      checked) and its first bytes after it have come; the request then has 5 s (_recv).
    A connection not that far within `seconds` is closed; when LIMIT wait, the oldest is
    closed to let a new one in, so a sender is always heard. The waiting cost nothing: the
    kernel wakes the selector only once the bytes still missing are there (SO_RCVLOWAT). One
    thread owns the selector (the accepting thread only queues new connections to it);
    connections are handed over through socketserver's process_request, the standard hook."""
    LIMIT = 256
    SAY_EVERY = 10.0  # seconds between two log lines about closed connections

    def __init__(self, server, seconds, node):
        import selectors
        self.seconds, self.node = seconds, node
        self.selector = selectors.DefaultSelector()
        self.arrived = queue.SimpleQueue()  # (socket, address) from the accepting thread
        self.waiting = {}  # socket -> (address, deadline), oldest first: the thread's own
        self.handshaken = set()  # TLS connections past their handshake
        self.closed = {}  # why -> connections closed since the last log line
        self.said = time.monotonic()
        self.failures = 0  # unexpected errors, each logged once per 10 s at most
        self.stopped = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.hand_over = server.process_request
        server.process_request = self.admit
        threading.Thread(target=self._run, name="doorman", daemon=True).start()

    def admit(self, request, address):
        """socketserver's process_request, in the accepting thread: queued, never waited on."""
        self.arrived.put((request, address))
        try:
            self.wake_w.send(b"x")
        except (BlockingIOError, OSError):  # the thread has wake-ups pending already
            pass

    def stop(self):
        self.stopped = True
        self.admit(None, None)

    def _run(self):
        while not self.stopped:
            try:
                self._step()
            except Exception:  # never the end of the thread: no sender would be heard again
                self._failed()
                time.sleep(0.1)
        for sock in list(self.waiting):
            self._close(sock, "the node is stopping")

    def _failed(self):
        self.failures += 1
        if self.failures == 1 or time.monotonic() - self.said >= self.SAY_EVERY:
            log.exception("the doorman failed (%d times); it goes on", self.failures)

    def _step(self):
        import selectors
        first = next(iter(self.waiting.values()), None)
        timeout = 1.0 if first is None else max(0.0, min(1.0, first[1] - time.monotonic()))
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.wake_r:
                try:
                    while self.wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            elif key.fileobj in self.waiting:
                try:
                    self._advance(key.fileobj)
                except Exception:  # this connection's fault or not: it goes, the rest stay
                    self._failed()
                    self._close(key.fileobj, "failed before association")
        while True:  # the connections accepted meanwhile
            try:
                sock, address = self.arrived.get_nowait()
            except queue.Empty:
                break
            if sock is None:
                continue
            if len(self.waiting) >= self.LIMIT:
                self._close(next(iter(self.waiting)), "too many connections waiting")
            try:
                sock.setblocking(False)
                self.selector.register(sock, selectors.EVENT_READ)
            except (OSError, ValueError):  # closed by the peer already
                sock.close()
                continue
            self.waiting[sock] = (address, time.monotonic() + self.seconds)
        now = time.monotonic()
        for sock, (_, deadline) in list(self.waiting.items()):
            if deadline > now:
                break
            self._close(sock, f"no whole request within {self.seconds:g} s")
        if self.closed and now - self.said >= self.SAY_EVERY:
            log.warning("closed before association: %s", "; ".join(
                f"{n} connection(s): {why}" for why, n in self.closed.items()))
            self.closed, self.said = {}, now

    def _advance(self, sock):
        """One waiting connection moved on as far as its bytes allow: handed over, closed,
        or waiting for more (the kernel told how many)."""
        import selectors
        if isinstance(sock, ssl.SSLSocket):
            if sock not in self.handshaken:
                try:
                    sock.do_handshake()
                except ssl.SSLWantReadError:
                    return self.selector.modify(sock, selectors.EVENT_READ)
                except ssl.SSLWantWriteError:
                    return self.selector.modify(sock, selectors.EVENT_WRITE)
                except (ssl.SSLError, OSError) as e:
                    return self._close(sock, f"TLS handshake failed ({type(e).__name__})")
                self.handshaken.add(sock)
                if not sock.pending():  # the request's first bytes still to come
                    return self.selector.modify(sock, selectors.EVENT_READ)
            return self._hand_over(sock)
        ready, why, missing = first_message(sock)
        if why:
            return self._close(sock, why)
        if ready:
            return self._hand_over(sock)
        # woken again only once `missing` bytes are there (or at the end of the connection)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, missing)

    def _hand_over(self, sock):
        address, _ = self.waiting.pop(sock)
        self._forget(sock)
        try:
            if not isinstance(sock, ssl.SSLSocket):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            sock.setblocking(True)
            self.hand_over(sock, address)
        except Exception as e:  # the server is shutting down, or the peer gone
            log.warning("cannot start an association: %s", one_line(e))
            sock.close()

    def _forget(self, sock):
        self.handshaken.discard(sock)
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _close(self, sock, why):
        self.waiting.pop(sock, None)
        self._forget(sock)
        try:
            sock.close()
        except OSError:
            pass
        self.closed[why] = self.closed.get(why, 0) + 1
        with self.node.lock:
            self.node.counters["refused"] += 1
            self.node.refusals[why] = self.node.refusals.get(why, 0) + 1


PEEK_BYTES = 32 * 1024  # of a larger request, what must be there before it is handed over
# (under what the kernel lets SO_RCVLOWAT ask for: half the receive buffer)


def first_message(sock):
    """(whether a plain connection's A-ASSOCIATE-RQ is here whole, why the connection must be
    closed or None, how many bytes must be there before it is worth looking again), peeking
    at the bytes waiting (nothing is read: pynetdicom reads them). Whole: all of it, decoded
    by pynetdicom's own PDU decoder (garbage held a slot until pynetdicom's timeout); of a
    request over PEEK_BYTES (a few hundred presentation contexts), its first PEEK_BYTES, its
    AE titles read."""
    import fcntl
    import termios
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    try:
        head = sock.recv(6, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        waiting = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD,
                                                 b"\0" * 4))[0]
    except (BlockingIOError, InterruptedError):
        return False, None, 1
    except OSError as e:
        return False, f"connection failed before association ({os_reason(e)})", 0
    if not head:
        return False, "connection closed before association", 0
    if head[0] != 1:
        return False, "not an A-ASSOCIATE-RQ", 0
    if len(head) < 6:
        return False, None, 6
    length = struct.unpack(">I", head[2:6])[0]
    if length > MAX_REQUEST_BYTES:
        return False, "an association request over the size the node accepts", 0
    needed = min(6 + length, PEEK_BYTES)
    if waiting < needed:
        return False, None, needed
    data = sock.recv(needed, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    try:
        if 6 + length <= PEEK_BYTES:
            A_ASSOCIATE_RQ().decode(data)
        else:  # the fixed part: protocol version, reserved, the two AE titles
            titles = data[10:42]
            if len(titles) < 32 or not all(32 <= b < 127 for b in titles):
                raise ValueError("AE titles that are not text")
    except Exception as e:
        return False, f"a malformed A-ASSOCIATE-RQ ({type(e).__name__})", 0
    return True, None, 0


def tuned(assoc):
    """An association's socket sends each message at once (TCP_NODELAY: DICOM is request and
    response; with Nagle's algorithm each C-STORE of a report waited 40-90 ms for a delayed
    ACK), and its network thread waits 5 ms, not pynetdicom's 1 ms, before it looks at an idle
    socket again (DUL._run_loop_delay, the knob pynetdicom leaves for it): under load each
    open association's polling took CPU from decoding and inference."""
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assoc.dul._run_loop_delay = DUL_IDLE_SECONDS


def _recv(self, nr_bytes):
    """pynetdicom's AssociationSocket.recv (nr_bytes, fewer where the peer closed or is too
    slow: pynetdicom then ends the association), as the node reads the network:
    - up to 1 MiB per call instead of 4 KB: a 2 MB image took 512 calls, each giving up and
      taking back the interpreter lock, 6.3 ms of CPU per image idle (3.9 now; over TLS a
      call returns one record, 16 KB, at most);
    - a PDU over MAX_PDU_BYTES is not read at all. pynetdicom would hold any length a peer
      declares and sends, an A-ASSOCIATE request included, before the caller is checked
      against --allow-ae (P-DATA PDUs may not exceed the maximum the node declares, 4 MiB
      when it receives; no other PDU comes near it);
    - each PDU within --timeout seconds plus its length at MIN_RECV_RATE, a peer silent or
      dripping a byte now and then included (pynetdicom's sockets have no timeout: such a
      peer held its association, and its slot of --max-associations, for good); the TLS
      handshake, done at the first read (start_dicom), is under the same deadline;
    - before its association is established a peer has ASSOCIATE_SECONDS (at most --timeout)
      from its first read for everything (the TLS handshake, the A-ASSOCIATE-RQ's header and
      body), and its A-ASSOCIATE-RQ may declare at most MAX_REQUEST_BYTES: a request that
      declared 4 MiB and dripped held a slot for over a minute;
    - a TLS failure (a bad certificate, plain TCP to a TLS port) is one log line, not a
      traceback."""
    associating = (getattr(self.assoc, "is_acceptor", False)
                   and not self.assoc.is_established)
    limit = MAX_REQUEST_BYTES if associating else MAX_PDU_BYTES
    if nr_bytes > limit:
        log.warning("a peer sends a PDU of %d bytes, over the %d the node accepts%s: "
                    "connection closed", nr_bytes, limit,
                    " before association" if associating else "")
        return bytearray()
    timeout = self.assoc.network_timeout
    allowed = None if timeout is None else timeout + nr_bytes / MIN_RECV_RATE
    deadline = None if allowed is None else time.monotonic() + allowed
    if associating:  # one deadline for the whole request, from its first read (Doorman)
        if getattr(self.assoc, "_node_associate_by", None) is None:
            self.assoc._node_associate_by = time.monotonic() + min(
                timeout if timeout is not None else ASSOCIATE_SECONDS, ASSOCIATE_SECONDS)
        deadline = min(deadline or math.inf, self.assoc._node_associate_by)
        allowed = max(0.0, deadline - time.monotonic())
    previous = self.socket.gettimeout()
    data = bytearray()
    try:
        while len(data) < nr_bytes:
            if deadline is not None:
                self.socket.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.socket.recv(min(nr_bytes - len(data), RECV_BYTES))
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        if associating:
            log.warning("a peer sent %d of a PDU's %d bytes before association in %.0f s "
                        "(at most %g s from its first byte): connection closed", len(data),
                        nr_bytes, allowed, ASSOCIATE_SECONDS)
        else:
            log.warning("a peer sent %d of a PDU's %d bytes in %.0f s (--timeout, then %d "
                        "KB/s): connection closed", len(data), nr_bytes, allowed,
                        MIN_RECV_RATE // 1024)
    except ssl.SSLError as e:
        log.warning("TLS with a peer failed (%s): connection closed", one_line(e))
    except OSError as e:  # reset by the peer, or closed meanwhile: what arrived, and the end
        log.info("a peer's connection failed (%s)", os_reason(e))
    finally:
        try:
            self.socket.settimeout(previous)
        except OSError:  # closed meanwhile
            pass
    return data


def use_node_reads():
    """The node's network reads (_recv) in every pynetdicom association of this process."""
    pynetdicom.transport.AssociationSocket.recv = _recv


def quick_ack(event):
    """After each PDU the node sends, the peer's answer is acknowledged at once (TCP_QUICKACK,
    Linux), not after the 40 ms of a delayed ACK: DCMTK (storescp, Orthanc) writes a response's
    PDU header and its body separately, with Nagle's algorithm on, so the body waited for that
    ACK. Every C-STORE of a result took 48 ms against them; 11 ms with this."""
    if QUICK_ACK is not None:
        try:
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, QUICK_ACK, 1)
        except (AttributeError, OSError):  # closed meanwhile
            pass


def tls_context(args):
    """The listening side's SSL context (None: plain TCP); with --tls-ca, callers must present
    a certificate those CAs signed."""
    if not args.tls_cert:
        return None
    return _ssl_context(True, args.tls_cert, args.tls_key, args.tls_ca,
                        "--tls-cert/--tls-key/--tls-ca")


def destination_tls(args):
    """pynetdicom's tls_args for the association to the destination, or None (plain TCP): its
    certificate must be signed by --destination-tls-ca (only those CAs, not the system's)."""
    if not args.destination_tls_ca:
        return None
    cert, key = ((args.destination_tls_cert, args.destination_tls_key)
                 if args.destination_tls_cert else (args.tls_cert, args.tls_key))
    return (_ssl_context(False, cert, key, args.destination_tls_ca,
                         "--destination-tls-ca/--destination-tls-cert/--destination-tls-key"),
            args.destination.host)


def _ssl_context(server_side, cert, key, ca, flags):
    import ssl
    try:
        context = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH, cafile=ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert:
            context.load_cert_chain(cert, key)
        if ca and server_side:
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ServeError(f"{flags}: {one_line(e)}") from None
    return context


# ---------------------------------------------------------------------------------------------
# HTTP: POST /predict, GET /health (standard library only)

HTTP_CONNECTIONS = 64  # HTTP connections at once, idle ones included
RASTER_MAGIC = {b"\x89PNG\r\n\x1a\n": ".png", b"\xff\xd8\xff": ".jpg"}


def start_http(node, args):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    token = read_token(args.http_token_file)

    busy = threading.BoundedSemaphore(args.max_associations)

    class Handler(BaseHTTPRequestHandler):
        server_version = VERSION.replace(" ", "/")
        timeout = args.timeout  # a client that stops sending does not hold a thread forever

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
            deadline = time.monotonic() + args.timeout + length / MIN_RECV_RATE
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
                self.connection.settimeout(args.timeout)
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
            length, code, error = body_length(self.headers, args.max_image_mb * 2 ** 20)
            if error:
                log.warning("http %s POST /predict refused (%d): %s", self.address_string(),
                            code, error)
                self.close_connection = True  # the body, if any, is not read
                return self.reply(code, {"error": error})
            if not busy.acquire(blocking=False):
                return self.reply(503, {"error": f"more than --max-associations "
                                                 f"{args.max_associations} requests at once"})
            try:
                body = self.read_body(length)
                if body is None:
                    self.close_connection = True
                    return self.reply(408, {"error": f"the body of {length} bytes did not "
                                                     f"arrive within {args.timeout:g} s plus "
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

    server = Server((args.host, args.http_port), Handler)
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
            ds = read_dataset(body, node.args.max_image_mb)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"unreadable DICOM ({one_line(e)[:200]})") from None
        problem, _ = image_problem(ds, node.args.max_image_mb)
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
            "rule": node.args.rule if node.model.points is not None else None,
            "notice": "research use only, not for diagnosis"}


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


# ---------------------------------------------------------------------------------------------

class Destination(NamedTuple):
    ae_title: str
    host: str
    port: int

    def __str__(self):
        return f"{self.ae_title}@{self.host}:{self.port}"


def destination(text):
    """'AE@HOST:PORT' -> Destination (argparse type)."""
    import argparse
    match = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d{1,5})", text)
    if not match or not 0 < int(match.group(3)) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected AE@HOST:PORT, e.g. PACS@10.0.0.5:104")
    return Destination(match.group(1), match.group(2), int(match.group(3)))


def ae_title(text):
    import argparse
    if not 0 < len(text) <= 16 or "\\" in text or not text.isprintable() or text.strip() != text:
        raise argparse.ArgumentTypeError(f"{text!r}: an AE title is 1-16 printable characters, "
                                         "no backslash")
    return text


def port(text):
    import argparse
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: not a port (0-65535)")
    return int(text)


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", default="models", help="what infer.sh exported")
    p.add_argument("--mode", default="int8", choices=["int8", "fp32"])
    p.add_argument("--rule", default="youden", choices=["youden", "f1", "sensitivity"],
                   help="which of the operating points chosen on val decides")
    p.add_argument("--no-operating-points", action="store_true",
                   help="run without operating points (probabilities only, no decisions, no "
                        "heatmaps) where `infer.py --part val` has not chosen them")
    p.add_argument("--spool", required=True,
                   help="directory of the inbox, outbox, done records and quarantine")
    p.add_argument("--ae-title", type=ae_title, default="CHEXNET", help="this node's AE title")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=port, default=11112, help="DICOM port")
    p.add_argument("--allow-ae", type=ae_title, nargs="+", default=None,
                   help="calling AE titles allowed to send (others refused at association)")
    p.add_argument("--allow-any-ae", action="store_true",
                   help="accept any calling AE title (instead of --allow-ae)")
    p.add_argument("--destination", type=destination, default=None,
                   help="where results go by C-STORE: AE@HOST:PORT (the PACS)")
    p.add_argument("--max-associations", type=positive_int, default=8)
    p.add_argument("--max-queue", type=positive_int, default=1000,
                   help="images accepted and not yet classified; more are refused (0xA700)")
    p.add_argument("--max-image-mb", type=positive_float, default=128.0,
                   help="largest image by its header (rows x columns x frames x samples x "
                        "bytes); larger ones are refused before decoding (0xA700); at most "
                        "128")
    p.add_argument("--worker-memory-mb", type=positive_float, default=None,
                   help="address space each worker process may take beyond its start-up size, "
                        "so that a decoder misled by a hostile file fails alone (default 2048 "
                        "+ 8 x --max-image-mb)")
    p.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 1) // 4),
                   help="decoding processes (default a quarter of the cores)")
    p.add_argument("--result-workers", "--result-threads", type=positive_int, default=2,
                   help="processes building reports and heatmaps (--result-threads: its old "
                        "name)")
    p.add_argument("--send-associations", type=positive_int, default=2,
                   help="associations sending results to the destination at once (each sends "
                        "its share of the images, one result after another)")
    p.add_argument("--streams", type=positive_int, default=None,
                   help="OpenVINO CPU streams (default: the THROUGHPUT hint chooses, as infer.py)")
    p.add_argument("--no-heatmaps", action="store_true", help="send the report only")
    p.add_argument("--uncompressed-heatmaps", action="store_true",
                   help="write heatmaps uncompressed (3 MB for a 1024x1024 image), not JPEG "
                        "Baseline (about 0.2 MB, lossy and marked so; sent decompressed to a "
                        "destination that does not accept JPEG)")
    p.add_argument("--uid-root", default="1.2.826.0.1.3680043.8.498.",
                   help="UID prefix of the results (your organisation's root)")
    p.add_argument("--keep-done-days", type=positive_float, default=None,
                   help="delete done/ records (one small JSON per image: its findings) older "
                        "than this, hourly; default: keep them all")
    p.add_argument("--retry-seconds", type=positive_float, default=2.0,
                   help="first wait before resending to a destination that failed")
    p.add_argument("--retry-max-seconds", type=positive_float, default=300.0,
                   help="longest wait between resends (the backoff doubles up to it)")
    p.add_argument("--timeout", type=positive_float, default=30.0,
                   help="DICOM network timeouts, seconds")
    p.add_argument("--tls-cert", default=None, help="TLS: this node's certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="TLS: its private key (PEM)")
    p.add_argument("--tls-ca", default=None,
                   help="TLS: CA certificates; senders must then present a certificate it signed")
    p.add_argument("--destination-tls-ca", default=None,
                   help="TLS to the destination: the CA certificates its certificate must be "
                        "signed by")
    p.add_argument("--destination-tls-cert", default=None,
                   help="the certificate the node presents to the destination (default "
                        "--tls-cert; a client certificate may differ from the server's)")
    p.add_argument("--destination-tls-key", default=None, help="its private key (PEM)")
    p.add_argument("--http-port", type=port, default=None,
                   help="also serve POST /predict and GET /health on this port")
    p.add_argument("--http-token-file", default=None,
                   help="HTTP bearer token, read from this file (or $CHEXNET_HTTP_TOKEN)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = p.parse_args(argv)
    if not args.allow_ae and not args.allow_any_ae:
        p.error("argument --allow-ae: name the AE titles allowed to send (or --allow-any-ae)")
    if args.allow_ae and args.allow_any_ae:
        p.error("argument --allow-any-ae: not with --allow-ae")
    if args.max_image_mb > MAX_DECODED_BYTES / 2 ** 20:  # what every decoder refuses anyway
        p.error(f"argument --max-image-mb: at most {MAX_DECODED_BYTES / 2 ** 20:g} (an 8192x8192 "
                "16-bit image: images.MAX_DECODED_BYTES)")
    if args.uncompressed_heatmaps and args.no_heatmaps:
        p.error("argument --uncompressed-heatmaps: not with --no-heatmaps")
    if args.destination is None:
        p.error("argument --destination: where should the results go? AE@HOST:PORT")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_ca and not args.tls_cert):
        p.error("argument --tls-cert: TLS needs both --tls-cert and --tls-key")
    if bool(args.destination_tls_cert) != bool(args.destination_tls_key) or (
            args.destination_tls_cert and not args.destination_tls_ca):
        p.error("argument --destination-tls-cert: needs --destination-tls-key and "
                "--destination-tls-ca")
    if not args.uid_root.endswith(".") or not UID_RE.match(args.uid_root[:-1]) \
            or len(args.uid_root) > 32:
        p.error(f"argument --uid-root: {args.uid_root!r} is not a UID prefix ending in '.' "
                "(at most 32 characters)")
    return args


def setup_logging(level):
    """The node's log (stderr), in its process and in each worker process."""
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom logs a traceback for every undecodable image: the quarantine line says it once
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def main(argv=None):
    args = get_args(argv)
    setup_logging(args.log_level.upper())
    try:
        spool = Spool(args.spool)
    except OSError as e:
        print(f"error: --spool {args.spool}: {os_reason(e)}", file=sys.stderr)
        sys.exit(1)
    try:
        with exclusive_lock(Path(args.spool) / ".lock", "another serve.py",
                            "give each node its own --spool"):
            if not args.no_heatmaps:  # imported by the worker processes, checked here
                optional.heatmaps()
            tls_context(args)
            destination_tls(args)
            read_token(args.http_token_file)
            model = Model(args)
            spool.clean_leftovers()
            node = Node(args, model, spool)
            return run(node, args, spool)
    except (DataError, SetupError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)


def wait_for_stop():
    """Return when SIGTERM or SIGINT arrives (the main thread only).

    The handler only notes the signal, and the main thread looks every 0.5 s. Python runs a
    handler in the main thread between two bytecodes, and a wait there wakes only for signals
    the kernel delivers to the main thread: one delivered to another thread (OpenVINO's,
    pynetdicom's) never woke an untimed wait (SIGTERM unanswered about one time in ten). Nor
    may the handler take a lock: Event.set() from it, run as the main thread's timed
    Event.wait took back that Event's lock, deadlocked the node for good."""
    signals = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: signals.append(signum))
    while not signals:
        time.sleep(0.5)
    # a second signal ends the node at once, as kill -9 would (nothing accepted is lost)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def run(node, args, spool):
    pending = spool.pending_images()
    with node.lock:
        node.queued.update(pending)
    for uid in pending:
        node.todo.put(uid)
    threads = [threading.Thread(target=node.decode_forever, name=f"decode-{i}", daemon=True)
               for i in range(args.workers)]
    senders = [threading.Thread(target=node.send_forever, args=(i,), name=f"send-{i}",
                                daemon=True) for i in range(args.send_associations)]
    threads += senders
    if args.keep_done_days is not None:
        threads.append(threading.Thread(target=node.prune_forever, args=(args.keep_done_days,),
                                        name="prune", daemon=True))
    for t in threads:
        t.start()
    try:
        server = start_dicom(node, args)
    except OSError as e:
        raise ServeError(f"--port {args.port}: cannot listen ({os_reason(e)})") from None
    http = start_http(node, args) if args.http_port is not None else None
    log.info("%s listening as %s on %s:%d (%s, %d classes, model sha256 %s)%s; results to %s; "
             "%d images to finish from before", VERSION, args.ae_title, args.host,
             server.server_address[1], args.mode, len(node.model.class_names),
             node.model.identity["sha256"][:16],
             f"; HTTP on port {http.server_address[1]}" if http else "", args.destination,
             len(pending))
    if node.model.points is None:
        log.warning("no operating points: probabilities only, no decisions or heatmaps")
    wait_for_stop()
    log.info("stopping: accepted images not yet finished stay in %s and are finished at the "
             "next start", spool.inbox)
    node.stopping.set()
    for ready in node.results_ready:  # an association open for more results is released
        ready.set()
    node.doorman.stop()
    server.shutdown()
    node.workers.shutdown()
    if http is not None:
        http.shutdown()
    deadline = time.monotonic() + 2.0  # releasing takes a round trip; a hung destination is left
    for sender in senders:
        sender.join(timeout=max(0.0, deadline - time.monotonic()))
    return 0


if __name__ == "__main__":
    code = main()
    # Out at once, as after kill -9 (which loses nothing): images being decoded or their
    # results built stay in the inbox for the next start; waiting for them (the interpreter
    # joins the worker pool at exit) could take as long as a decoder that hangs.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
