"""Train CheXNet on ChestX-ray14, in one process or with DDP under torchrun.

    python main.py --data-dir sample --epochs 2                       # one process
    torchrun --standalone --nproc_per_node=8 main.py --amp            # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29400 --rdzv-id=chexnet main.py --hpu    # several nodes
Rank and device come from torchrun's environment; rank 0 prints and writes (checkpoints,
metrics.jsonl, TensorBoard curves under OUT_DIR/tensorboard/: see curves.py). Starting again
with the same --out-dir resumes from its last.pt; torchrun --max-restarts=K does that for you
after a worker dies (export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 first: pytorch#135712).
"""
import math
import sys
import time
from argparse import BooleanOptionalAction
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (NonFiniteLoss, data_identity, load_checkpoint, read_training_flags,
                        repair_outputs, save_checkpoint, write_metrics)
from common import (ArgumentParser, DataError, Progress, add_device_args, atomic_copy,
                    check_writable_dir, exclusive_lock, fraction, nonnegative_float,
                    nonnegative_int, one_line, positive_float, positive_int, seed)
from curves import TENSORBOARD_DIR, Board, write_figure
from dataset import TRAIN_SIZE, XrayDataset, add_data_args, check_data_dir
from backends import BACKEND_NAMES
from fitting import (RECIPE_BATCH, LearningRate, MaskedBCE, StepSettings, epoch_order,
                     evaluate, make_loader, rank_indices, train_one_epoch)
from images import CENTRE_CROP, protocol_name
from labels import UNCERTAIN_POLICIES
from model import ARCH_NAMES, build_model
from runtime import Precision, SetupError, decide_precision, probe_hardware, setup
from splitting import Data
from store import image_names, open_store

