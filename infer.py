"""CheXNet evaluation and inference on the CPU: PyTorch, OpenVINO FP32 or OpenVINO INT8.

    python infer.py --mode int8                      # ten-crop evaluation on the test split
    python infer.py --mode torch --limit 500         # the first 500 test images, PyTorch
    python infer.py --image a.png b.png              # the 14 probabilities of each image
    python infer.py --export --checkpoint runs/chexnet/best.pt   # what infer.sh runs

Evaluation follows the CheXNet protocol: Resize(256) -> TenCrop(224) -> ImageNet normalisation,
probabilities averaged over the 10 crops; per-disease ROC-AUC; predictions to a CSV.
The OpenVINO modes import no torch: an edge box needs openvino, numpy, pillow, scikit-learn.
Decoding runs in threads (Pillow and numpy release the GIL) ahead of inference, which keeps
OpenVINO's optimal number of asynchronous requests in flight under the THROUGHPUT hint, so
neither waits for the other.
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dataset import (CLASS_NAMES, DataError, add_data_args, atomic_write_text,
                     check_images_present, eval_input, mean_auc, one_line, read_list,
                     resolve_split, roc_aucs)

MODEL_NAMES = {"fp32": "chexnet_fp32.xml", "int8": "chexnet_int8.xml"}
METADATA = "chexnet.json"


class InferError(Exception):
    """Missing or mismatched model; one line."""


# ---------------------------------------------------------------------------------------------
# Back ends: each maps a float32 (N, 3, crop, crop) batch of crops to (N, 14) probabilities

class OpenVINOModel:
    """An exported model compiled for this CPU. FP32 really is FP32: this CPU would otherwise
    silently run in bf16 (INFERENCE_PRECISION_HINT), which is also slower on it."""

    def __init__(self, xml, crop, crops_per_request, streams=None):
        import openvino as ov
        if not Path(xml).is_file():
            raise InferError(f"{xml} not found: run `bash infer.sh` to export the model first")
        core = ov.Core()
        model = core.read_model(xml)
        shape = model.inputs[0].get_partial_shape()
        if (len(shape) != 4 or not shape[1].is_static or shape[1].get_length() != 3
                or any(not d.is_dynamic and d.get_length() != crop for d in (shape[2], shape[3]))):
            raise InferError(f"{xml}: input shape {shape} does not take 3x{crop}x{crop} crops "
                             f"(--crop-size {crop})")
        out = model.outputs[0].get_partial_shape()
        if len(out) != 2 or out[1].is_dynamic or out[1].get_length() != len(CLASS_NAMES):
            raise InferError(f"{xml}: outputs {out[1] if len(out) == 2 else out}, expected "
                             f"{len(CLASS_NAMES)} classes")
        # Static shapes compile to faster CPU kernels than the exported dynamic batch.
        model.reshape([crops_per_request, 3, crop, crop])
        config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"}
        if streams:
            config["NUM_STREAMS"] = str(streams)
        self.compiled = core.compile_model(model, "CPU", config)
        self.requests = self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        self.batch = crops_per_request

    def run_all(self, batches, on_result):
        """Feed (key, crops) pairs through `requests` asynchronous infer requests, each started
        as soon as one is free; on_result(key, probs) in order. Equal-sized requests finish in
        the order they started, so waiting on the oldest keeps them all busy, with no Python
        callbacks on OpenVINO's threads."""
        free = [self.compiled.create_infer_request() for _ in range(self.requests)]
        running = collections.deque()

        def finish_oldest():
            request, key = running.popleft()
            request.wait()
            on_result(key, request.get_output_tensor(0).data.copy())
            free.append(request)

        for key, crops in batches:
            if not free:
                finish_oldest()
            request = free.pop()
            request.start_async({0: crops})
            running.append((request, key))
        while running:
            finish_oldest()


class TorchModel:
    """The checkpoint in PyTorch eager mode, the reference the OpenVINO models are held to."""

    def __init__(self, checkpoint):
        import torch
        from model import model_from_checkpoint, with_sigmoid
        self.torch = torch
        model, _ = model_from_checkpoint(checkpoint)
        self.model = with_sigmoid(model)
        self.requests = 1

    def __call__(self, crops):
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(crops)).numpy()

    def run_all(self, batches, on_result):
        for key, crops in batches:
            on_result(key, self(crops))


def load_backend(args, meta):
    crops = 10 * args.images_per_request
    if args.mode == "torch":
        checkpoint = args.checkpoint or meta.get("checkpoint")
        if not checkpoint:
            raise InferError("--mode torch needs --checkpoint (no exported model records one)")
        try:
            return TorchModel(checkpoint)
        except ImportError:
            raise InferError("--mode torch needs PyTorch (pip install torch torchvision); "
                             "the fp32 and int8 modes do not") from None
    return OpenVINOModel(Path(args.model_dir) / MODEL_NAMES[args.mode], args.crop_size, crops,
                         args.streams)


# ---------------------------------------------------------------------------------------------
# Evaluation

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


