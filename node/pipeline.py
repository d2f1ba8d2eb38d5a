"""The model: the exported OpenVINO model with its operating points, run in one pipeline (one
inference thread keeps every OpenVINO infer request busy), and the seconds each stage of the
node's pipeline takes."""
import hashlib
import math
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from backends import (METADATA, MODEL_NAMES, data_defaults, file_digest, load_openvino,
                      metadata_classes, read_metadata)
from common import SAMPLE_NOTICE, trained_on_sample
from images import TEN_CROPS, average_crops
from node.dicom import VERSION, ServeError
from node.logs import log
from node.results import class_name_problem


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

    def __init__(self, model_dir, mode, rule, streams, workers, no_operating_points):
        """`mode` int8 or fp32, decisions by `rule`, `streams` OpenVINO CPU streams (None: the
        THROUGHPUT hint chooses), `workers` decoding processes (they fill the queue);
        without operating points a ServeError unless `no_operating_points`."""
        from operating_points import operating_points_for
        meta = read_metadata(model_dir, required=True)
        # serve.py has none of the data flags (resize, crop size...): each is the export's
        data = data_defaults(meta, Path(model_dir) / METADATA)
        self.resize, self.crop = data.resize, data.crop_size
        problem = class_name_problem(metadata_classes(meta, model_dir))
        if problem:  # before the model is compiled
            raise ServeError(f"{Path(model_dir) / METADATA}: {problem}")
        # One image (ten crops) per request, as infer.py --image: identical probabilities; the
        # files are checked against the manifest.
        self.backend = load_openvino(model_dir, mode, meta, self.crop, 1, streams)
        self.class_names = self.backend.class_names
        xml = Path(model_dir) / MODEL_NAMES[mode]
        digests = {p.name: file_digest(p) for p in (xml, xml.with_suffix(".bin"))}
        model_id = "".join(digests.values())  # infer.py's key of the operating points
        self.points, why = operating_points_for(model_dir, mode, model_id,
                                                self.class_names)
        if self.points is None and not no_operating_points:
            raise ServeError(f"{why} (or pass --no-operating-points to report probabilities "
                             "without decisions)")
        import openvino
        self.identity = {
            "name": f"CheXNet {meta.get('arch', 'densenet121')} OpenVINO {mode.upper()}",
            "mode": mode, "files": digests,
            "sha256": hashlib.sha256(model_id.encode()).hexdigest(),
            "exported": meta.get("exported"), "version": VERSION,
            "runtime": f"OpenVINO {openvino.get_version()}",
            "classes": self.class_names,
            # every output says so, as infer.py's and main.py's do (older exports record only
            # the data directory they were exported with)
            "notice": SAMPLE_NOTICE if trained_on_sample(
                meta.get("trained_on", meta.get("data_dir"))) else None}
        self.rule = rule
        self.thresholds = None
        if self.points is not None:
            from operating_points import thresholds_of
            self.thresholds = thresholds_of(self.points, rule)
        self.stages = Stages()
        self.ready = queue.Queue(maxsize=2 * self.backend.requests + workers)
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
            from operating_points import calibrate
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


