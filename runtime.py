"""Device and distribution, shared by main.py and infer.py: one function reads torchrun's
environment (RANK, LOCAL_RANK, WORLD_SIZE), picks cuda, hpu or cpu and joins the process group;
the same script runs under `python` and `torchrun`."""
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from common import SetupError


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


def device_type(device="auto"):
    """The device a --device value means here: auto is cuda where PyTorch sees a GPU, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cpu_has_amx():
    """Whether this CPU (and its OS) offers AMX tiles, the matrix units of Intel Xeons since
    Sapphire Rapids that run bf16 matrix products; torch.backends.cpu.get_cpu_capability()
    says only "AVX512" on them."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if check is not None:
        try:
            return bool(check())
        except RuntimeError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            return any(ln.startswith("flags") and " amx_bf16" in ln for ln in f)
    except OSError:
        return False


def cpu_fast_path(device):
    """True where bf16 autocast + channels_last should be the default: a CPU with AMX, where
    DenseNet-121 trains ~2x faster than in fp32 (README, Benchmarks). Without AMX bf16 is
    emulated and ~10x slower; GPUs and Gaudi take --amp explicitly."""
    return device == "cpu" and cpu_has_amx()


def setup(device="auto"):
    """Pick the device and join the process group torchrun describes (if any)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = device_type(device)
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


def autocast(device_type, amp, amp_dtype="bf16"):
    """Mixed precision on a device of `device_type` when amp: bf16 by default, fp16 on request."""
    if not amp:
        return nullcontext()
    dtype = torch.bfloat16 if amp_dtype == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


@dataclass(frozen=True)
class Precision:
    """How a model runs on its device: autocast in bf16 (or fp16, which needs a gradient
    scaler) or fp32; channels_last (NHWC) or not."""
    amp: bool = False
    amp_dtype: str = "bf16"
    channels_last: bool = False

    def autocast(self, device_type):
        return autocast(device_type, self.amp, self.amp_dtype)

    @property
    def uses_scaler(self):
        return bool(self.amp) and self.amp_dtype == "fp16"

    def __str__(self):
        """'bf16 autocast + channels_last', 'fp32': as a run's lines say it."""
        parts = ([f"{self.amp_dtype} autocast"] if self.amp else ["fp32"]) + (
            ["channels_last"] if self.channels_last else [])
        return " + ".join(parts)


def default_precision(device, amp=None, channels_last=None, amp_dtype="bf16"):
    """(Precision, note or None, the flags left to their default): --amp and --channels-last
    as given; one left unset (None) is on where `device` is a CPU with AMX (bf16 + NHWC train
    ~2x faster there: cpu_fast_path), off elsewhere. The note says so when it applies."""
    fast = cpu_fast_path(device)
    defaulted = [k for k, v in (("amp", amp), ("channels_last", channels_last)) if v is None]
    note = None
    if fast and defaulted:
        note = ("this CPU has AMX: bf16 autocast and channels_last are on by default "
                "(--no-amp --no-channels-last: fp32)")
    return (Precision(amp=(fast and amp_dtype == "bf16") if amp is None else amp,
                      amp_dtype=amp_dtype, channels_last=fast if channels_last is None
                      else channels_last), note, defaulted)