def predict(backend, paths, args):
    """Ten-crop probabilities (N, 14) of every image, averaged over its crops."""
    per_request = args.images_per_request
    groups = [paths[i:i + per_request] for i in range(0, len(paths), per_request)]

    def load(group):  # (10 * len(group), 3, crop, crop); a short last group is padded
        crops = np.concatenate([eval_input(p, args.resize, args.crop_size) for p in group])
        pad = 10 * per_request - len(crops)
        return np.concatenate([crops, np.repeat(crops[-1:], pad, 0)]) if pad else crops

    probs = np.zeros((len(paths), len(CLASS_NAMES)), np.float32)

    def store(index, out):
        n = len(groups[index])
        probs[index * per_request:index * per_request + n] = out[:10 * n].reshape(n, 10, -1).mean(1)

    window = 2 * backend.requests + args.workers
    backend.run_all(enumerate(prefetch(load, groups, args.workers, window)), store)
    return probs


def evaluate(args):
    meta = read_metadata(args.model_dir)
    lists = resolve_split(args.split, args.data_dir, args.split_seed)
    names, labels = read_list(lists["test"])
    if args.limit:
        names, labels = names[:args.limit], labels[:args.limit]
    image_dir = Path(args.data_dir) / "images"
    if not Path(args.data_dir).is_dir():
        raise DataError(f"data directory {args.data_dir}/ not found: run `bash batch_download.sh`, "
                        "or pass --data-dir sample to use the bundled sample")
    check_images_present(image_dir, names, lists["test"])
    backend = load_backend(args, meta)
    start = time.perf_counter()
    probs = predict(backend, [image_dir / n for n in names], args)
    seconds = time.perf_counter() - start
    aucs = roc_aucs(labels, probs)
    out_csv = Path(args.out_csv or Path(args.model_dir) / f"predictions_{args.mode}.csv")
    atomic_write_text(out_csv, "Image Index," + ",".join(CLASS_NAMES) + "\n" + "".join(
        n + "," + ",".join(f"{p:.6f}" for p in row) + "\n" for n, row in zip(names, probs)))
    print(f"mode {args.mode}: {len(names)} test images of {lists['test']}")
    print(format_aucs(aucs))
    print(f"throughput: {len(names) / seconds:.1f} images/s, {10 * len(names) / seconds:.1f} crops/s "
          f"(end to end, decoding included); {seconds:.1f} s")
    print(f"predictions: {out_csv}")
    return {"aucs": aucs, "mean_auc": mean_auc(aucs), "probs": probs, "seconds": seconds}


def format_aucs(aucs):
    lines = [f"{'disease':<20}{'AUC':>8}"]
    for name, auc in zip(CLASS_NAMES, aucs):
        lines.append(f"{name:<20}{'n/a' if np.isnan(auc) else f'{auc:.4f}':>8}")
    lines.append(f"{'mean':<20}{mean_auc(aucs):>8.4f}")
    return "\n".join(lines)


def classify_images(args):
    meta = read_metadata(args.model_dir)
    backend = load_backend(args, meta)
    for path in args.image:
        crops = eval_input(path, args.resize, args.crop_size)
        crops = np.concatenate([crops] * args.images_per_request)
        result = {}
        backend.run_all([(0, crops)], lambda key, out: result.update(p=out[:10].mean(0)))
        order = np.argsort(-result["p"])
        print(f"{path}:")
        for k in order:
            print(f"  {CLASS_NAMES[k]:<20}{result['p'][k]:.4f}")


def read_metadata(model_dir):
    path = Path(model_dir) / METADATA
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------
# Export (infer.sh): PyTorch checkpoint -> OpenVINO FP32 -> NNCF INT8

