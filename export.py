"""Export a trained checkpoint for CPU inference: what `bash infer.sh` (`python infer.py
--export`) runs.

    MODEL_DIR/chexnet_fp32.xml  FP32: ov.convert_model, dynamic batch, FP32 weights; outputs
                                the probabilities and the class activation maps
    MODEL_DIR/chexnet_int8.xml  INT8: NNCF post-training quantization on val images, each as
                                its 10 crops exactly as evaluation sees them
    MODEL_DIR/chexnet.json      what was exported from what, how INT8 compares with FP32 on
                                val images it was not calibrated on, and the files' SHA-256

The set is written aside (MODEL_DIR/.export-*/) and moved into place with chexnet.json last;
infer.py checks every model file against chexnet.json, so a model directory is never used
with files of two exports. One export at a time per directory (a lock).
"""
import json
import os
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backends import (METADATA, MODEL_NAMES, InferError, OpenVINOModel, data_defaults,
                      file_digest, ov_reason)
from common import (DataError, atomic_write_text, check_writable_dir, exclusive_lock, os_reason,
                    strict_json)
from dataset import SkippedImage, check_data_dir, split_images
from images import TEN_CROPS, average_crops, normalize_gray, protocol_name
from metrics import N_BOOT, mean_auc, paired_auc_difference, roc_aucs


@dataclass(frozen=True)
class ExportSettings:
    """What an export is asked for (infer.py --export's flags but the data's, which come with
    the checkpoint): which checkpoint, where to, how many val images calibrate INT8 and how
    many others check it (and, with max_auc_drop, the largest mean-AUC drop NNCF's accuracy
    control allows), decoding threads, OpenVINO streams, the store or the PNGs, unreadable
    images skipped or not, the bootstrap of the INT8-vs-FP32 check."""
    checkpoint: str
    model_dir: str = "models"
    calibration_size: int = 300
    validation_size: int = 300
    max_auc_drop: float = None
    workers: int = 1
    streams: int = None
    use_store: bool = True
    skip_bad_images: bool = False
    n_boot: int = N_BOOT
    boot_seed: int = 0