# Training recipes. Defaults reproduce the best published DenseNet-121 on the shipped split;
# `--recipe chexnet` is the CheXNet paper's. Each value is one flag away (--lr, ...).
RECIPES = {
    # zoogzog/chexnet: mean test AUC 0.851 on this split (arnoweng's), the best published
    # DenseNet-121 on it: Adam 1e-4, weight decay 1e-5, RandomResizedCrop(224) of the
    # full-resolution image + flip, BCE, batch 16, lr / 10 after 5 epochs without
    # val-loss improvement, up to 100 epochs.
    "zoogzog": dict(lr=1e-4, weight_decay=1e-5, patience=5, epochs=100, crop_scale=0.08,
                    crop_ratio=(3 / 4, 4 / 3)),
    # Rajpurkar et al. 2017 (CheXNet): Adam 1e-3, the whole image resized to 224 + flip,
    # batch 16, lr / 10 when the val loss plateaus.
    "chexnet": dict(lr=1e-3, weight_decay=0.0, patience=1, epochs=100, crop_scale=1.0,
                    crop_ratio=(1.0, 1.0)),
}


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    add_data_args(p)
    p.add_argument("--out-dir", default="runs/chexnet", help="checkpoints and metrics")
    p.add_argument("--no-store", action="store_true",
                   help="decode PNGs even where `python dataset.py prepare` made a store")
    p.add_argument("--arch", default="densenet121", choices=list(ARCH_NAMES))
    p.add_argument("--pretrained", default="imagenet", choices=["imagenet", "none"])
    p.add_argument("--weights", default=None,
                   help="local initial weights: a torchvision ImageNet file or a CheXNet checkpoint")
    p.add_argument("--recipe", default="zoogzog", choices=list(RECIPES),
                   help="zoogzog: Adam 1e-4, wd 1e-5, random resized crops (0.851 on this split); "
                        "chexnet: the paper's lr 1e-3, whole image resized")
    p.add_argument("--train-size", type=positive_int, default=TRAIN_SIZE,
                   help="training crops are drawn from the image resized to this (1024: the "
                        f"NIH original; default {TRAIN_SIZE})")
    p.add_argument("--crop-scale", type=fraction, default=None,
                   help="smallest area fraction of RandomResizedCrop (recipe: 0.08, chexnet 1)")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="train only the head (first stage of the two-stage transfer recipe)")
    p.add_argument("--epochs", type=positive_int, default=None, help="recipe: 100")
    p.add_argument("--batch-size", type=positive_int, default=RECIPE_BATCH, help="per process")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate at a global batch of 16 (recipe: 1e-4, chexnet 1e-3)")
    p.add_argument("--no-lr-scaling", action="store_true",
                   help="keep --lr at any global batch (default: lr x sqrt(global batch / 16), "
                        "reached by a linear warm-up)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=None, help="recipe: 1e-5")
    p.add_argument("--patience", type=nonnegative_int, default=None,
                   help="epochs without val-loss improvement before lr / 10 (recipe: 5)")
    p.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="ones",
                   help="CheXpert/MIMIC uncertain labels in training: ones (U-Ones, default), "
                        "zeros (U-Zeros) or ignore (masked out of the loss with the unmentioned "
                        "ones); evaluation always leaves uncertain labels out")
    p.add_argument("--pos-weight", action="store_true",
                   help="weight positives by negatives/positives of each disease in train")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--workers", type=nonnegative_int, default=4, help="data-loader workers per process")
    add_device_args(p)
    p.add_argument("--amp", action=BooleanOptionalAction, default=None,
                   help="mixed precision autocast (default: on where the hardware runs it "
                        "natively: a CPU with AMX or AVX512-BF16, a GPU with tensor cores; "
                        "off elsewhere and on Gaudi; runtime.decide_precision)")
    p.add_argument("--amp-dtype", default=None, choices=["bf16", "fp16"],
                   help="autocast dtype (default: bf16; fp16 on a GPU without bf16, Volta or "
                        "Turing; fp16 adds a gradient scaler; not on Gaudi)")
    p.add_argument("--channels-last", action=BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: on where --amp is on by default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", default=None, help="checkpoint to resume (default: out-dir/last.pt)")
    p.add_argument("--save-every", type=nonnegative_int, default=0,
                   help="also save last.pt every N steps")
    p.add_argument("--max-steps", type=nonnegative_int, default=0,
                   help="stop (saving last.pt) after N optimizer steps in all; 0: no limit")
    p.add_argument("--log-every", type=positive_int, default=50,
                   help="steps between reads of the loss (each read waits for the device)")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="no TensorBoard event files (default: OUT_DIR/tensorboard/, rank 0)")
    p.add_argument("--progress-every", type=positive_float, default=30.0,
                   help="seconds between progress lines when stderr is not a terminal")
    p.add_argument("--check", action="store_true",
                   help="check data, weights, checkpoint and out-dir, then exit (run.sh does "
                        "this once before torchrun)")
    # --amp and --channels-last stay None when not given: run() resolves the precision (the
    # CPU's default, or a resumed run's). The recipe's values are the defaults of the flags
    # left unset, so the flags are parsed twice: nothing is written into them afterwards.
    p.set_defaults(**RECIPES[p.parse_args(argv).recipe])
    args = p.parse_args(argv)
    for flag, size in (("--resize", args.resize), ("--train-size", args.train_size)):
        if args.crop_size > size:
            p.error(f"argument --crop-size: {args.crop_size} is larger than {flag} {size}")
    return args


# ---------------------------------------------------------------------------------------------

def make_datasets(args, data, log):
    """Training crops from the store of --train-size, validation crops from the store of
    --resize, each where `python dataset.py prepare` made it, else from the PNGs: the same
    pixels either way. data: the run's splitting.Data, its split resolved."""
    names = None if args.no_store else image_names(data.data_dir, data.dataset)
    stores = {}
    for size in sorted({args.train_size, data.resize}):
        stores[size] = None if args.no_store else open_store(data.data_dir, size, names)
        if stores[size] is not None:
            log(f"reading the preprocessed store {stores[size].dir}/")
    missing = [size for size, store in stores.items() if store is None]
    # One note, however many sizes lack a store; not from run.sh's --check, which runs first:
    # the training run says it.
    if missing and not args.no_store and not args.check:
        log(f"note: no store for {' or '.join(f'{s}x{s}' for s in missing)}: decoding PNGs "
            f"(`python dataset.py prepare --data-dir {data.data_dir} --size "
            f"{' '.join(map(str, missing))}` makes loading far cheaper)")
    common = dict(crop=data.crop_size, skip_bad_images=args.skip_bad_images, limit=args.limit)
    lists = data.lists
    return (XrayDataset(data.data_dir, lists["train"], "train", args.train_size, seed=args.seed,
                        crop_scale=(args.crop_scale, 1.0), crop_ratio=args.crop_ratio,
                        store=stores[args.train_size], uncertain=args.uncertain, **common),
            XrayDataset(data.data_dir, lists["val"], "center", data.resize,
                        store=stores[data.resize], **common))


