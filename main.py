"""Train CheXNet on ChestX-ray14, in one process or with DDP under torchrun.

    python main.py --data-dir sample --epochs 2                       # one process
    torchrun --standalone --nproc_per_node=8 main.py --amp            # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29400 --rdzv-id=chexnet main.py --hpu    # several nodes
Rank and device come from torchrun's environment; rank 0 prints and writes. Starting again
with the same --out-dir resumes from its last.pt; torchrun --max-restarts=K does that for you
after a worker dies (export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 first: pytorch#135712).
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from dataset import (CLASS_NAMES, ChestXray14, DataError, StoreDataset, add_data_args,
                     check_data_dir, collate, mean_auc, one_line, open_store, resolve_split,
                     roc_aucs, to_model_input)
from model import ARCHS, CheckpointError, build_model, load_file, load_weights


class SetupError(Exception):
    """A device or distribution problem; one line."""


class NonFiniteLoss(Exception):
    pass


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(p)
    p.add_argument("--out-dir", default="runs/chexnet", help="checkpoints and metrics")
    p.add_argument("--no-store", action="store_true",
                   help="decode PNGs even where `python dataset.py prepare` made a store")
    p.add_argument("--arch", default="densenet121", choices=list(ARCHS))
    p.add_argument("--pretrained", default="imagenet", choices=["imagenet", "none"])
    p.add_argument("--weights", default=None,
                   help="local initial weights: a torchvision ImageNet file or a CheXNet checkpoint")
    p.add_argument("--crop-scale", type=float, default=0.08,
                   help="smallest area fraction of RandomResizedCrop (torchvision's default)")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="train only the head (first stage of the two-stage transfer recipe)")
    # The CheXNet paper: Adam (0.9, 0.999), lr 1e-3, batch 16, lr / 10 when val loss plateaus.
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=1,
                   help="epochs without val-loss improvement before lr / 10")
    p.add_argument("--pos-weight", action="store_true",
                   help="weight positives by negatives/positives of each disease in train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="data-loader workers per process")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "hpu"])
    p.add_argument("--hpu", action="store_true", help="shorthand for --device hpu (Intel Gaudi)")
    p.add_argument("--amp", action="store_true", help="mixed precision autocast")
    p.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"],
                   help="autocast dtype (fp16 adds a gradient scaler)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", default=None, help="checkpoint to resume (default: out-dir/last.pt)")
    p.add_argument("--save-every", type=int, default=0, help="also save last.pt every N steps")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop (saving last.pt) after N optimizer steps in all; 0: no limit")
    args = p.parse_args(argv)
    if args.hpu:
        args.device = "hpu"
    return args


# ---------------------------------------------------------------------------------------------
# Device and distribution

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    htcore: object = None  # habana_frameworks.torch.core on Gaudi in lazy mode, else None

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def mark_step(self):
        """Gaudi lazy mode runs the accumulated graph here; elsewhere nothing."""
        if self.htcore is not None:
            self.htcore.mark_step()


def _import_gaudi():
    try:
        import habana_frameworks.torch.core as htcore
    except ImportError:
        raise SetupError("--hpu: the Intel Gaudi software (habana_frameworks) is not installed; "
                         "run inside an Intel Gaudi PyTorch container, or use --device cpu/cuda"
                         ) from None
    return htcore


def setup(device="auto"):
    """Pick the device and join the process group torchrun describes (if any)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    htcore = None
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SetupError("--device cuda: no CUDA GPU is visible to PyTorch")
        if local_rank >= torch.cuda.device_count():
            raise SetupError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif device == "hpu":
        core = _import_gaudi()
        if world_size > 1:
            import habana_frameworks.torch.distributed.hccl  # noqa: F401  registers 'hccl'
        # Recent Gaudi releases run eager by default; lazy mode (PT_HPU_LAZY_MODE=1) needs
        # mark_step() to cut the graph after backward() and after optimizer.step().
        htcore = core if os.environ.get("PT_HPU_LAZY_MODE", "0") == "1" else None
        dev = torch.device("hpu")
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise SetupError(f"unknown --device {device!r} (auto, cpu, cuda or hpu)")
    if world_size > 1 and not dist.is_initialized():
        if (rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0):
            # pytorch/pytorch#135712: with the store shared between torchrun's rendezvous and
            # the process group, restarted workers can read the last attempt's addresses
            # and hang. run.sh sets this for you.
            print("warning: restarts need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
                  "environment (pytorch/pytorch#135712)", file=sys.stderr)
        backend = {"cpu": "gloo", "cuda": "nccl", "hpu": "hccl"}[dev.type]
        dist.init_process_group(backend=backend)
    return Runtime(dev, rank, local_rank, world_size, htcore)