def held_out_val_crops(data, settings):
    """Ten-crop uint8 crops of the val images of `data` (splitting.Data, its split resolved):
    the first ones calibrate INT8, the next ones (never the same) check it. Decoded before any
    conversion, so bad data fails first."""
    val_list, images = split_images(data, "val", settings.use_store, settings.skip_bad_images)
    n = len(images)
    calibration, validation = settings.calibration_size, settings.validation_size
    if calibration + validation > n:  # a small val split: half and half at most
        calibration = min(calibration, max(1, n // 2))
        validation = min(validation, n - calibration)

    def crops(i):
        try:
            return images.eval_crops(i, data.crop_size)
        except SkippedImage:
            return None

    with ThreadPoolExecutor(settings.workers) as pool:
        decoded = list(pool.map(crops, range(calibration + validation)))
    keep = [i for i, c in enumerate(decoded) if c is not None]
    cal = [i for i in keep if i < calibration]
    val = [i for i in keep if i >= calibration]
    if not cal:
        raise DataError(f"{val_list}: no readable val image to calibrate INT8 on")
    held_out = {"names": [images.names[i] for i in val], "labels": images.labels[val]}
    return ([decoded[i] for i in cal], [decoded[i] for i in val], held_out,
            {"split": str(val_list), "images": len(cal), "held_out_images": len(val)})


def export(settings, data_dir=None, split=None, split_seed=None, keep_laterals=None, resize=None,
           crop_size=None):
    """Export settings.checkpoint (ExportSettings) into settings.model_dir; the data flags given
    (not None) win over the checkpoint's own, which it is calibrated on otherwise. Returns the
    metadata written (chexnet.json)."""
    quiet_cuda_home()  # before anything imports torch.utils.cpp_extension
    import openvino as ov
    import torch

    from checkpoint import load_for_inference
    from model import WithCAM

    model, classes, trained = load_for_inference(settings.checkpoint)
    data = data_defaults(trained, settings.checkpoint, data_dir, split, split_seed, keep_laterals,
                         resize, crop_size)  # calibrate on its own data
    model_dir = Path(settings.model_dir)
    check_writable_dir(model_dir, "--model-dir")
    with exclusive_lock(model_dir / ".export.lock", "another export",
                        "use another --model-dir"):
        for stale in model_dir.glob(".export-*"):  # left by a killed export
            shutil.rmtree(stale, ignore_errors=True)
        print(f"exporting {settings.checkpoint} ({data.crop_size}x{data.crop_size} crops); INT8 "
              f"calibration on val images of {data.data_dir}/ (split {data.split})")
        check_data_dir(data.data_dir, data.dataset)
        data = data.resolved()
        calibration, held_out, held_out_info, info = held_out_val_crops(data, settings)
        held_out_labels = held_out_info["labels"]
        staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=".export-"))
        try:
            t0 = time.perf_counter()
            crop = data.crop_size
            # Two outputs: the probabilities and the class activation maps (cam.py).
            with quiet_tracing():
                ov_model = ov.convert_model(WithCAM(model), example_input=torch.zeros(
                    1, 3, crop, crop), input=[(-1, 3, crop, crop)])  # dynamic batch
            ov_model.inputs[0].get_tensor().set_names({"images"})
            ov_model.outputs[0].get_tensor().set_names({"probabilities"})
            ov_model.outputs[1].get_tensor().set_names({"cams"})
            save_model(ov_model, staging / MODEL_NAMES["fp32"])
            print(f"FP32 model converted in {time.perf_counter() - t0:.1f} s")
            t0 = time.perf_counter()
            int8 = quantize(ov_model, calibration, held_out, held_out_labels,
                            settings.max_auc_drop, info)
            save_model(int8, staging / MODEL_NAMES["int8"])
            print(f"INT8 model quantized in {time.perf_counter() - t0:.1f} s ({info['images']} "
                  "val images for calibration)")
            info["int8_vs_fp32"] = compare(staging, held_out, held_out_info, classes, crop,
                                           settings)
            meta = {"checkpoint": str(settings.checkpoint),
                    "arch": trained.get("arch", "densenet121"),
                    "class_names": classes, "data_dir": str(data.data_dir),
                    # what it was trained on (data_dir: what it was calibrated on)
                    "trained_on": trained.get("data_dir"),
                    "split": data.split, "split_seed": data.split_seed,
                    "keep_laterals": bool(data.keep_laterals), "resize": data.resize,
                    "crop_size": crop,
                    "calibration": info, "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "files": {name: file_digest(staging / name) for name in _model_files()}}
            commit(staging, model_dir, meta)
        except OSError as e:
            raise DataError(f"{model_dir}: cannot write the export ({os_reason(e)}); the "
                            "previous export, if any, is untouched") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for name in MODEL_NAMES.values():
        print(f"wrote {model_dir / name} ({size_mb(model_dir / name):.1f} MB)")
    check = info["int8_vs_fp32"]
    if check["images"]:
        fp32, int8 = check["fp32_mean_auc"], check["int8_mean_auc"]
        lo, hi = check["difference_ci"]
        if not np.isfinite(fp32):
            auc = "mean AUC n/a (no disease with both classes)"
        else:
            verdict = ("n/a" if check["significant"] is None else
                       "significant" if check["significant"] else "not significant")
            auc = (f"mean AUC {fp32:.4f} -> {int8:.4f}, difference {int8 - fp32:+.4f} "
                   f"[95% CI {lo:+.4f}, {hi:+.4f}] ({verdict}, paired bootstrap of patients)")
        print(f"INT8 vs FP32 on {check['images']} held-out val images (the val images not "
              f"calibrated on; {protocol_name(meta['resize'], meta['crop_size'])}): {auc}; "
              "largest "
              f"probability difference {check['max_probability_difference']:.4f}")
    return meta


def _model_files():
    return [p for xml in MODEL_NAMES.values() for p in (Path(xml).with_suffix(".bin").name, xml)]


def commit(staging, model_dir, meta):
    """Move the staged files into the model directory, chexnet.json last: until it lands,
    infer.py sees the old manifest and refuses new files beside it, and the reverse."""
    atomic_write_text(staging / METADATA, json.dumps(strict_json(meta), indent=1, allow_nan=False)
                      + "\n", "model metadata")
    for name in _model_files() + [METADATA]:
        os.replace(staging / name, model_dir / name)


@contextmanager
def quiet_tracing():
    """OpenVINO converts the model through torch.jit.trace, whose deprecation FutureWarning and
    TracerWarnings (a Python bool of a traced tensor...) concern OpenVINO's code, not the
    user: ignored during the conversion only."""
    import torch
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is (deprecated|not "
                                "supported)", category=FutureWarning)
        yield


def quiet_cuda_home():
    """Importing NNCF imports torch.utils.cpp_extension, which logs "No CUDA runtime is found,
    using CUDA_HOME=..." on a machine with a CUDA toolkit but no GPU: about building CUDA
    extensions, which the export never does. That one message is dropped; the logger's other
    messages stay."""
    import logging
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not record.getMessage().startswith("No CUDA runtime is found"))


