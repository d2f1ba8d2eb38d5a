"""The checkpoint format, in one place: what training writes (last.pt, best.pt, metrics.jsonl),
what resume checks and repairs, and what evaluation, export and the back ends read.

    {"model": bare state dict (torchvision key names; no DDP or compile prefixes),
     "optimizer", "scheduler", "scaler": their state dicts,
     "args": the training flags, the precision as applied among them ("amp", "amp_dtype",
             "channels_last"; "precision" says it in words, "precision_note" why: the
             hardware's default, the flags, or the checkpoint a resumed run keeps),
     "class_names": the head's classes, in order,
     "data": which train/val lists it saw, "epoch", "step", "epoch_images", "partial",
     "best_auc", "best_epoch", "history": the metrics.jsonl records, "world_size", "batch_size"}

Always loaded with weights_only=True (model.load_file). A bare state dict or the 2017 CheXNet
format {'state_dict': ...} loads too: with 14 outputs it is NIH's 14 classes, the only thing
those files were ever trained for.
"""
import hashlib
import io
import json
from pathlib import Path

import torch

from common import atomic_copy, atomic_path, atomic_write_text, one_line, strict_json
from labels import NIH_CLASSES
from model import CheckpointError, build_model, load_file, load_weights, read_state_dict

# Flags whose change would make the resumed run another experiment than the one in last.pt.
RESUME_FLAGS = ("seed", "train_size", "resize", "crop_size", "crop_scale", "uncertain")


class NonFiniteLoss(Exception):
    """The loss or the weights became NaN/inf: training stops, the last good checkpoint stays."""


# ---------------------------------------------------------------------------------------------
# Reading: evaluation, export, back ends

def classes_of(meta, num_outputs, path):
    """The class names a checkpoint was trained for, checked against its head. A file without
    them (a bare state dict, the 2017 CheXNet format) is NIH's 14 when it has 14 outputs."""
    classes = meta.get("class_names")
    if classes is None and num_outputs == len(NIH_CLASSES):
        classes = NIH_CLASSES
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
            and len(classes) == num_outputs):
        raise CheckpointError(f"{path}: its class names do not match its {num_outputs} outputs"
                              if classes is not None else
                              f"{path}: {num_outputs} outputs and no class names: not a "
                              "checkpoint of main.py, nor an NIH (14-class) one")
    return list(classes)


def training_flags(ckpt):
    """The flags a checkpoint was trained with ({} for a bare state dict)."""
    flags = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
    return flags if isinstance(flags, dict) else {}


def load_for_inference(path, arch=None):
    """(bare model in eval mode, class names, training flags) of a checkpoint, ours or legacy."""
    obj = load_file(path)
    meta = obj if isinstance(obj, dict) and "model" in obj else {}
    flags = training_flags(meta)
    arch = arch or flags.get("arch", "densenet121")
    state = read_state_dict(path, obj=obj)
    head = next((state[k] for k in ("classifier.weight", "fc.weight") if k in state), None)
    if head is None:
        raise CheckpointError(f"{path}: no classifier.weight or fc.weight: not a CheXNet checkpoint")
    classes = classes_of(meta, head.shape[0], path)
    model = build_model(arch, num_classes=head.shape[0], pretrained="none")
    load_weights(model, state, path, arch, head.shape[0])
    return model.eval(), classes, flags


def read_training_flags(path):
    """The flags a checkpoint file was trained with ({} for a bare state dict)."""
    return training_flags(load_file(path))


# ---------------------------------------------------------------------------------------------
# Writing: last.pt, best.pt and metrics.jsonl are one record

def save_checkpoint(path, model, optimizer, scheduler, scaler, flags, **state):
    """Atomically (unique temp file + rename): a kill never leaves a broken checkpoint, a full
    disk leaves the previous one. Holds the bare model's state dict (no DDP or compile
    prefixes) and everything needed to resume; flags: the training flags (a dict), recorded
    as "args"."""
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise NonFiniteLoss(f"weights became non-finite ({name}); {path} not overwritten")
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
               "args": dict(flags), **state}
    buffer = io.BytesIO()  # serialised first: a failed write is then an OSError naming its cause
    torch.save(payload, buffer)
    with atomic_path(path, "checkpoint") as tmp:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())


def write_metrics(out_dir, history):
    """metrics.jsonl rewritten from the checkpoint's own history: strict JSON (NaN -> null)."""
    atomic_write_text(Path(out_dir) / "metrics.jsonl", "".join(
        json.dumps(strict_json(r), allow_nan=False) + "\n" for r in history), "metrics")


