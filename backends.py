"""The models infer.py runs, and what they read: the exported OpenVINO FP32/INT8 models (compiled
for this CPU, torch never imported) and a PyTorch checkpoint on any device; the model
directory's manifest; batched ten-crop prediction for each.

    backend = load_openvino(model_dir, mode, read_metadata(model_dir), crop)  # or TorchModel(path)
    backend.run_all([(key, crops)], on_result)                # (n, 3, crop, crop) -> (n, K)
"""
import collections
import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common import DataError, one_line
from dataset import SkippedImage
from images import TEN_CROPS, average_crops, normalize_gray
from labels import NIH_CLASSES
from splitting import Data

MODEL_NAMES = {"fp32": "chexnet_fp32.xml", "int8": "chexnet_int8.xml"}
METADATA = "chexnet.json"
# What each --mode runs, in words (printed beside every number an evaluation gives)
BACKEND_NAMES = {"torch": "PyTorch", "fp32": "OpenVINO FP32", "int8": "OpenVINO INT8"}


class InferError(DataError):
    """Missing, mismatched or damaged model; one line."""


# ---------------------------------------------------------------------------------------------
# The model directory: what infer.sh wrote, checked against its own manifest

def read_metadata(model_dir, required=False):
    """chexnet.json as a dict ({} when there is none and it is not required)."""
    if Path(model_dir).exists() and not Path(model_dir).is_dir():
        raise InferError(f"--model-dir {model_dir}: not a directory")
    path = Path(model_dir) / METADATA
    if not path.exists():
        if required:
            raise InferError(f"{path} not found: run `bash infer.sh` to export the model first")
        return {}
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        files = meta.get("files", {})
        if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in files.items())):
            raise ValueError("'files' is not a table of file names and SHA-256 sums")
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise InferError(f"{path}: damaged model metadata ({one_line(e)}); run `bash infer.sh` "
                         "to export the model again") from None
    return meta


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_model_files(model_dir, xml, meta):
    """The .xml and .bin must be the ones this export's manifest lists: never an INT8 graph
    with FP32 weights, or a model from an export that was interrupted."""
    files = meta.get("files")
    if files is None:
        raise InferError(f"{Path(model_dir) / METADATA}: no manifest of the model files (missing, "
                         "or from an older export); run `bash infer.sh` to export again")
    for path in (xml, xml.with_suffix(".bin")):
        expected = files.get(path.name)
        if expected is None or not path.is_file() or file_digest(path) != expected:
            raise InferError(f"{path}: does not belong to the export recorded in "
                             f"{Path(model_dir) / METADATA} (changed, missing, or left by an "
                             "interrupted export); run `bash infer.sh` again")


# What an evaluation or export falls back on for a data flag that neither the command line nor
# the model's own record gives
DATA_FALLBACKS = {"data_dir": "data", "split": "auto", "resize": 256, "crop_size": 224,
                  "split_seed": 0, "keep_laterals": False}


def data_defaults(source, where="the defaults", data_dir=None, split=None, split_seed=None,
                  keep_laterals=None, resize=None, crop_size=None):
    """The splitting.Data of an evaluation or export (its split not yet resolved): each data
    flag as given (not None), else as `source` records it (the checkpoint's training flags, or
    the exported model's metadata; `where` names it), checked, else DATA_FALLBACKS'. The data
    directory the model came from is source.get('data_dir')."""
    given = {"data_dir": data_dir, "split": split, "resize": resize, "crop_size": crop_size,
             "split_seed": split_seed, "keep_laterals": keep_laterals}
    settings = {}
    for key, value in DATA_FALLBACKS.items():
        if given[key] is None:
            value = source.get(key, value)
            kind = {"data_dir": str, "split": str, "keep_laterals": bool}.get(key, int)
            usable = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if kind is int and usable:
                usable = (0 <= value < 2 ** 63) if key == "split_seed" else 0 < value <= 100_000
            if not usable:
                raise DataError(f"{where}: its {key} is {value!r}, not a usable setting; pass "
                                f"--{key.replace('_', '-')} or export the model again")
        else:
            value = given[key]
        settings[key] = value
    if settings["crop_size"] > settings["resize"]:
        raise DataError(f"--crop-size {settings['crop_size']} is larger than --resize "
                        f"{settings['resize']}")
    return Data(**settings)