def export(args):
    import openvino as ov
    import torch
    from model import model_from_checkpoint, with_sigmoid

    model, ckpt_meta = model_from_checkpoint(args.checkpoint)
    fill_defaults(args, ckpt_meta.get("args", {}))  # calibrate on the data it was trained on
    model_dir = Path(args.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    print(f"exporting {args.checkpoint} ({args.crop_size}x{args.crop_size} crops); INT8 calibration "
          f"on val images of {args.data_dir}/ (split {args.split})")
    t0 = time.perf_counter()
    crop = args.crop_size
    ov_model = ov.convert_model(with_sigmoid(model), example_input=torch.zeros(1, 3, crop, crop),
                                input=[(-1, 3, crop, crop)])  # dynamic batch
    ov_model.inputs[0].get_tensor().set_names({"images"})
    ov_model.outputs[0].get_tensor().set_names({"probabilities"})
    fp32 = model_dir / MODEL_NAMES["fp32"]
    save_model(ov_model, fp32)
    print(f"wrote {fp32} ({size_mb(fp32):.1f} MB) in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    int8, calibration = quantize(ov_model, args)
    path = model_dir / MODEL_NAMES["int8"]
    save_model(int8, path)
    print(f"wrote {path} ({size_mb(path):.1f} MB) in {time.perf_counter() - t0:.1f} s "
          f"({calibration['images']} val images for calibration)")
    meta = {"checkpoint": str(args.checkpoint), "arch": ckpt_meta.get("args", {}).get(
        "arch", "densenet121"), "class_names": CLASS_NAMES, "data_dir": str(args.data_dir),
        "split": args.split, "resize": args.resize, "crop_size": crop, "calibration": calibration}
    atomic_write_text(model_dir / METADATA, json.dumps(meta, indent=1) + "\n")


def quantize(ov_model, args):
    """NNCF post-training quantization calibrated on val images (never test), each one
    preprocessed exactly as evaluation does: its 10 crops are one calibration sample."""
    import nncf
    lists = resolve_split(args.split, args.data_dir, args.split_seed)
    names, labels = read_list(lists["val"])
    names, labels = names[:args.calibration_size], labels[:args.calibration_size]
    image_dir = Path(args.data_dir) / "images"
    check_images_present(image_dir, names, lists["val"])
    items = [(image_dir / n, y) for n, y in zip(names, labels)]
    # Decode once, in parallel; ~6 MB of crops per image.
    with ThreadPoolExecutor(args.workers) as pool:
        crops = list(pool.map(lambda item: eval_input(item[0], args.resize, args.crop_size), items))
    calibration = nncf.Dataset(crops)
    info = {"split": str(lists["val"]), "images": len(crops)}
    if args.max_auc_drop is None:
        return nncf.quantize(ov_model, calibration, subset_size=len(crops)), info

    validation = nncf.Dataset(list(zip(crops, labels)), lambda item: item[0])

    def val_mean_auc(compiled, data):
        """Mean AUC, and each image's probabilities: AUC has no per-image value, so NNCF ranks
        the layers to keep in float by how far each image's output moved instead."""
        data = list(data)
        probs = [compiled(x)[0].mean(0) for x, _ in data]
        return mean_auc(roc_aucs(np.stack([y for _, y in data]), np.stack(probs))), [[p] for p in probs]

    quantized = nncf.quantize_with_accuracy_control(
        ov_model, calibration, validation, val_mean_auc, max_drop=args.max_auc_drop,
        drop_type=nncf.DropType.ABSOLUTE, subset_size=len(crops))
    info["max_auc_drop"] = args.max_auc_drop
    return quantized, info


def save_model(ov_model, xml):
    """FP32 weights (compress_to_fp16=False), written beside and renamed into place."""
    import openvino as ov
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=".export-") as tmp:
        ov.save_model(ov_model, Path(tmp) / xml.name, compress_to_fp16=False)
        os.replace(Path(tmp) / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
        os.replace(Path(tmp) / xml.name, xml)  # last: the .xml marks a complete model


def size_mb(xml):
    return (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 1e6


# ---------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(p)
    p.add_argument("--mode", default="fp32", choices=["torch", "fp32", "int8"])
    p.add_argument("--model-dir", default="models", help="where infer.sh writes the models")
    p.add_argument("--checkpoint", default=None,
                   help="PyTorch checkpoint (--mode torch, --export); default: the exported one's")
    p.add_argument("--image", nargs="+", default=None, help="print the probabilities of images")
    p.add_argument("--out-csv", default=None, help="default: MODEL_DIR/predictions_MODE.csv")
    # Decoding and cropping a 1024x1024 PNG costs ~7% of what DenseNet-121 INT8 costs on the
    # same core, so a thread per 4 cores keeps ahead without taking cores from inference.
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() // 4),
                   help="decoding threads")
    p.add_argument("--images-per-request", type=int, default=1,
                   help="images (10 crops each) per inference request")
    p.add_argument("--streams", type=int, default=None,
                   help="OpenVINO CPU streams (default: the THROUGHPUT hint chooses)")
    p.add_argument("--export", action="store_true", help="export FP32 and INT8 (infer.sh)")
    p.add_argument("--calibration-size", type=int, default=300, help="val images for INT8")
    p.add_argument("--max-auc-drop", type=float, default=None,
                   help="accuracy-controlled quantization: largest allowed drop of val mean AUC")
    # Unset data flags come from the checkpoint (export) or the exported model (evaluation):
    # a model trained on 56x56 crops of the sample is calibrated and evaluated the same way.
    p.set_defaults(data_dir=None, split=None, resize=None, crop_size=None)
    return p.parse_args(argv)


def fill_defaults(args, source):
    fallback = {"data_dir": "data", "split": "auto", "resize": 256, "crop_size": 224}
    for key, value in fallback.items():
        if getattr(args, key) is None:
            setattr(args, key, source.get(key, value))


def main(argv=None):
    args = get_args(argv)
    try:
        if args.export:
            if not args.checkpoint:
                raise InferError("--export needs --checkpoint")
            export(args)
        else:
            fill_defaults(args, read_metadata(args.model_dir))
            classify_images(args) if args.image else evaluate(args)
    except (DataError, InferError) as e:  # DataError includes model.py's CheckpointError
        sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
    main()
