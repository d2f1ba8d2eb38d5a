"""CheXNet evaluation and inference: PyTorch (CPU, CUDA, Gaudi; every device under torchrun),
OpenVINO FP32 or OpenVINO INT8.

    python infer.py --mode int8                      # ten-crop evaluation on the test split
    python infer.py --mode torch --device cuda       # PyTorch on a GPU, batched
    torchrun --nproc_per_node=8 infer.py --mode torch  # every GPU, rank 0 gathers and writes
    python infer.py --image a.png b.png              # the 14 probabilities of each image
    python infer.py --export --checkpoint runs/chexnet/best.pt   # what infer.sh runs

Evaluation follows the CheXNet protocol: Resize(256) -> TenCrop(224) -> ImageNet normalisation,
probabilities averaged over the 10 crops; per-disease ROC-AUC; predictions to a CSV, written in
chunks as they are made: the same command after a kill continues after the last complete chunk.
Crops come from the preprocessed store of --resize when there is one (the same pixels).
The OpenVINO modes import no torch: an edge box needs openvino, numpy, pillow, scikit-learn.
The models themselves (OpenVINO, PyTorch) and their batched prediction live in backends.py.
"""
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from backends import (METADATA, MODEL_NAMES, InferError, OpenVINOModel, TorchModel,  # noqa: F401
                      TorchPredictor, file_digest, import_torch, load_openvino, predict_openvino,
                      read_metadata, torch_checkpoint)
from common import (ArgumentParser, DataError, SetupError, atomic_path, atomic_write_text,
                    exclusive_lock,
                    check_writable_file, fraction, one_line, positive_int, seed, strict_json)
from dataset import ImageList, add_data_args, check_data_dir
from images import eval_input
from labels import resolve_split, shared_classes
from metrics import mean_auc, roc_aucs
from subgroups import add_subgroup_args, demographics_for