def repair_outputs(out_dir, ckpt, log):
    """After a kill at any instant the three outputs agree again: last.pt is written first, so
    it is the record; best.pt is restored from it when the kill came before best.pt was
    written, metrics.jsonl is rewritten from its history."""
    last, best = Path(out_dir) / "last.pt", Path(out_dir) / "best.pt"
    best_epoch = ckpt.get("best_epoch")
    if best_epoch and best_epoch == ckpt["epoch"] and ckpt["epoch_images"] == 0:
        try:
            held = load_file(best).get("epoch") if best.is_file() else None
        except CheckpointError:
            held = None
        if held != best_epoch:
            atomic_copy(last, best, "checkpoint")
            log(f"repaired {best}: it now holds epoch {best_epoch}, the best, as last.pt records")
    write_metrics(out_dir, ckpt.get("history", []))


# ---------------------------------------------------------------------------------------------
# Resuming: the same experiment, or a one-line refusal

def data_identity(train_set, val_set):
    """Which images a run trains and validates on: resuming on other lists is refused."""
    return {**{part: hashlib.sha256("\n".join(ds.names).encode()).hexdigest()
               for part, ds in (("train", train_set), ("val", val_set))},
            "classes": train_set.class_names}


def uses_scaler(flags):
    """Whether a run with these flags (a dict) keeps an fp16 gradient scaler."""
    return bool(flags.get("amp")) and flags.get("amp_dtype") == "fp16"


def load_checkpoint(path, model, optimizer, scheduler, scaler, flags, data):
    """Resume: load last.pt's state into the run's model and optimizer after checking that it
    is the same experiment (arch, flags, lists, classes). flags: this run's training flags (a
    dict, as save_checkpoint records them); data: data_identity's."""
    ckpt = load_file(path, "checkpoint")
    if not (isinstance(ckpt, dict) and "model" in ckpt and "optimizer" in ckpt):
        raise CheckpointError(f"{path}: not a training checkpoint of main.py (no model/optimizer "
                              "state); to start from its weights use --weights")
    trained = training_flags(ckpt)
    how = (f"resume with the flags it was trained with, or start a new --out-dir (--weights "
           f"{path} starts from its weights)")
    if trained.get("arch", flags["arch"]) != flags["arch"]:
        raise CheckpointError(f"{path}: trained with --arch {trained['arch']}, not "
                              f"{flags['arch']}; {how}")
    if bool(trained.get("freeze_backbone")) != flags["freeze_backbone"]:
        flag = "with" if trained.get("freeze_backbone") else "without"
        raise CheckpointError(f"{path}: trained {flag} --freeze-backbone; {how}")
    if uses_scaler(trained) != uses_scaler(flags):
        raise CheckpointError(f"{path}: trained {'with' if uses_scaler(trained) else 'without'} "
                              f"--amp --amp-dtype fp16 (its gradient scaler); {how}")
    if "epoch_images" not in ckpt:
        raise CheckpointError(f"{path}: written by an older main.py without the epoch position; "
                              f"start a new --out-dir (--weights {path} starts from its weights)")
    for key in RESUME_FLAGS:
        if key == "uncertain" and data["classes"] == NIH_CLASSES:
            continue  # NIH's labels hold nothing uncertain: the policy changes nothing
        if key in trained and trained[key] != flags[key]:
            raise CheckpointError(f"{path}: trained with --{key.replace('_', '-')} "
                                  f"{trained[key]}, not {flags[key]}; {how}")
    for part in ("train", "val"):
        if ckpt.get("data", data).get(part) != data[part]:
            raise CheckpointError(f"{path}: trained on another {part} list (a different --split, "
                                  f"--split-seed, --keep-laterals, --data-dir or --limit); {how}")
    classes = ckpt.get("class_names", NIH_CLASSES)  # main.py has always written them; 14 before
    if classes != data["classes"]:
        k = next((k for k, (a, b) in enumerate(zip(classes, data["classes"])) if a != b),
                 min(len(classes), len(data["classes"])))
        raise CheckpointError(f"{path}: trained for other classes than these lists ({len(classes)}"
                              f" vs {len(data['classes'])}; first difference at class {k + 1}: "
                              f"{classes[k] if k < len(classes) else 'none'!r} vs "
                              f"{data['classes'][k] if k < len(data['classes']) else 'none'!r}); "
                              f"{how}")
    load_weights(model, ckpt["model"], path, flags["arch"], len(classes))
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit ({one_line(e)}); {how}") from None
    return ckpt
