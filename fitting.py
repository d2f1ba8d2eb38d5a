"""What a training run is made of (torch): the order of an epoch over the ranks, the learning
rate's warm-up, the masked loss, one epoch of optimizer steps and the validation pass, and
the loaders that feed them. Each takes explicit values; main.py reads the flags and runs them.
"""
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import NonFiniteLoss
from dataset import collate, to_model_input
from metrics import mean_auc, roc_aucs
from model import train_mode
from runtime import Precision, gather_from_ranks

RECIPE_BATCH = 16  # the global batch both recipes were tuned at
WARMUP_STEPS = 500  # at most, and never more than one epoch


# ---------------------------------------------------------------------------------------------
# The order of an epoch: one permutation for all ranks, consumed by global batches

def epoch_order(n, seed, epoch):
    """The epoch's permutation of the n training images: DistributedSampler's
    (torch.randperm seeded with seed + epoch), the same on every rank and world size."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def rank_indices(order, start, world_size, rank, batch_size):
    """This rank's images for the rest of an epoch that has used order[:start]: global batches
    of world_size x batch_size, rank r taking every world_size-th image from r on (as
    DistributedSampler with drop_last does), the last incomplete global batch dropped.
    Position in the epoch is a count of images, so a run resumes exactly where it stopped
    even with another world size or batch size."""
    rest = order[start:]
    steps = len(rest) // (world_size * batch_size)
    return rest[rank:steps * world_size * batch_size:world_size]


# ---------------------------------------------------------------------------------------------
# Train and evaluate

class LearningRate:
    """The recipe's lr scaled by sqrt(global batch / 16) (Adam's square-root rule), reached
    by a linear warm-up from the recipe's own lr over the first steps; ReduceLROnPlateau's
    divisions apply on top."""

    def __init__(self, lr, global_batch, steps_per_epoch, scaling=True):
        """lr: the recipe's, at a global batch of RECIPE_BATCH; scaling=False keeps it at any
        global batch (--no-lr-scaling)."""
        self.base = lr
        scale = math.sqrt(global_batch / RECIPE_BATCH) if scaling else 1.0
        self.peak = lr * scale
        self.warmup = min(WARMUP_STEPS, steps_per_epoch) if scale > 1 else 0

    def at(self, step):
        """The lr for optimizer step `step` (0-based) during the warm-up, else None."""
        if step >= self.warmup:
            return None
        return self.base + (self.peak - self.base) * (step + 1) / self.warmup


_END = object()  # the end of a loader (a batch of only unreadable images is None)


@dataclass(frozen=True)
class StepSettings:
    """How the optimizer steps of an epoch run: the precision, a frozen backbone (only the head
    trains), the step to stop at (0: none; --max-steps) and the steps between reads of the
    loss (--log-every)."""
    precision: Precision = field(default_factory=Precision)
    freeze_backbone: bool = False
    max_steps: int = 0
    log_every: int = 50


def train_one_epoch(model, loader, criterion, optimizer, scaler, rt, settings, epoch, step,
                    on_step=None, lr=None, on_log=None, progress=None):
    """One pass over this rank's shard, its steps run as `settings` (StepSettings) say. `step`
    counts optimizer steps over the whole run; on_step(step, batches, check) is called after
    each, on_log(step, {tag: value}) with the loss of the last settings.log_every steps and the
    lr, progress.update(images) after each step.
    Returns the epoch's metrics: loss_sum, images, batches, step, seconds, and loader_wait:
    the seconds spent in next(loader) (worker start-up included), loader_wait_share of the
    loop's wall time: near 0 when the loader keeps up, near 1 when the device waits for data.

    Nothing here waits for the device except every log_every steps, a progress line and
    before a checkpoint: the loss is summed and checked for finiteness on the device, and the
    loader wait is read on host clocks around next(loader) alone."""
    train_mode(model, settings.freeze_backbone)
    images, batches, start = 0, 0, time.perf_counter()
    loss_sum = torch.zeros((), device=rt.device)  # sum over images of the batch-mean loss
    first_bad = torch.full((), -1, dtype=torch.long, device=rt.device)  # first non-finite step
    step_counter = torch.full((), step, dtype=torch.long, device=rt.device)
    amp = settings.precision.autocast(rt.device.type)
    logged = [0.0, 0]  # loss sum and images at the last on_log

    def check():
        """Wait for the device: raise if any loss so far was non-finite."""
        bad = int(first_bad)
        if bad >= 0:
            raise NonFiniteLoss(f"loss is non-finite at epoch {epoch + 1} step {bad}")
        return float(loss_sum) / max(images, 1)

    def details():
        share = waited / max(time.perf_counter() - start, 1e-9)
        return f"step {step}  loss {check():.4f}  loader wait {share:.0%}"

    waited = 0.0
    batches_of = iter(loader)
    waited += time.perf_counter() - start  # a new worker pool starts here
    while True:
        before = time.perf_counter()
        batch = next(batches_of, _END)
        waited += time.perf_counter() - before
        if batch is _END:
            break
        batches += 1
        if batch is None:  # evaluation only: training batches are always full
            continue
        warm = lr.at(step) if lr is not None else None
        if warm is not None:
            for group in optimizer.param_groups:
                group["lr"] = warm
        # (B, 3, crop, crop) float, (B, 14)
        x, y = to_device(batch, rt, settings.precision.channels_last)
        with amp:
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        rt.mark_step()
        scaler.step(optimizer)
        scaler.update()
        rt.mark_step()
        step += 1
        step_counter += 1
        loss = loss.detach().float()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step_counter, first_bad)
        loss_sum += loss * x.shape[0]
        images += x.shape[0]
        last = settings.max_steps and step >= settings.max_steps
        if on_log is not None and (step % settings.log_every == 0 or last):
            total = check() * images
            on_log(step, {"train/loss": (total - logged[0]) / max(images - logged[1], 1),
                          "train/lr": optimizer.param_groups[0]["lr"]})
            logged[:] = [total, images]
        if progress is not None:
            progress.update(x.shape[0] * rt.world_size, details)
        if on_step is not None:
            on_step(step, batches, check)
        if last:
            break
    train_loss = check()
    seconds = time.perf_counter() - start
    return {"loss_sum": train_loss * images, "images": images, "batches": batches, "step": step,
            "seconds": seconds, "loader_wait": waited,
            "loader_wait_share": waited / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(model, loader, rt, precision, pos_weight=None):
    """Loss and per-disease ROC-AUC over the whole split, the model run in `precision`: every
    rank's predictions gathered, the duplicates DistributedSampler pads with dropped, in the
    order of the list."""
    model.eval()
    logits, labels, names = [], [], []
    amp = precision.autocast(rt.device.type)
    for batch in tqdm(loader, desc="val", leave=False,
                      disable=not (rt.is_main and sys.stderr.isatty())):
        if batch is None:
            continue
        x, _ = to_device(batch, rt, precision.channels_last)
        with amp:
            out = model(x)
        rt.mark_step()
        logits.append(out.float())
        labels.append(batch[1].numpy())
        names.extend(batch[2])
    empty = np.zeros((0, len(loader.dataset.class_names)), np.float32)
    logits = torch.cat(logits).cpu().numpy() if logits else empty  # one wait, at the end
    logits, labels, names = gather_from_ranks(
        rt, logits, np.concatenate(labels) if labels else empty, np.array(names, dtype=object))
    position = {n: i for i, n in enumerate(loader.dataset.names)}
    _, first = np.unique(names, return_index=True)
    keep = sorted(first, key=lambda i: position[names[i]])
    logits, labels, names = logits[keep], labels[keep], names[keep]
    if not np.isfinite(logits).all():
        raise NonFiniteLoss("validation outputs are non-finite: the weights diverged")
    loss = MaskedBCE(None if pos_weight is None else pos_weight.cpu())(
        torch.from_numpy(logits), torch.from_numpy(labels.astype(np.float32))).item()
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    aucs = roc_aucs(labels, probs)
    return {"loss": loss, "auc": aucs, "mean_auc": mean_auc(aucs), "images": len(labels),
            "names": names, "probs": probs}


class MaskedBCE(torch.nn.Module):
    """BCEWithLogitsLoss over the entries whose target is known: a NaN target (an uncertain
    or unmentioned label under --uncertain ignore, an uncertain one in evaluation) adds
    nothing to the loss and gets no gradient. Without NaN it is BCEWithLogitsLoss exactly."""

    def __init__(self, pos_weight=None):
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits, targets):  # (B, K), (B, K) with NaN where ignored
        known = ~torch.isnan(targets)
        loss = F.binary_cross_entropy_with_logits(
            logits, torch.where(known, targets, 0.0), pos_weight=self.pos_weight,
            reduction="none")
        return torch.where(known, loss, 0.0).sum() / known.sum().clamp(min=1)


def to_device(batch, rt, channels_last=False):
    """A loader batch -> model input and labels on the device (NHWC with channels_last).
    Images travel as uint8, one channel; channel expansion and normalisation happen on the
    device."""
    x, y = batch[0].to(rt.device, non_blocking=True), batch[1].to(rt.device, non_blocking=True)
    x = to_model_input(x)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def make_loader(dataset, indices, batch_size, workers, rt, train):
    """A DataLoader over `indices` of dataset (a sampler: a list, or DistributedSampler):
    full batches only in training."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=workers,
        collate_fn=collate, pin_memory=rt.device.type == "cuda", drop_last=train,
        # A new worker pool each epoch picks up dataset.set_epoch() (seeded augmentation).
        persistent_workers=False)