# ---------------------------------------------------------------------------------------------
# Back ends

@functools.cache
def openvino_core():
    """The process's one OpenVINO Core, never released. Each Core's CPU plugin gives the main
    thread an alternate signal stack and, when released, puts back the one it found; Cores
    released in any order but the reverse of their creation leave a freed stack installed, and
    the next signal with a Python handler (Ctrl-C, torch's SIGCHLD for loader workers, the
    node's SIGTERM) then kills the process with SIGSEGV. (NNCF's own short-lived Cores, made
    and released in turn, keep this one's stack valid.)"""
    from optional import openvino
    return openvino().Core()


class OpenVINOModel:
    """An exported model compiled for this CPU: float32 (n, 3, crop, crop) crops -> (n, K)
    probabilities of its K classes. FP32 really is FP32: this CPU would otherwise silently run
    in bf16 (INFERENCE_PRECISION_HINT), which is also slower on it."""

    def __init__(self, xml, crop, crops_per_request, class_names, streams=None):
        from optional import openvino
        ov = openvino()
        self.class_names = list(class_names)
        xml = Path(xml)
        if not xml.is_file():
            raise InferError(f"{xml} not found: run `bash infer.sh` to export the model first")
        core = openvino_core()
        with open(xml, "rb") as f:  # never hand a non-IR file to OpenVINO's other frontends
            head = f.read(4096)
        if b"<net" not in head:
            raise InferError(f"{xml}: not an OpenVINO model (no <net> element); run `bash "
                             "infer.sh` to export it again")
        try:
            model = core.read_model(xml, xml.with_suffix(".bin"))
        except RuntimeError as e:
            raise InferError(f"{xml}: cannot read the model ({ov_reason(e)}); run `bash "
                             "infer.sh` to export it again") from None
        shape = model.inputs[0].get_partial_shape()
        if (len(shape) != 4 or not shape[1].is_static or shape[1].get_length() != 3
                or any(not d.is_dynamic and d.get_length() != crop for d in (shape[2], shape[3]))):
            raise InferError(f"{xml}: input shape {shape} does not take 3x{crop}x{crop} crops "
                             f"(--crop-size {crop})")
        out = model.outputs[0].get_partial_shape()
        if len(out) != 2 or out[1].is_dynamic or out[1].get_length() != len(class_names):
            raise InferError(f"{xml}: outputs {out[1] if len(out) == 2 else out}, expected "
                             f"{len(class_names)} classes")
        # The class activation maps (N, K, h, w), in models exported since they exist.
        self.has_cams = len(model.outputs) > 1 and len(model.outputs[1].get_partial_shape()) == 4
        # Static shapes compile to faster CPU kernels than the exported dynamic batch.
        model.reshape([crops_per_request, 3, crop, crop])
        config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"}
        if streams:
            config["NUM_STREAMS"] = str(streams)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as e:
            raise InferError(f"{xml}: cannot compile the model ({ov_reason(e)})") from None
        shape = list(self.compiled.outputs[0].get_shape())
        if shape != [crops_per_request, len(class_names)]:
            raise InferError(f"{xml}: gives outputs of shape {shape} for {crops_per_request} "
                             "crops: not a CheXNet export; run `bash infer.sh` again")
        self.requests = self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        self.batch = crops_per_request

    def run_all(self, batches, on_result, cams=False):
        """Feed (key, crops) pairs through `requests` asynchronous infer requests, each started
        as soon as one is free; on_result(key, probs), or with cams on_result(key, (probs,
        maps)), in order. Equal-sized requests finish in the order they started, so waiting on
        the oldest keeps them all busy, with no Python callbacks on OpenVINO's threads."""
        free = [self.compiled.create_infer_request() for _ in range(self.requests)]
        running = collections.deque()

        def finish_oldest():
            request, key = running.popleft()
            request.wait()
            probs = request.get_output_tensor(0).data.copy()
            on_result(key, (probs, request.get_output_tensor(1).data.copy()) if cams else probs)
            free.append(request)

        for key, crops in batches:
            if not free:
                finish_oldest()
            request = free.pop()
            request.start_async({0: crops})
            running.append((request, key))
        while running:
            finish_oldest()