def quantize(ov_model, calibration, held_out, labels, max_auc_drop, info):
    """NNCF post-training quantization calibrated on val images (never test): each image's
    10 crops are one calibration sample. With max_auc_drop (--max-auc-drop), NNCF's accuracy
    control checks the mean AUC on the held-out val images, not on the calibration ones."""
    import nncf

    def as_input(crops):
        return normalize_gray(crops)  # (10, 3, crop, crop) float32

    dataset = nncf.Dataset(calibration, as_input)
    if max_auc_drop is None:
        try:
            return nncf.quantize(ov_model, dataset, subset_size=len(calibration))
        except RuntimeError as e:
            raise InferError(f"INT8 quantization failed ({ov_reason(e)})") from None
    if len(held_out) < 2 or np.isnan(mean_auc(roc_aucs(labels, np.zeros(labels.shape)))):
        raise DataError(f"--max-auc-drop needs held-out val images with positives and negatives "
                        f"({len(held_out)} left after --calibration-size {len(calibration)})")
    validation = nncf.Dataset(list(zip(held_out, labels)), lambda item: as_input(item[0]))

    def val_mean_auc(compiled, data):
        """Mean AUC, and each image's probabilities: AUC has no per-image value, so NNCF ranks
        the layers to keep in float by how far each image's output moved instead."""
        data = list(data)  # raw items: (uint8 crops, labels)
        probs = [average_crops(compiled(as_input(x))[0])[0] for x, _ in data]
        return (mean_auc(roc_aucs(np.stack([y for _, y in data]), np.stack(probs))),
                [[p] for p in probs])

    info["max_auc_drop"] = max_auc_drop
    return nncf.quantize_with_accuracy_control(
        ov_model, dataset, validation, val_mean_auc, max_drop=max_auc_drop,
        drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration))


def compare(staging, held_out, held_out_info, class_names, crop_size, settings):
    """INT8 against FP32 on the held-out val images (crop_size crops): the mean AUC difference
    with a paired patient-level bootstrap interval (settings: ExportSettings' n_boot,
    boot_seed), and the largest probability difference."""
    if not held_out:
        return {"images": 0}
    from report import patient_groups
    probs = {}
    for mode in ("fp32", "int8"):
        model = OpenVINOModel(staging / MODEL_NAMES[mode], crop_size, TEN_CROPS, class_names,
                              settings.streams)
        out = {}
        batches = ((i, normalize_gray(c)) for i, c in enumerate(held_out))
        model.run_all(batches, lambda i, p: out.__setitem__(i, average_crops(p)[0]))
        probs[mode] = np.stack([out[i] for i in range(len(held_out))])
    labels = held_out_info["labels"]
    paired = paired_auc_difference(labels, probs["fp32"], probs["int8"],
                                   patient_groups(held_out_info["names"]), settings.n_boot,
                                   settings.boot_seed)
    diff, lo, hi = paired["mean"]
    return {"images": len(held_out), "fp32_mean_auc": mean_auc(paired["a"]),
            "int8_mean_auc": mean_auc(paired["b"]), "difference": diff, "difference_ci": [lo, hi],
            "significant": bool(lo > 0 or hi < 0) if np.isfinite(lo) else None,
            "max_probability_difference": float(np.abs(probs["fp32"] - probs["int8"]).max())}


def save_model(ov_model, xml):
    """FP32 weights (compress_to_fp16=False)."""
    import openvino as ov
    try:
        ov.save_model(ov_model, xml, compress_to_fp16=False)
    except RuntimeError as e:  # OpenVINO reports a failed write as a RuntimeError
        raise OSError(0, ov_reason(e)) from None


def size_mb(xml):
    return (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 1e6