def class_map(text):
    """'A=B,C=D' -> {'A': 'B', 'C': 'D'} (argparse type)."""
    import argparse
    pairs = [p.split("=") for p in text.split(",") if p.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'MODEL NAME=LIST NAME,...'")
    return {a.strip(): b.strip() for a, b in pairs}


# ---------------------------------------------------------------------------------------------
# Predictions in chunks: written as they are made, resumed after a kill

class Chunks:
    """<out-csv>.partial/: key.json (what is being predicted) and chunk-NNNNN.npz files, each
    the probabilities of `size` consecutive images, written atomically. The same command after a
    kill continues after the last complete chunk; a different model, list or protocol starts
    afresh. Removed once the CSV is written."""

    def __init__(self, out_csv, key, size, log):
        self.dir = Path(f"{out_csv}.partial")
        self.size = size
        old = None
        try:
            old = json.loads((self.dir / "key.json").read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        if old != key:
            if self.dir.exists():
                log(f"note: {self.dir}/ holds predictions of another model, list or protocol: "
                    "starting afresh")
                shutil.rmtree(self.dir, ignore_errors=True)
            atomic_write_text(self.dir / "key.json", json.dumps(key) + "\n", "predictions")
        self.done = 0
        while (self.dir / f"chunk-{self.done:05d}.npz").is_file():
            self.done += 1

    def write(self, index, probs, readable):
        with atomic_path(self.dir / f"chunk-{index:05d}.npz", "predictions") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, probs=probs, readable=readable)

    def read(self, index):
        try:
            with np.load(self.dir / f"chunk-{index:05d}.npz") as z:
                return z["probs"], z["readable"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{self.dir}/chunk-{index:05d}.npz: unreadable ({one_line(e)}); "
                            f"delete {self.dir}/ to predict again") from None

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class Progress:
    """A tqdm bar (images/s, ETA) on a terminal; a plain line every `every` seconds and at the
    end otherwise (the log of a batch job)."""

    def __init__(self, total, initial, enabled, every=30.0, label="predicted"):
        self.total, self.count, self.label, self.every = total, initial, label, every
        self.enabled, self.start, self.first = enabled, time.perf_counter(), initial
        self.last = self.start
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:  # an edge box may not have tqdm: plain lines then
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, unit="img", desc=label)
            except ImportError:
                pass

    def update(self, n):
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (time.perf_counter() - self.last >= self.every
                               or self.count >= self.total):
            self.last = time.perf_counter()
            rate = (self.count - self.first) / max(self.last - self.start, 1e-9)
            eta = (self.total - self.count) / rate if rate > 0 else float("nan")
            print(f"{self.label} {self.count}/{self.total} images  {rate:.1f} images/s  "
                  f"ETA {_duration(eta)}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _duration(seconds):
    if not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------
# Evaluation

def evaluation_images(args, log):
    """The list to evaluate, from the store of --resize when there is one."""
    check_data_dir(args.data_dir)
    lists = resolve_split(args.split, args.data_dir, args.split_seed,
                          getattr(args, "keep_laterals", False))
    store = None
    if not args.no_store:
        from store import open_store
        store = open_store(args.data_dir, args.resize)
        if store is not None:
            log(f"reading the preprocessed store {store.dir}/")
    images = ImageList(args.data_dir, lists[args.part], args.resize, store,
                       args.skip_bad_images, args.limit)
    return lists[args.part], images


def evaluate(args, rt=None):
    """Predict every image of the chosen part of the split (in chunks, resumable), then report."""
    is_main = rt is None or rt.is_main
    log = (lambda *a, **k: print(*a, **k)) if is_main else (lambda *a, **k: None)
    meta = read_metadata(args.model_dir)
    trained_on = getattr(args, "trained_on", None)  # set by fill_defaults
    # Another data set's evaluation (CheXpert for an NIH model...) gets its own files: it
    # never replaces those of the data set the model was trained on.
    from datasets import detect_dataset
    dataset = detect_dataset(args.data_dir)
    elsewhere = isinstance(trained_on, str) and detect_dataset(trained_on) != dataset
    args.elsewhere = f"_on_{dataset}" if elsewhere else ""
    suffix = ("" if args.part == "test" else f"_{args.part}") + args.elsewhere
    out_csv = Path(args.out_csv or Path(args.model_dir) / f"predictions_{args.mode}{suffix}.csv")
    if is_main:
        check_writable_file(out_csv, "--out-csv")
    list_path, images = evaluation_images(args, log)
    # read now: a bad demographics table stops here, before predicting
    demographics = (demographics_for(args.data_dir, args.no_subgroups, args.patients_table, log)
                    if is_main else None)
    if args.mode == "torch":
        checkpoint = torch_checkpoint(args, meta)
        predictor = TorchPredictor(checkpoint, images, args, rt)
        model_id = file_digest(checkpoint)
        model_classes = predictor.class_names
    else:
        backend = load_openvino(args, meta)
        xml = Path(args.model_dir) / MODEL_NAMES[args.mode]
        model_id = file_digest(xml) + file_digest(xml.with_suffix(".bin"))
        model_classes = backend.class_names

        def predictor(indices):
            return predict_openvino(backend, images, indices, args)

    key = {"model": model_id, "mode": args.mode, "names": hashlib.sha256(
        "\n".join(images.names).encode()).hexdigest(), "resize": args.resize,
        "crop": args.crop_size, "chunk": args.chunk_size,
        "amp": bool(getattr(args, "amp", False)) and args.amp_dtype}
    with ExitStack() as stack:
        if is_main:  # one evaluation per predictions file: they would share its chunks
            stack.enter_context(exclusive_lock(out_csv.parent / f".{out_csv.name}.lock",
                                               "another evaluation", "use another --out-csv"))
        return _predict_and_report(args, rt, is_main, log, out_csv, list_path, images,
                                   predictor, model_id, key, model_classes, demographics)


def evaluated_classes(model_classes, images, list_path, class_map):
    """(model columns, list columns, names): all of them when the model was trained on these
    classes; else the classes the model and the list share (another data set: by name, or
    through the mapping), named as the list names them."""
    if model_classes == images.class_names:
        every = list(range(len(model_classes)))
        return every, every, list(model_classes)
    pairs = shared_classes(model_classes, images.class_names, class_map)
    if not pairs:
        raise InferError(f"{list_path}: labels none of the model's classes "
                         f"({', '.join(model_classes[:4])}...); map them with --class-map "
                         "'MODEL NAME=LIST NAME,...'")
    return ([i for i, _ in pairs], [j for _, j in pairs],
            [images.class_names[j] for _, j in pairs])


def _predict_and_report(args, rt, is_main, log, out_csv, list_path, images, predictor, model_id,
                        key, model_classes, demographics=None):
    chunks = Chunks(out_csv, key, args.chunk_size, log) if is_main else None
    n = len(images)
    n_chunks = -(-n // args.chunk_size)
    done = chunks.done if is_main else 0
    if rt is not None and rt.distributed:
        import torch.distributed as dist
        shared = [done]
        dist.broadcast_object_list(shared, src=0)
        done = shared[0]
    if done:
        log(f"continuing after {min(done * args.chunk_size, n)} images already predicted "
            f"({chunks.dir}/)")
    progress = Progress(n, min(done * args.chunk_size, n), is_main)
    start = time.perf_counter()
    for c in range(done, n_chunks):
        indices = list(range(c * args.chunk_size, min(n, (c + 1) * args.chunk_size)))
        probs, readable = predictor(indices)
        if is_main:
            chunks.write(c, probs, readable)
        progress.update(len(indices))
    progress.close()
    seconds = time.perf_counter() - start
    predicted = n - min(done * args.chunk_size, n)
    if not is_main:
        return None
    parts = [chunks.read(c) for c in range(n_chunks)]
    probs = np.concatenate([p for p, _ in parts])
    readable = np.concatenate([r for _, r in parts])
    names = [nm for nm, ok in zip(images.names, readable) if ok]
    model_cols, list_cols, classes = evaluated_classes(model_classes, images, list_path,
                                                      args.class_map)
    labels, probs = images.labels[readable][:, list_cols], probs[readable][:, model_cols]
    if not np.isfinite(probs).all():
        raise InferError(f"the model gives non-finite probabilities on {list_path}")
    from report import (
        build_report,
        calibrate,
        choose_operating_points,
        operating_points_for,
        save_operating_points,
        summary,
        write_report,
    )
    # Chosen on another data set's val: kept under their own key, beside the model's own
    key_of_points = args.mode + getattr(args, "elsewhere", "")
    points, why = operating_points_for(args.model_dir, key_of_points, model_id, classes)
    if points is None and key_of_points != args.mode:  # the model's own, if the classes fit
        points, why = operating_points_for(args.model_dir, args.mode, model_id, classes)
    notes = []
    if classes != model_classes:
        notes.append(f"note: {len(classes)} of the model's {len(model_classes)} classes are "
                     f"labelled in {list_path}: " + ", ".join(
                         model_classes[i] + ("" if model_classes[i] == c else f" = {c}")
                         for i, c in zip(model_cols, classes)))
    if args.part == "val":  # thresholds and calibration are chosen here, never on test
        chosen = choose_operating_points(labels, probs, model_id, list_path,
                                         args.target_sensitivity, classes)
        where = save_operating_points(args.model_dir, key_of_points, chosen)
        notes.append(f"operating points (thresholds by rule, Platt calibration) chosen on these "
                     f"{len(names)} val images: {where}")
        points = chosen if args.calibrated else None
    elif points is None:
        notes.append(f"note: {why}")
    if args.calibrated and points is None:
        raise InferError(f"--calibrated: {why}")
    written = calibrate(probs, points) if args.calibrated else probs
    atomic_write_text(out_csv, "Image Index," + ",".join(classes) + "\n" + "".join(
        nm + "," + ",".join(f"{p:.6f}" for p in row) + "\n" for nm, row in zip(names, written)),
        "predictions")
    chunks.remove()
    report = build_report(names, labels, probs, points if args.part == "test" else None,
                          args.n_boot, args.boot_seed, args.calibrated, classes,
                          demographics=demographics, mode=args.mode,
                          part=args.part, list=str(list_path), predictions=str(out_csv))
    skipped = n - len(names)
    print(f"mode {args.mode}: {len(names)} {args.part} images of {list_path}"
          + (f" ({skipped} unreadable skipped)" if skipped else ""))
    print(summary(report))
    if predicted:
        print(f"throughput: {predicted / seconds:.1f} images/s, {10 * predicted / seconds:.1f} "
              f"crops/s (end to end, decoding included); {predicted} images predicted now in "
              f"{seconds:.1f} s")
    for note in notes:
        print(note)
    print(f"predictions: {out_csv}" + (" (Platt-calibrated)" if args.calibrated else ""))
    for path in write_report(out_csv, report, labels, probs,
                             points if args.part == "test" else None, args.calibrated,
                             figures=not args.no_figures, class_names=classes):
        print(f"report: {path}")
    aucs = roc_aucs(labels, probs)
    return {"aucs": aucs, "mean_auc": mean_auc(aucs), "probs": written, "names": names,
            "seconds": seconds, "report": report}


def classify_images(args):
    """Each image's 14 probabilities (ten-crop), most likely first; positive / negative by the
    operating points chosen on val when there are some for this model and mode."""
    from report import calibrate, operating_points_for, thresholds_of
    meta = read_metadata(args.model_dir)
    if args.mode == "torch":
        checkpoint = torch_checkpoint(args, meta)
        backend, model_id = TorchModel(checkpoint), file_digest(checkpoint)
    else:
        backend = load_openvino(args, meta)
        xml = Path(args.model_dir) / MODEL_NAMES[args.mode]
        model_id = file_digest(xml) + file_digest(xml.with_suffix(".bin"))
    classes = backend.class_names
    points, why = operating_points_for(args.model_dir, args.mode, model_id, classes)
    if args.calibrated and points is None:
        raise InferError(f"--calibrated: {why}")
    width = max(20, max(map(len, classes)) + 2)
    for path in args.image:
        crops = np.concatenate([eval_input(path, args.resize, args.crop_size)]
                               * args.images_per_request)
        result = {}
        backend.run_all([(0, crops)], lambda key, out: result.update(p=out[:10].mean(0)))
        probs = np.asarray(result["p"], dtype=np.float64)
        if not np.isfinite(probs).all():
            raise InferError(f"{path}: the model gives non-finite probabilities")
        shown = calibrate(probs[None], points)[0] if args.calibrated else probs
        print(f"{path}:")
        for k in np.argsort(-probs):
            line = f"  {classes[k]:<{width}}{shown[k]:.4f}"
            if points is not None:
                t = thresholds_of(points, args.rule)[k]
                line += (f"  {'positive' if probs[k] >= t else 'negative'} (threshold "
                         f"{calibrate(np.array([[t] * len(classes)]), points)[0, k] if args.calibrated else t:.4f})"
                         if np.isfinite(t) else "  n/a (no threshold)")
            print(line)
    if points is None:
        print(f"note: {why}")
    else:
        print(f"thresholds: {args.rule} rule, chosen on {points['images']} val images")
    if args.cam:
        from cam import write_cams
        positive = None if points is None else (
            lambda probs: probs >= np.nan_to_num(thresholds_of(points, args.rule), nan=2.0))
        for path in write_cams(backend, args.image, args, args.cam, positive):
            print(f"heatmap: {path}")


def localize(args):
    """The localization benchmark (cam.py) for this mode's model, as a table and a JSON."""
    from cam import format_localization
    from cam import localize as run
    meta = read_metadata(args.model_dir)
    backend = (TorchModel(torch_checkpoint(args, meta)) if args.mode == "torch"
               else load_openvino(args, meta))
    check_data_dir(args.data_dir)
    lists = resolve_split(args.split, args.data_dir, args.split_seed,
                          getattr(args, "keep_laterals", False))
    out = Path(args.out_csv).parent if args.out_csv else Path(args.model_dir)
    target = out / f"localization_{args.mode}.json"
    check_writable_file(target, "--out-csv")
    result = run(backend, args, lists)
    result.update(mode=args.mode, cam_method=args.cam_method, split=str(lists["test"].parent))
    atomic_write_text(target, json.dumps(strict_json(result), indent=1, allow_nan=False) + "\n",
                      "localization")
    print(format_localization(result))
    print(f"localization: {target}")
    return result


# ---------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(p)
    p.add_argument("--mode", default="fp32", choices=["torch", "fp32", "int8"])
    p.add_argument("--part", default="test", choices=["test", "val"],
                   help="which list of the split to evaluate")
    p.add_argument("--model-dir", default="models", help="where infer.sh writes the models")
    p.add_argument("--checkpoint", default=None,
                   help="PyTorch checkpoint (--mode torch, --export); default: the exported one's")
    p.add_argument("--image", nargs="+", default=None, help="print the probabilities of images")
    p.add_argument("--out-csv", default=None,
                   help="default: MODEL_DIR/predictions_MODE.csv (_val for --part val)")
    p.add_argument("--no-store", action="store_true",
                   help="decode PNGs even where `python dataset.py prepare` made a store")
    p.add_argument("--chunk-size", type=positive_int, default=1000,
                   help="images per saved chunk of predictions (what a kill can cost)")
    # Decoding and cropping a 1024x1024 PNG costs ~7% of what DenseNet-121 INT8 costs on the
    # same core, so a thread per 4 cores keeps ahead without taking cores from inference.
    p.add_argument("--workers", type=positive_int, default=None,
                   help="decoding threads (OpenVINO; default a quarter of the cores) or loader "
                        "workers per process (torch; default the cores shared by the processes "
                        "on an accelerator, up to 16; 1 on a CPU)")
    # OpenVINO
    p.add_argument("--images-per-request", type=positive_int, default=1,
                   help="OpenVINO: images (10 crops each) per inference request")
    p.add_argument("--streams", type=positive_int, default=None,
                   help="OpenVINO CPU streams (default: the THROUGHPUT hint chooses)")
    # PyTorch
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "hpu"],
                   help="--mode torch: where to run (auto: a GPU if there is one)")
    p.add_argument("--hpu", action="store_true", help="shorthand for --device hpu (Intel Gaudi)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="--mode torch: images (10 crops each) per batch and process (default "
                        "32 on a GPU or Gaudi, 1 on a CPU, where larger batches run slower)")
    p.add_argument("--amp", action="store_true", help="--mode torch: mixed precision autocast")
    p.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true", help="--mode torch: NHWC")
    # Heatmaps (cam.py)
    p.add_argument("--cam", nargs="?", const="cams", default=None, metavar="DIR",
                   help="with --image: heatmap overlays of the positive (or 3 likeliest) "
                        "diseases and a grid of all 14, into DIR (default cams/)")
    p.add_argument("--cam-method", default="cam", choices=["cam", "gradcam++"],
                   help="class activation maps (every mode) or Grad-CAM++ (--mode torch)")
    p.add_argument("--localize", action="store_true",
                   help="score the heatmaps against NIH's radiologist boxes (val picks the "
                        "threshold, test is scored)")
    p.add_argument("--localize-tau", type=fraction, default=None,
                   help="--localize: a fixed heatmap threshold instead of the one that does best "
                        "on val's boxed images (needed where val has none: --split official)")
    p.add_argument("--class-map", type=class_map, default=None,
                   help="evaluating on another data set: 'MODEL NAME=LIST NAME,...' pairs the "
                        "model's classes with the list's (default: same names, and NIH's "
                        "Effusion = CheXpert's Pleural Effusion)")
    # Report (report.py): intervals, operating points, calibration
    p.add_argument("--n-boot", type=positive_int, default=2000,
                   help="bootstrap resamples of patients for the 95%% intervals")
    p.add_argument("--boot-seed", type=seed, default=0)
    p.add_argument("--rule", default="youden", choices=["youden", "f1", "sensitivity"],
                   help="--image: which of the operating points chosen on val decides")
    p.add_argument("--target-sensitivity", type=fraction, default=0.9,
                   help="--part val: the sensitivity the 'sensitivity' rule's thresholds reach")
    p.add_argument("--no-figures", action="store_true",
                   help="write the report's JSON and Markdown only (no ROC/PR/reliability PNGs)")
    p.add_argument("--calibrated", action="store_true",
                   help="apply the Platt calibration fitted on val (--part val first)")
    add_subgroup_args(p)  # --no-subgroups, --patients-table
    # Export (infer.sh)
    p.add_argument("--export", action="store_true", help="export FP32 and INT8 (infer.sh)")
    p.add_argument("--calibration-size", type=positive_int, default=300,
                   help="val images to calibrate INT8 on")
    p.add_argument("--validation-size", type=positive_int, default=300,
                   help="other val images on which INT8 is compared with FP32")
    p.add_argument("--max-auc-drop", type=float, default=None,
                   help="accuracy-controlled quantization: largest allowed drop of val mean AUC")
    # Unset data flags come from the checkpoint (export) or the exported model (evaluation):
    # a model trained on 56x56 crops of the sample is calibrated and evaluated the same way.
    p.set_defaults(data_dir=None, split=None, resize=None, crop_size=None, split_seed=None,
                   keep_laterals=None)
    args = p.parse_args(argv)
    if args.hpu:
        args.device = "hpu"
    if args.workers is None and (args.mode != "torch" or args.export or args.image):
        args.workers = max(1, (os.cpu_count() or 1) // 4)
    if args.mode != "torch" and args.device not in ("auto", "cpu") and not args.export:
        p.error(f"argument --device: {args.device} is for --mode torch; OpenVINO runs on the CPU")
    if args.cam and not args.image:
        p.error("argument --cam: draws the heatmaps of --image files (--localize scores them "
                "on a split)")
    if args.cam_method != "cam" and args.mode != "torch":
        p.error(f"argument --cam-method: {args.cam_method} needs --mode torch")
    if args.max_auc_drop is not None and not 0 <= args.max_auc_drop < 1:
        p.error(f"argument --max-auc-drop: must be in [0, 1), got {args.max_auc_drop}")
    return args


def fill_defaults(args, source, where="the defaults"):
    """Unset data flags from `source` (the checkpoint's arguments, or the exported model's
    metadata; `where` names it), each checked, else from the fallbacks."""
    args.trained_on = source.get("data_dir")  # the data set the model came from
    fallback = {"data_dir": "data", "split": "auto", "resize": 256, "crop_size": 224,
                "split_seed": 0, "keep_laterals": False}
    for key, value in fallback.items():
        if getattr(args, key, None) is None:
            value = source.get(key, value)
            kind = {"data_dir": str, "split": str, "keep_laterals": bool}.get(key, int)
            usable = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if kind is int and usable:
                usable = (0 <= value < 2 ** 63) if key == "split_seed" else 0 < value <= 100_000
            if not usable:
                raise DataError(f"{where}: its {key} is {value!r}, not a usable setting; pass "
                                f"--{key.replace('_', '-')} or export the model again")
            setattr(args, key, value)
    if args.crop_size > args.resize:
        raise DataError(f"--crop-size {args.crop_size} is larger than --resize {args.resize}")


def checkpoint_settings(path):
    """The data flags a checkpoint was trained with ({} for a bare state dict)."""
    from model import load_file
    ckpt = load_file(path)
    settings = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
    return settings if isinstance(settings, dict) else {}


def main(argv=None):
    args = get_args(argv)
    rt = None
    try:
        if args.export:
            if not args.checkpoint:
                raise InferError("--export needs --checkpoint")
            import_torch()
            from export import export
            return export(args)
        meta = read_metadata(args.model_dir)
        if args.mode == "torch":
            import_torch()
        if args.mode == "torch" and args.checkpoint:  # this checkpoint, not the exported one
            fill_defaults(args, checkpoint_settings(args.checkpoint), args.checkpoint)
        else:
            fill_defaults(args, meta, Path(args.model_dir) / METADATA)
        if args.mode == "torch":
            if not (args.image or args.localize):
                from runtime import setup
                rt = setup(args.device)
        if args.localize:
            return localize(args)
        return classify_images(args) if args.image else evaluate(args, rt)
    except (DataError, SetupError) as e:  # DataError includes model.py's CheckpointError
        if rt is None or rt.is_main:
            print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: run the same command to continue after the last saved chunk",
              file=sys.stderr)
        sys.exit(130)
    finally:
        if rt is not None and rt.distributed:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