def ov_reason(exc):
    """The informative line of an OpenVINO exception (they start with 'Exception from
    src/...cpp:NN:' lines that say only where)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()
             and not ln.strip().startswith(("[", "Exception from", "Check "))]
    return (lines[-1] if lines else type(exc).__name__)[:200]


class TorchModel:
    """The checkpoint in PyTorch: (n, 3, crop, crop) normalised crops -> (n, K) probabilities,
    on the run's device. The reference the OpenVINO models are held to."""

    def __init__(self, checkpoint, rt=None, channels_last=False, autocast=None):
        """On the CPU in this process without `rt`; else on rt's device, NHWC with
        channels_last, inside autocast() (a context factory: runtime.autocast's) if given."""
        import contextlib

        import torch  # heavy, and absent on an edge box: only --mode torch comes here

        from checkpoint import load_for_inference
        from model import WithCAM, with_sigmoid
        self.torch, self.rt, self.channels_last = torch, rt, channels_last
        self.autocast = autocast or contextlib.nullcontext
        model, self.class_names, _ = load_for_inference(checkpoint)
        self.bare = model
        self.with_cams = WithCAM(model).eval()
        self.has_cams = True
        self.model = with_sigmoid(model)
        if rt is not None:
            self.model = self.model.to(rt.device)
            if channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
        self.requests = 1

    def __call__(self, crops):
        torch = self.torch
        x = crops if isinstance(crops, torch.Tensor) else torch.from_numpy(crops)
        with torch.inference_mode():
            if self.rt is None:
                return self.model(x).numpy()
            x = x.to(self.rt.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                return self.model(x).float()

    def run_all(self, batches, on_result, cams=False):
        for key, crops in batches:
            if not cams:
                on_result(key, self(crops))
                continue
            with self.torch.inference_mode():
                probs, maps = self.with_cams(self.torch.from_numpy(crops))
            on_result(key, (probs.numpy(), maps.numpy()))


def metadata_classes(meta, model_dir):
    """The class names an export records; exports made before they were recorded are all of
    NIH's 14 (the head size is checked against them when the model is read)."""
    classes = meta.get("class_names", NIH_CLASSES)
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise InferError(f"{Path(model_dir) / METADATA}: damaged model metadata ('class_names' "
                         "is not a list of names); run `bash infer.sh` to export the model again")
    return classes


def load_openvino(model_dir, mode, meta, crop_size, images_per_request=1, streams=None):
    """The exported model of `mode` ('fp32' or 'int8'), checked against the manifest, compiled
    for requests of `images_per_request` images (10 crops each)."""
    xml = Path(model_dir) / MODEL_NAMES[mode]
    if xml.exists():
        verify_model_files(model_dir, xml, meta)
    return OpenVINOModel(xml, crop_size, TEN_CROPS * images_per_request,
                         metadata_classes(meta, model_dir), streams)


def export_id(model_dir, mode):
    """The identity of an exported model (its .xml and .bin SHA-256 sums): what operating
    points, saved predictions and reports are keyed by."""
    xml = Path(model_dir) / MODEL_NAMES[mode]
    return file_digest(xml) + file_digest(xml.with_suffix(".bin"))


def torch_checkpoint(checkpoint, meta):
    """--mode torch's checkpoint: the one given, else the one the exported model came from."""
    checkpoint = checkpoint or meta.get("checkpoint")
    if not checkpoint:
        raise InferError("--mode torch needs --checkpoint (no exported model records one)")
    return checkpoint


def import_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InferError("--mode torch needs PyTorch (pip install torch torchvision); "
                         "the fp32 and int8 modes do not") from None




# ---------------------------------------------------------------------------------------------
# Batched ten-crop prediction

def predict_openvino(backend, images, indices, crop_size, per_request, workers):
    """Ten-crop probabilities (len(indices), K) of the images, averaged over their crops, and
    which were readable. `per_request` images per infer request; decoding runs in `workers`
    threads ahead of the infer requests."""
    groups = [indices[i:i + per_request] for i in range(0, len(indices), per_request)]
    probs = np.zeros((len(indices), len(backend.class_names)), np.float32)
    readable = np.ones(len(indices), bool)

    def load(g):  # (10 * per_request, 3, crop, crop); skipped and padding slots repeat a crop
        crops = []
        for j, i in enumerate(groups[g]):
            try:
                crops.append(images.eval_crops(i, crop_size))
            except SkippedImage:
                readable[g * per_request + j] = False
                crops.append(None)
        filler = next((c for c in crops if c is not None), None)
        if filler is None:
            filler = np.zeros((TEN_CROPS, crop_size, crop_size), np.uint8)
        crops = [c if c is not None else filler for c in crops]
        crops += [filler] * (per_request - len(crops))
        return normalize_gray(np.concatenate(crops))

    def store(g, out):
        n = len(groups[g])
        probs[g * per_request:g * per_request + n] = average_crops(out[:TEN_CROPS * n])

    window = 2 * backend.requests + workers
    backend.run_all(enumerate(prefetch(load, range(len(groups)), workers, window)), store)
    return probs, readable


def prefetch(function, items, workers, window):
    """function(item) for every item in order, computed by `workers` threads at most `window`
    items ahead of the consumer: decoding keeps ahead of inference without filling memory."""
    with ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        items = iter(items)
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            for item in items:
                pending.append(pool.submit(function, item))
                break
            yield result


class TorchPredictor:
    """Batched ten-crop evaluation in PyTorch through a DataLoader with workers, on the device;
    under torchrun each rank takes every world_size-th image of a chunk and rank 0 gathers."""

    def __init__(self, checkpoint, images, rt, crop_size, batch_size=None, workers=None,
                 channels_last=False, autocast=None):
        cpu = rt.device.type == "cpu"
        self.batch_size = batch_size or (1 if cpu else 32)
        self.workers = workers
        if self.workers is None:  # PNG decoding is what keeps a GPU waiting
            local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            self.workers = 1 if cpu else max(1, min(16, (os.cpu_count() or 1) // local))
        self.model = TorchModel(checkpoint, rt, channels_last, autocast)
        self.class_names = self.model.class_names
        self.images, self.crop_size, self.rt = images, crop_size, rt

    def __call__(self, indices):
        import torch

        from dataset import collate, to_model_input
        from runtime import gather_from_ranks
        rt, size = self.rt, self.batch_size
        mine = indices[rt.rank::rt.world_size]
        batches = [mine[i:i + size] for i in range(0, len(mine), size)]
        dataset = _IndexedTenCrop(self.images, self.crop_size)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=self.workers if batches else 0,
            collate_fn=collate, pin_memory=rt.device.type == "cuda")
        positions, outputs = [], []
        for batch in loader:
            if batch is None:
                continue
            x, where = batch  # (B, 10, 1, crop, crop) uint8, (B,) list positions
            x = to_model_input(x.to(rt.device, non_blocking=True)).flatten(0, 1)
            outputs.append(average_crops(self.model(x)))
            rt.mark_step()
            positions.append(where.numpy())
        empty = np.zeros((0, len(self.class_names)), np.float32)
        probs = torch.cat(outputs).cpu().numpy() if outputs else empty
        positions = np.concatenate(positions) if positions else np.zeros(0, np.int64)
        probs, positions = gather_from_ranks(rt, probs, positions)
        out = np.zeros((len(indices), len(self.class_names)), np.float32)
        readable = np.zeros(len(indices), bool)
        slot = {i: k for k, i in enumerate(indices)}
        for p, i in zip(probs, positions):
            out[slot[int(i)]] = p
            readable[slot[int(i)]] = True
        return out, readable


class _IndexedTenCrop:
    """Ten-crop uint8 items with their list position; None for a skipped image."""

    def __init__(self, images, crop):
        self.images, self.crop = images, crop

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        import torch
        try:
            crops = self.images.eval_crops(index, self.crop)
        except SkippedImage:
            return None
        return torch.from_numpy(np.array(crops)[:, None]), index