def gather_from_ranks(rt, *arrays):
    """Concatenate each array over ranks (rank order), as numpy."""
    if not rt.distributed:
        return arrays
    gathered = [None] * rt.world_size
    dist.all_gather_object(gathered, arrays)
    return tuple(np.concatenate([g[i] for g in gathered]) for i in range(len(arrays)))


# ---------------------------------------------------------------------------------------------
# Train and evaluate

def train_one_epoch(model, loader, criterion, optimizer, scaler, rt, args, epoch, step, on_step):
    """One pass over this rank's shard. `step` counts optimizer steps over the whole run;
    on_step(step, batches, loss_sum, images) is called after each. Returns the epoch's metrics."""
    model.train()
    loss_sum, images, batches, start = 0.0, 0, 0, time.perf_counter()
    amp = _autocast(rt, args)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False,
               disable=not (rt.is_main and sys.stderr.isatty()))
    for batch in bar:
        batches += 1
        if batch is None:  # every image of the batch was unreadable and skipped
            continue
        x, y = to_device(batch, rt, args)  # (B, 3, crop, crop) float, (B, 14)
        with amp:
            loss = criterion(model(x), y)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"loss is {loss_value} at epoch {epoch + 1} step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        rt.mark_step()
        scaler.step(optimizer)
        scaler.update()
        rt.mark_step()
        step += 1
        loss_sum += loss_value * x.shape[0]
        images += x.shape[0]
        bar.set_postfix(loss=f"{loss_sum / images:.4f}")
        on_step(step, batches, loss_sum, images)
        if args.max_steps and step >= args.max_steps:
            break
    return {"loss_sum": loss_sum, "images": images, "batches": batches, "step": step,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model, loader, rt, args, pos_weight=None):
    """Loss and per-disease ROC-AUC over the whole split: every rank's predictions gathered,
    the duplicates DistributedSampler pads with dropped (by image name)."""
    model.eval()
    logits, labels, names = [], [], []
    amp = _autocast(rt, args)
    for batch in tqdm(loader, desc="val", leave=False,
                      disable=not (rt.is_main and sys.stderr.isatty())):
        if batch is None:
            continue
        x, _ = to_device(batch, rt, args)
        y, batch_names = batch[1], batch[2]
        if x.dim() == 5:  # ten-crop (B, 10, 3, H, W): mean of the crops' logits
            b, n = x.shape[:2]
            with amp:
                out = model(x.flatten(0, 1)).view(b, n, -1).mean(1)
        else:
            with amp:
                out = model(x)
        rt.mark_step()
        logits.append(out.float().cpu().numpy())
        labels.append(y.numpy())
        names.extend(batch_names)
    empty = np.zeros((0, len(CLASS_NAMES)), np.float32)
    logits, labels, names = gather_from_ranks(
        rt, np.concatenate(logits) if logits else empty,
        np.concatenate(labels) if labels else empty, np.array(names, dtype=object))
    _, first = np.unique(names, return_index=True)
    logits, labels = logits[np.sort(first)], labels[np.sort(first)]
    loss = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(labels),
        pos_weight=None if pos_weight is None else pos_weight.cpu()).item()
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    aucs = roc_aucs(labels, probs)
    return {"loss": loss, "auc": aucs, "mean_auc": mean_auc(aucs), "images": len(labels)}


def to_device(batch, rt, args):
    """A loader batch -> model input and labels on the device. Images travel as uint8, one
    channel (the store's training batches uncropped, with their crop boxes); channel expansion,
    normalisation and the store's crops happen on the device."""
    x, y = batch[0].to(rt.device, non_blocking=True), batch[1].to(rt.device, non_blocking=True)
    boxes = batch[3] if len(batch) > 3 else None
    x = to_model_input(x, boxes, args.crop_size)
    if args.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _autocast(rt, args):
    if not args.amp:
        return nullcontext()
    dtype = torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16
    return torch.autocast(device_type=rt.device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, model, optimizer, scheduler, scaler, args, **state):
    """Atomically (temp file + rename): a kill never leaves a broken checkpoint. Holds the bare
    model's state dict (no DDP or compile prefixes) and everything needed to resume."""
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise NonFiniteLoss(f"weights became non-finite ({name}); {path} not overwritten")
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
               "args": vars(args), "class_names": CLASS_NAMES, **state}
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, model, optimizer, scheduler, scaler, args):
    ckpt = load_file(path, "checkpoint")
    if not (isinstance(ckpt, dict) and "model" in ckpt and "optimizer" in ckpt):
        raise CheckpointError(f"{path}: not a training checkpoint of main.py (no model/optimizer "
                              "state); to start from its weights use --weights")
    trained = ckpt.get("args", {})
    if trained.get("arch", args.arch) != args.arch:
        raise CheckpointError(f"{path}: trained with --arch {trained['arch']}, not {args.arch}")
    load_weights(model, ckpt["model"], path, args.arch, len(CLASS_NAMES))
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    return ckpt


