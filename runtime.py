"""Device and distribution, shared by main.py and infer.py: one function reads torchrun's
environment (RANK, LOCAL_RANK, WORLD_SIZE), picks cuda, hpu or cpu and joins the process group;
the same script runs under `python` and `torchrun`."""
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

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


def cpu_flags():
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def _torch_cpu_check(name):
    """torch.cpu._is_<name>_supported() where this PyTorch has it, else None."""
    check = getattr(torch.cpu, f"_is_{name}_supported", None)
    if check is None:
        return None
    try:
        return bool(check())
    except RuntimeError:
        return None


def cpu_has_amx():
    """Whether this CPU (and its OS) offers AMX tiles, the matrix units of Intel Xeons since
    Sapphire Rapids that run bf16 matrix products; torch.backends.cpu.get_cpu_capability()
    says only "AVX512" on them."""
    found = _torch_cpu_check("amx_tile")
    return found if found is not None else "amx_bf16" in cpu_flags()


def cpu_has_avx512_bf16():
    """Whether this CPU has the AVX512-BF16 instructions (AMD Zen 4 and later, Intel Cooper
    Lake and Sapphire Rapids and later): bf16 dot products in hardware, which oneDNN's bf16
    convolutions use."""
    found = _torch_cpu_check("avx512_bf16")
    return found if found is not None else "avx512_bf16" in cpu_flags()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f
                         if ln.startswith("model name")), "CPU")
    except OSError:
        return "CPU"


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


# ---------------------------------------------------------------------------------------------
# The precision a run trains in by default: one decision, from what the hardware offers

@dataclass(frozen=True)
class Hardware:
    """The facts the precision decision reads: probe_hardware() reads them from the machine,
    tests pass their own."""
    device: str  # "cpu", "cuda" or "hpu"
    name: str = ""  # the CPU's model name or the GPU's, for the line that says why
    amx: bool = False  # CPU: AMX tiles (amx_bf16)
    avx512_bf16: bool = False  # CPU: AVX512-BF16 instructions
    cuda_bf16: bool = False  # GPU: bf16 in hardware (Ampere and later)
    cuda_capability: tuple = None  # GPU: (major, minor); tensor cores from 7.0 (Volta)

    @property
    def native(self):
        """The autocast dtypes this device runs natively, best first; empty where only fp32
        is fast. Gaudi runs bf16 natively, but stays fp32 unless --amp (as it always has)."""
        if self.device == "cpu":
            return ("bf16",) if self.amx or self.avx512_bf16 else ()
        if self.device == "cuda":
            tensor_cores = tuple(self.cuda_capability or ()) >= (7, 0)
            return ("bf16",) * self.cuda_bf16 + ("fp16",) * tensor_cores
        return ()

    @property
    def amp_dtype(self):
        """The autocast dtype --amp means here without --amp-dtype: the best native one, else
        fp16 on a GPU (bf16 is emulated or missing before Ampere), else bf16."""
        if self.native:
            return self.native[0]
        return "fp16" if self.device == "cuda" else "bf16"

    def why(self):
        """Why the default is what it is on this device, in a few words."""
        if self.device == "cpu":
            what = ("AMX" if self.amx else "AVX512-BF16") + ": native bf16" if self.native else (
                "no native bf16 (neither AMX nor AVX512-BF16): bf16 would be emulated, slower "
                "than fp32")
            return f"this CPU ({self.name or 'CPU'}) has {what}"
        if self.device == "cuda":
            cc = ".".join(map(str, self.cuda_capability or ())) or "?"
            what = ("native bf16" if self.cuda_bf16 else "fp16 tensor cores but no bf16: fp16 "
                    "with a gradient scaler" if self.native else "no tensor cores: fp32")
            return f"this GPU ({self.name or 'GPU'}, compute capability {cc}) has {what}"
        if self.device == "hpu":
            return "Gaudi: fp32 unless --amp (bf16)"
        return f"{self.device}: fp32"


def probe_hardware(device):
    """The Hardware facts of `device` ("cpu", "cuda" or "hpu") on this machine."""
    if device == "cpu":
        return Hardware("cpu", cpu_name(), amx=cpu_has_amx(), avx512_bf16=cpu_has_avx512_bf16())
    if device == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()
        try:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older PyTorch: no emulation to leave out
            bf16 = torch.cuda.is_bf16_supported()
        return Hardware("cuda", torch.cuda.get_device_name(index), cuda_bf16=bool(bf16),
                        cuda_capability=tuple(torch.cuda.get_device_capability(index)))
    return Hardware(device)


class Decision(NamedTuple):
    """What decide_precision chose: the precision, why (one line), and the flags left to
    the default ("amp", "amp_dtype", "channels_last")."""
    precision: Precision
    reason: str
    defaulted: list


def decide_precision(hw, amp=None, channels_last=None, amp_dtype=None):
    """The precision a run trains in, from the hardware's facts (a Hardware) and the flags
    (None: left to the default). The default is the fastest path the hardware runs natively:

    - CPU with native bf16 (AMX or AVX512-BF16): bf16 autocast + channels_last; else fp32.
    - CUDA GPU with bf16 (compute capability 8.0 and later): bf16 autocast + channels_last;
      with fp16 tensor cores but no bf16 (Volta, Turing): fp16 autocast with a gradient scaler
      + channels_last; without tensor cores: fp32.
    - Gaudi: fp32 unless --amp (bf16), as it always was.

    A flag given wins over the default; --amp-dtype alone names the dtype, autocast stays on
    by default only where the device runs that dtype natively."""
    native = hw.native
    dtype = amp_dtype or hw.amp_dtype
    chosen = Precision(amp=dtype in native if amp is None else bool(amp), amp_dtype=dtype,
                       channels_last=bool(native) if channels_last is None else bool(channels_last))
    defaulted = [k for k, v in (("amp", amp), ("amp_dtype", amp_dtype),
                                ("channels_last", channels_last)) if v is None]
    default = Precision(amp=bool(native), amp_dtype=hw.amp_dtype, channels_last=bool(native))
    if chosen == default or (not chosen.amp and not default.amp
                             and chosen.channels_last == default.channels_last):
        reason = f"the default: {hw.why()}"
    else:
        reason = f"as the flags say; the default would be {default}: {hw.why()}"
    return Decision(chosen, reason, defaulted)


def default_precision(device, amp=None, channels_last=None, amp_dtype=None):
    """decide_precision for `device` ("cpu", "cuda", "hpu") on this machine."""
    return decide_precision(probe_hardware(device), amp, channels_last, amp_dtype)