def main(argv=None):
    args = get_args(argv)
    rt = None
    try:
        rt = setup(args.device)
        return run(args, rt)
    except (DataError, SetupError, NonFiniteLoss) as e:  # CheckpointError is a DataError
        prefix = f"[rank {rt.rank}] " if rt is not None and rt.distributed else ""
        if rt is None or rt.is_main or not isinstance(e, DataError):
            print(f"{prefix}error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if rt is None or rt.is_main:
            last = Path(args.out_dir) / "last.pt"
            where = (f"run the same command to resume from {last}" if last.is_file()
                     else "nothing was saved yet")
            print(f"interrupted: {where}", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, rt):
    """Train; returns the bare model (tests compare ranks' weights through it)."""
    log = print if rt.is_main else (lambda *a, **k: None)
    data = Data(args.data_dir, args.split, args.split_seed, args.keep_laterals, args.resize,
                args.crop_size)
    check_data_dir(data.data_dir, data.dataset)
    # The precision: the flags given, the hardware's fastest native path for those left unset
    # (runtime.decide_precision), or a resumed run's checkpoint's
    hardware = probe_hardware(rt.device.type)
    decision = decide_precision(hardware, args.amp, args.channels_last, args.amp_dtype)
    precision, reason = keep_trained_precision(args, decision, log)
    if rt.device.type == "hpu" and precision.uses_scaler:
        raise SetupError("--amp-dtype fp16: Gaudi trains in bf16 (no fp16 gradient scaler); "
                         "use --amp alone")
    if rt.distributed:  # one precision for every rank, or none: the hardware may differ
        chosen = [None] * rt.world_size
        dist.all_gather_object(chosen, (str(precision), hardware.name))
        if len({c[0] for c in chosen}) > 1:
            other = next(r for r, c in enumerate(chosen) if c[0] != chosen[0][0])
            raise SetupError(f"the ranks' hardware chooses different precisions (rank 0, "
                             f"{chosen[0][1]}: {chosen[0][0]}; rank {other}, {chosen[other][1]}: "
                             f"{chosen[other][0]}): pass --amp or --no-amp, --amp-dtype and "
                             "--channels-last or --no-channels-last")
    log(f"precision: {precision} ({reason})")
    # The training flags every checkpoint records ("args"): the flags, the precision as
    # applied, and what chose it and why
    flags = {**vars(args), "amp": precision.amp, "amp_dtype": precision.amp_dtype,
             "channels_last": precision.channels_last, "precision": str(precision),
             "precision_note": reason, "precision_defaults": decision.defaulted}
    data = data.resolved()
    train_set, val_set = make_datasets(args, data, log)
    global_batch = args.batch_size * rt.world_size
    if len(train_set) < global_batch:
        raise DataError(f"{data.lists['train']}: {len(train_set)} images, fewer than one batch "
                        f"({args.batch_size} x {rt.world_size} processes)")
    out_dir = Path(args.out_dir)
    with ExitStack() as stack:
        if rt.is_main:  # one training per out-dir; the kernel drops the lock if we die
            check_writable_dir(out_dir, "--out-dir")
            if not args.no_tensorboard:
                check_writable_dir(out_dir / TENSORBOARD_DIR, "--out-dir")
            stack.enter_context(exclusive_lock(
                out_dir / ".lock", "another training", "use another --out-dir"))
            for stale in out_dir.glob(".*.tmp"):  # temp files of a writer killed mid-write
                stale.unlink(missing_ok=True)
        return _train(args, rt, precision, flags, data, train_set, val_set, global_batch,
                      out_dir, log)


PRECISION_FLAGS = {"amp": "--{}amp", "amp_dtype": "--amp-dtype {}",
                   "channels_last": "--{}channels-last"}


def _flag(key, value):
    return PRECISION_FLAGS[key].format(value if key == "amp_dtype" else "" if value else "no-")


def keep_trained_precision(args, decision, log):
    """(precision, reason): a resumed run goes on in the precision (autocast, its dtype,
    channels_last) its checkpoint was trained in, whatever this machine's default: a run
    resumed on another machine (or node) would otherwise change precision half-way. A flag
    given on resume wins over the checkpoint, with a line saying so; to or from fp16 (its
    gradient scaler's state) load_checkpoint refuses in one line."""
    precision, reason = decision.precision, decision.reason
    last = Path(args.out_dir) / "last.pt"
    resume = args.resume or (last if last.is_file() else None)
    if not resume:
        return precision, reason
    trained = read_training_flags(resume)
    if "amp" not in trained:
        return precision, reason
    was = Precision(bool(trained["amp"]), trained.get("amp_dtype") or "bf16",
                    bool(trained.get("channels_last")))
    # a run trained without autocast recorded a dtype it never used: that one is not kept
    resumed = replace(precision, **{k: getattr(was, k) for k in decision.defaulted
                                    if k != "amp_dtype" or was.amp})
    given = {k: getattr(precision, k) for k in PRECISION_FLAGS
             if k not in decision.defaulted and getattr(precision, k) != getattr(was, k)
             and (k != "amp_dtype" or was.amp or precision.amp)}
    flags = ", ".join(_flag(k, v) for k, v in given.items())
    if given:
        if resumed.uses_scaler == was.uses_scaler:  # else load_checkpoint refuses
            log(f"note: {resume} was trained in {was}; {flags} given: resuming in {resumed} "
                "(the flag wins)")
        return resumed, f"{flags} over the {was} {resume} was trained in"
    if str(resumed) == str(precision):
        return resumed, reason
    change = ", ".join(_flag(k, getattr(precision, k)) for k in decision.defaulted
                       if getattr(precision, k) != getattr(was, k))
    log(f"note: {resume} was trained in {was}: resuming the same way, not in {precision} as "
        f"this machine would ({change} changes it)")
    return resumed, (f"as {resume} was trained; this machine would choose {precision}: "
                     f"{decision.reason}")


@dataclass
class Training:
    """What a run updates: the bare model (what checkpoints hold), the network that runs it
    (compiled, DDP-wrapped), the optimizer and its companions."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    criterion: torch.nn.Module
    lr: LearningRate
    pos_weight: object
    steps_per_epoch: int
    settings: StepSettings  # how its steps run (precision, frozen backbone, ...)
    net: object = None


def build_training(args, rt, precision, train_set, resume, out_dir, global_batch):
    """The model (random, ImageNet or --weights; a resumed run's come from its checkpoint),
    on the device, with its optimizer, lr schedule, gradient scaler and loss."""
    # One download of the ImageNet weights per node: local rank 0 first, the others after.
    # A resumed run takes its weights from the checkpoint: nothing to download.
    if rt.distributed and rt.local_rank != 0:
        dist.barrier()
    classes = train_set.class_names  # the head's outputs, saved with every checkpoint
    model = build_model(args.arch, len(classes), "none" if resume else args.pretrained,
                        None if resume else args.weights, args.freeze_backbone)
    if rt.distributed and rt.local_rank == 0:
        dist.barrier()
    if rt.is_main:  # room for a checkpoint's temp file and best.pt beside last.pt
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        check_writable_dir(out_dir, "--out-dir", need_bytes=2 * 3 * params)
    model = model.to(rt.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(train_set) // global_batch
    lr = LearningRate(args.lr, global_batch, steps_per_epoch, scaling=not args.no_lr_scaling)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=args.lr if lr.warmup else lr.peak, betas=(0.9, 0.999),
                                 weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1,
                                                           patience=args.patience)
    scaler = torch.amp.GradScaler(rt.device.type if rt.device.type != "hpu" else "cpu",
                                  enabled=precision.uses_scaler)
    pos_weight = None
    if args.pos_weight:
        targets = train_set.labels.astype(np.float64)  # NaN: ignored
        positives = np.nansum(targets, 0).clip(min=1)
        pos_weight = torch.tensor((np.isfinite(targets).sum(0) - positives) / positives,
                                  dtype=torch.float32, device=rt.device)
    # Plain BCE for labels that are all known (NIH's); the masked one where some are ignored
    masked = train_set.labels.dtype != np.uint8 and np.isnan(train_set.labels).any()
    criterion = (MaskedBCE if masked else torch.nn.BCEWithLogitsLoss)(pos_weight=pos_weight)
    settings = StepSettings(precision, args.freeze_backbone, args.max_steps, args.log_every)
    return Training(model, optimizer, scheduler, scaler, criterion, lr, pos_weight,
                    steps_per_epoch, settings)


def resume_state(args, rt, t, flags, resume, out_dir, data_ids, global_batch, log):
    """The run's state: fresh, or the checkpoint's (its weights and optimizer loaded into t)."""
    if rt.distributed:  # every rank must resume from the same file, or none
        seen = [None] * rt.world_size
        dist.all_gather_object(seen, str(resume) if resume else None)
        if len(set(seen)) > 1:
            raise SetupError(f"rank 0 resumes from {seen[0]} but other ranks see {set(seen[1:])}: "
                             "put --out-dir on a filesystem every node shares")
    state = {"class_names": data_ids["classes"], "epoch": 0, "step": 0, "epoch_images": 0,
             "best_auc": -math.inf, "best_epoch": None,
             "history": [], "partial": {"loss_sum": 0.0, "images": 0},
             "world_size": rt.world_size, "batch_size": args.batch_size}
    if not resume:
        return state
    last = out_dir / "last.pt"
    ckpt = load_checkpoint(resume, t.model, t.optimizer, t.scheduler, t.scaler, flags, data_ids)
    state.update({k: ckpt[k] for k in state if k in ckpt})
    log(f"resuming from {resume}: epoch {state['epoch']}, step {state['step']}")
    if rt.is_main and Path(resume).resolve() == last.resolve():
        repair_outputs(out_dir, ckpt, log)
    old_batch = ckpt["batch_size"] * ckpt["world_size"]
    if old_batch != global_batch:
        note = (f"note: global batch {old_batch} -> {global_batch}: the epoch continues "
                f"after the {state['epoch_images']} images already seen")
        if not args.no_lr_scaling:
            for group in t.optimizer.param_groups:
                group["lr"] *= math.sqrt(global_batch / old_batch)
            note += f"; lr x sqrt({global_batch}/{old_batch})"
        log(note)
    if ckpt["args"].get("lr") != args.lr:
        log(f"note: the resumed optimizer keeps its learning rate schedule; --lr {args.lr} "
            "applies to new runs only")
    return state


def train_epoch(t, args, rt, train_set, state, epoch, global_batch, save, board):
    """Train epoch `epoch` from where `state` says it stopped (a resumed run continues after
    the images it has seen); state takes the new step, position and partial loss. Returns
    train_one_epoch's metrics."""
    n = len(train_set)
    last = Path(args.out_dir) / "last.pt"
    train_set.set_epoch(epoch)
    start_images = state["epoch_images"]
    indices = rank_indices(epoch_order(n, args.seed, epoch), start_images, rt.world_size,
                           rt.rank, args.batch_size)
    loader = make_loader(train_set, indices, args.batch_size, args.workers, rt, train=True)
    partial = dict(state["partial"])

    def on_step(step, batches, check):
        if rt.is_main and args.save_every and step % args.save_every == 0:
            loss = check()  # waits for the device; raises on a non-finite loss
            board.flush()
            save(last, epoch=epoch, step=step,
                 epoch_images=start_images + batches * global_batch,
                 partial={"loss_sum": partial["loss_sum"] + loss * batches * args.batch_size,
                          "images": partial["images"] + batches * args.batch_size})

    progress = Progress(t.steps_per_epoch * global_batch, start_images, rt.is_main,
                        every=args.progress_every, label=f"epoch {epoch + 1}",
                        final_line=False, leave=False)
    try:
        stats = train_one_epoch(t.net, loader, t.criterion, t.optimizer, t.scaler, rt,
                                t.settings, epoch, state["step"], on_step, t.lr,
                                on_log=board.scalars, progress=progress)
    except NonFiniteLoss as e:
        kept = f"{last} keeps the last good weights" if last.is_file() else "nothing saved"
        raise NonFiniteLoss(f"{e}; training stopped, {kept}") from None
    finally:
        progress.close()
    state["step"] = stats["step"]
    state["partial"] = {"loss_sum": partial["loss_sum"] + stats["loss_sum"],
                        "images": partial["images"] + stats["images"]}
    state["epoch_images"] = start_images + stats["batches"] * global_batch
    return stats


def validate(t, val_loader, rt, args, epoch):
    """evaluate() at the end of an epoch; diverged weights stop the run in one line."""
    last = Path(args.out_dir) / "last.pt"
    try:
        return evaluate(t.net, val_loader, rt, t.settings.precision, t.pos_weight)
    except NonFiniteLoss as e:
        kept = f"{last} keeps the last good weights" if last.is_file() else "nothing saved"
        raise NonFiniteLoss(f"{e} at epoch {epoch + 1}; training stopped, {kept}") from None


def epoch_record(t, args, rt, state, epoch, stats, val, seconds, global_batch):
    """The epoch's line of metrics.jsonl, the same on every rank (train loss and loader wait
    averaged over ranks)."""
    train_loss = state["partial"]["loss_sum"] / max(state["partial"]["images"], 1)
    wait = stats["loader_wait_share"]
    if rt.distributed:  # mean over ranks, so every rank logs the same number
        both = torch.tensor([train_loss, wait], device=rt.device)
        dist.all_reduce(both)
        train_loss, wait = (both / rt.world_size).tolist()
    record = {"epoch": epoch + 1, "steps": state["step"], "batches": t.steps_per_epoch,
              "global_batch": global_batch, "train_loss": train_loss,
              "val_loss": val["loss"], "val_mean_auc": val["mean_auc"],
              "val_auc": dict(zip(state["class_names"], val["auc"].tolist())),
              "lr": t.optimizer.param_groups[0]["lr"], "seconds": seconds,
              "images_per_s": stats["images"] * rt.world_size / stats["seconds"],
              "loader_wait_share": wait, "data_dir": str(args.data_dir)}
    if rt.device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(rt.device) / 2 ** 30
    return record


def _train(args, rt, precision, flags, data, train_set, val_set, global_batch, out_dir, log):
    torch.manual_seed(args.seed)
    data_ids = data_identity(train_set, val_set)
    last, best = out_dir / "last.pt", out_dir / "best.pt"
    resume = args.resume or (last if last.is_file() else None)
    t = build_training(args, rt, precision, train_set, resume, out_dir, global_batch)
    state = resume_state(args, rt, t, flags, resume, out_dir, data_ids, global_batch, log)
    n = len(train_set)
    if args.check:
        log(f"ok: {n} train / {len(val_set)} val images, {args.arch}, out-dir {out_dir}"
            + (f", resuming from {resume}" if resume else ""))
        return t.model

    t.net = t.model
    if args.compile:
        t.net = torch.compile(t.model, backend="hpu_backend" if rt.device.type == "hpu"
                              else "inductor")
    if rt.distributed:
        t.net = DDP(t.net, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    val_sampler = torch.utils.data.DistributedSampler(
        val_set, num_replicas=rt.world_size, rank=rt.rank, shuffle=False)
    val_loader = make_loader(val_set, val_sampler, args.batch_size, args.workers, rt, train=False)
    lr = t.lr
    log(f"{args.arch} on {rt.world_size} x {rt.device.type}, {precision}: {n} train / "
        f"{len(val_set)} val images; global batch {global_batch} ({args.batch_size} x "
        f"{rt.world_size}), {t.steps_per_epoch} steps per epoch; lr {lr.peak:.3g}"
        + (f" (recipe {args.lr:.3g} x sqrt({global_batch}/{RECIPE_BATCH}), {lr.warmup} warm-up "
           "steps)" if lr.peak != args.lr else "") + f"; out-dir {out_dir}")
    # training's own val AUC is not the evaluation's: say which it is, once
    log(f"val mean AUC after each epoch: {len(val_set)} val images, "
        f"{protocol_name(data.resize, data.crop_size, ten_crop=False)}, {BACKEND_NAMES['torch']} "
        f"{precision} (quick; `infer.py --part val` scores ten crops, the published "
        "protocol, and gives another number)")
    if state["epoch"] >= args.epochs:
        log(f"nothing to do: {resume} already holds epoch {state['epoch']} of {args.epochs}")
        return t.model

    def save(path, **extra):
        save_checkpoint(path, t.model, t.optimizer, t.scheduler, t.scaler, flags,
                        **{**state, "world_size": rt.world_size, "batch_size": args.batch_size,
                           "data": data_ids, **extra})

    # Events of a killed process beyond the checkpoint's step are purged: none twice.
    board = Board(out_dir, state["step"] + 1, rt.is_main and not args.no_tensorboard, log)
    with ExitStack() as stack:
        stack.callback(board.close)
        for epoch in range(state["epoch"], args.epochs):
            start = time.perf_counter()
            if rt.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(rt.device)
            stats = train_epoch(t, args, rt, train_set, state, epoch, global_batch, save, board)
            if state["epoch_images"] + global_batch <= n:  # --max-steps reached mid-epoch
                if rt.is_main:
                    board.flush()
                    save(last, epoch=epoch)
                log(f"stopped after {state['step']} steps (--max-steps); resume with the same "
                    "--out-dir")
                return t.model
            val = validate(t, val_loader, rt, args, epoch)
            t.scheduler.step(val["loss"])
            record = epoch_record(t, args, rt, state, epoch, stats, val,
                                  time.perf_counter() - start, global_batch)
            improved = not math.isnan(val["mean_auc"]) and val["mean_auc"] > state["best_auc"]
            if improved:
                state["best_auc"], state["best_epoch"] = val["mean_auc"], epoch + 1
            state.update(epoch=epoch + 1, epoch_images=0, partial={"loss_sum": 0.0, "images": 0},
                         history=state["history"] + [record])
            if rt.is_main:
                # TensorBoard first: a kill before last.pt is written purges the epoch's
                # events on resume, and it is trained again; after, they stay.
                board.epoch(state["step"], record, record.get("peak_memory_gib"))
                board.flush()
                # last.pt next: it is the record that best.pt and metrics.jsonl are repaired from.
                save(last)
                if improved or not best.is_file():
                    atomic_copy(last, best, "checkpoint")
                write_metrics(out_dir, state["history"])
            log(f"epoch {epoch + 1}/{args.epochs}  batches {t.steps_per_epoch}  train loss "
                f"{record['train_loss']:.4f}  val loss {val['loss']:.4f}  val mean AUC "
                f"{val['mean_auc']:.4f} ({CENTRE_CROP})  {record['seconds']:.1f}s  "
                f"{record['images_per_s']:.1f} img/s  loader wait "
                f"{record['loader_wait_share']:.0%}")
            if args.max_steps and state["step"] >= args.max_steps and epoch + 1 < args.epochs:
                log(f"stopped after {state['step']} steps (--max-steps); resume with the same "
                    "--out-dir")
                return t.model
    log(f"done: best val mean AUC {state['best_auc']:.4f} (epoch {state['best_epoch']}; "
        f"{len(val_set)} val images, {CENTRE_CROP}), "
        f"checkpoints in {out_dir}")
    if rt.is_main:
        figure(out_dir, log)
    return t.model


def figure(out_dir, log):
    """OUT_DIR/curves.png at the end of a run (`python curves.py OUT_DIR` draws it any time)."""
    try:
        log(f"curves: {write_figure(out_dir)}")
    except ImportError:
        log(f"note: no matplotlib: no {out_dir}/curves.png")
    except DataError as e:  # the run itself is done and saved
        log(f"note: no curves.png: {one_line(e)}")


if __name__ == "__main__":
    main()