# ---------------------------------------------------------------------------------------------

def make_datasets(args, lists, log):
    """From the preprocessed store when `python dataset.py prepare` made one for --resize,
    else from the PNGs; either way uint8 items finished on the device."""
    store = None if args.no_store else open_store(args.data_dir, args.resize)
    if store is not None:
        log(f"reading the preprocessed store {store.dir}/")
        kwargs = dict(crop=args.crop_size, limit=args.limit)
        return (StoreDataset(store, lists["train"], "train", seed=args.seed,
                             crop_scale=args.crop_scale, **kwargs),
                StoreDataset(store, lists["val"], "center", **kwargs))
    kwargs = dict(resize=args.resize, crop=args.crop_size, skip_bad_images=args.skip_bad_images,
                  limit=args.limit, raw=True)
    return (ChestXray14(args.data_dir, lists["train"], mode="train", seed=args.seed,
                        crop_scale=args.crop_scale, **kwargs),
            ChestXray14(args.data_dir, lists["val"], mode="center", **kwargs))


def make_loader(dataset, sampler_indices, args, rt, train):
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler_indices, num_workers=args.workers,
        collate_fn=collate, pin_memory=rt.device.type == "cuda", drop_last=train,
        # A new worker pool each epoch picks up dataset.set_epoch() (seeded augmentation).
        persistent_workers=False)


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
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, rt):
    """Train; returns the bare model (tests compare ranks' weights through it)."""
    log = print if rt.is_main else (lambda *a, **k: None)
    check_data_dir(args.data_dir)
    lists = resolve_split(args.split, args.data_dir, args.split_seed)
    train_set, val_set = make_datasets(args, lists, log)
    if len(train_set) < args.batch_size * rt.world_size:
        raise DataError(f"{lists['train']}: {len(train_set)} images, fewer than one batch "
                        f"({args.batch_size} x {rt.world_size} processes)")

    torch.manual_seed(args.seed)
    model = build_model(args.arch, len(CLASS_NAMES), args.pretrained, args.weights,
                        args.freeze_backbone).to(rt.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                 betas=(0.9, 0.999), weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1,
                                                           patience=args.patience)
    scaler = torch.amp.GradScaler(rt.device.type if rt.device.type != "hpu" else "cpu",
                                  enabled=args.amp and args.amp_dtype == "fp16")
    pos_weight = None
    if args.pos_weight:
        positives = train_set.labels.sum(0).clip(min=1)
        pos_weight = torch.tensor((len(train_set) - positives) / positives,
                                  dtype=torch.float32, device=rt.device)
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    out_dir = Path(args.out_dir)
    last, best = out_dir / "last.pt", out_dir / "best.pt"
    resume = args.resume or (last if last.is_file() else None)
    if rt.distributed:  # every rank must resume from the same file, or none
        seen = [None] * rt.world_size
        dist.all_gather_object(seen, str(resume) if resume else None)
        if len(set(seen)) > 1:
            raise SetupError(f"rank 0 resumes from {seen[0]} but other ranks see {set(seen[1:])}: "
                             "put --out-dir on a filesystem every node shares")
    start_epoch, step, skip_steps, best_auc = 0, 0, 0, -math.inf
    partial = {"loss_sum": 0.0, "images": 0}
    if resume:
        ckpt = load_checkpoint(resume, model, optimizer, scheduler, scaler, args)
        start_epoch, step, skip_steps = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
        best_auc = ckpt["best_auc"]
        partial = ckpt.get("partial", partial)
        log(f"resuming from {resume}: epoch {start_epoch}, step {step}")
        if ckpt["args"].get("lr") != args.lr:
            log(f"note: the resumed optimizer keeps its learning rate schedule; --lr {args.lr} "
                "applies to new runs only")
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    net = torch.compile(model) if args.compile else model
    if rt.distributed:
        net = DDP(net, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    train_sampler = torch.utils.data.DistributedSampler(
        train_set, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=args.seed,
        drop_last=True)
    val_sampler = torch.utils.data.DistributedSampler(
        val_set, num_replicas=rt.world_size, rank=rt.rank, shuffle=False)
    val_loader = make_loader(val_set, val_sampler, args, rt, train=False)
    steps_per_epoch = len(train_sampler) // args.batch_size
    log(f"{args.arch} on {rt.world_size} x {rt.device.type}: {len(train_set)} train / "
        f"{len(val_set)} val images, {steps_per_epoch} steps per epoch, out-dir {out_dir}")

    for epoch in range(start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        indices = list(train_sampler)[skip_steps * args.batch_size:]  # resume mid-epoch
        loader = make_loader(train_set, indices, args, rt, train=True)
        start = time.perf_counter()

        def on_step(step, batches, loss_sum, images, epoch=epoch, skip=skip_steps,
                    base=dict(partial)):
            if rt.is_main and args.save_every and step % args.save_every == 0:
                save_checkpoint(last, model, optimizer, scheduler, scaler, args, epoch=epoch,
                                step=step, step_in_epoch=skip + batches,
                                best_auc=best_auc,
                                partial={"loss_sum": base["loss_sum"] + loss_sum,
                                         "images": base["images"] + images})

        try:
            stats = train_one_epoch(net, loader, criterion, optimizer, scaler, rt, args, epoch,
                                    step, on_step)
        except NonFiniteLoss as e:
            kept = f"{last} keeps the last good weights" if last.is_file() else "nothing saved"
            raise NonFiniteLoss(f"{e}; training stopped, {kept}") from None
        step = stats["step"]
        loss_sum, images = partial["loss_sum"] + stats["loss_sum"], partial["images"] + stats["images"]
        done = skip_steps + stats["batches"] >= steps_per_epoch
        if not done:  # --max-steps reached mid-epoch
            if rt.is_main:
                save_checkpoint(last, model, optimizer, scheduler, scaler, args, epoch=epoch,
                                step=step, step_in_epoch=skip_steps + stats["batches"],
                                best_auc=best_auc, partial={"loss_sum": loss_sum, "images": images})
            log(f"stopped after {step} steps (--max-steps); resume with the same --out-dir")
            return model
        skip_steps, partial = 0, {"loss_sum": 0.0, "images": 0}
        val = evaluate(net, val_loader, rt, args, pos_weight)
        scheduler.step(val["loss"])
        seconds = time.perf_counter() - start
        train_loss = loss_sum / max(images, 1)
        if rt.distributed:  # mean over ranks, so every rank logs the same number
            t = torch.tensor([train_loss], device=rt.device)
            dist.all_reduce(t)
            train_loss = t.item() / rt.world_size
        record = {"epoch": epoch + 1, "steps": step, "batches": steps_per_epoch,
                  "train_loss": train_loss, "val_loss": val["loss"], "val_mean_auc": val["mean_auc"],
                  "val_auc": dict(zip(CLASS_NAMES, val["auc"].tolist())),
                  "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                  "images_per_s": stats["images"] * rt.world_size / stats["seconds"]}
        improved = not math.isnan(val["mean_auc"]) and val["mean_auc"] > best_auc
        best_auc = val["mean_auc"] if improved else best_auc
        if rt.is_main:
            save_checkpoint(last, model, optimizer, scheduler, scaler, args, epoch=epoch + 1,
                            step=step, step_in_epoch=0, best_auc=best_auc, metrics=record)
            if improved or not best.is_file():
                save_checkpoint(best, model, optimizer, scheduler, scaler, args, epoch=epoch + 1,
                                step=step, step_in_epoch=0, best_auc=best_auc, metrics=record)
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        log(f"epoch {epoch + 1}/{args.epochs}  batches {steps_per_epoch}  train loss "
            f"{train_loss:.4f}  val loss {val['loss']:.4f}  val mean AUC {val['mean_auc']:.4f}  "
            f"{seconds:.1f}s  {record['images_per_s']:.1f} img/s")
        if args.max_steps and step >= args.max_steps and epoch + 1 < args.epochs:
            log(f"stopped after {step} steps (--max-steps); resume with the same --out-dir")
            return model
    log(f"done: best val mean AUC {best_auc:.4f}, checkpoints in {out_dir}")
    return model


if __name__ == "__main__":
    main()
