"""CheXNet: a torchvision DenseNet-121 (or ResNet-50, or timm's anti-aliased DenseNet-121d)
with a 14-way linear head.

The module returns logits (train with BCEWithLogitsLoss, which is numerically stable);
`with_sigmoid(model)` gives the probability model used for inference and export, as the
original CheXNet's Linear + Sigmoid classifier. State dict keys are torchvision's own
(`features.conv0.weight`, ..., `classifier.weight`), so a checkpoint is a torchvision model's
state dict with a 14-way head.
"""
import pickle
import re
import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from common import DataError, one_line

ARCHS = {
    # arch: (torchvision builder, ImageNet weights, name of the head attribute)
    "densenet121": (torchvision.models.densenet121,
                    torchvision.models.DenseNet121_Weights.IMAGENET1K_V1, "classifier"),
    "resnet50": (torchvision.models.resnet50,
                 torchvision.models.ResNet50_Weights.IMAGENET1K_V1, "fc"),
}
# Architectures built by timm (a maintained library): BlurPool in the transitions and a deep
# stem, the "d" DenseNet-121 that Xclassifier trains on CheXpert and MIMIC-CXR. Same key names
# as torchvision's DenseNet (features.*, classifier.*), ImageNet weights from the Hugging Face
# Hub through timm's own loader (safetensors).
TIMM_ARCHS = ("densenetblur121d",)
ARCH_NAMES = (*ARCHS, *TIMM_ARCHS)


class CheckpointError(DataError):
    """A checkpoint or weights file that cannot be used; one line naming the file."""


def build_model(arch="densenet121", num_classes=14, pretrained="imagenet", weights=None,
                freeze_backbone=False):
    """The CheXNet model, initialised from ImageNet (torchvision's weights API, downloaded
    once into the torch cache) or at random (`pretrained='none'`); or from a local file
    (`weights`): a torchvision ImageNet file (the head is then new) or a CheXNet checkpoint,
    ours or the legacy format (the head is loaded too)."""
    if arch in TIMM_ARCHS:
        return _freeze(_build_timm(arch, num_classes, pretrained, weights), "classifier",
                       freeze_backbone)
    if arch not in ARCHS:
        raise CheckpointError(f"unknown --arch {arch!r} (choose from {', '.join(ARCH_NAMES)})")
    builder, imagenet, head_name = ARCHS[arch]
    model = builder(weights=None)
    state, source = None, weights
    if weights is not None:
        state = read_state_dict(weights, what="weights file")
    elif pretrained == "imagenet":
        state, source = imagenet_state(arch, imagenet), imagenet_cache(imagenet)
    elif pretrained != "none":
        raise CheckpointError(f"unknown --pretrained {pretrained!r} (imagenet or none)")
    head_weight = f"{head_name}.weight"
    if state is not None and head_weight in state and state[head_weight].shape[0] == 1000:
        load_weights(model, state, source, arch, 1000)  # an ImageNet backbone
        state = None
    in_features = getattr(model, head_name).in_features
    setattr(model, head_name, nn.Linear(in_features, num_classes))
    if state is not None:  # a CheXNet checkpoint (ours or the legacy format): head included
        load_weights(model, state, weights, arch, num_classes)
    return _freeze(model, head_name, freeze_backbone)


def _freeze(model, head_name, freeze_backbone):
    if freeze_backbone:
        # The two-stage transfer recipe: train only the new head on frozen ImageNet features.
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(head_name + ".")
    return model


def _build_timm(arch, num_classes, pretrained, weights):
    """A timm model with a num_classes head. ImageNet weights: timm's loader, from the Hugging
    Face Hub (its cache) or from a local file (--weights: .safetensors, or a .pth that timm
    reads with weights_only=True); our own checkpoints load as for torchvision's models."""
    try:
        import timm
    except ImportError:
        raise CheckpointError(f"--arch {arch} needs the timm package (pip install timm)") from None
    if pretrained not in ("imagenet", "none"):
        raise CheckpointError(f"unknown --pretrained {pretrained!r} (imagenet or none)")
    imagenet_file = None
    if weights is not None:
        imagenet_file = Path(weights)
        if not imagenet_file.is_file():
            raise CheckpointError(f"{weights}: weights file not found")
        if imagenet_file.suffix != ".safetensors":
            state = read_state_dict(imagenet_file, what="weights file")
            if state.get("classifier.weight", torch.zeros(0)).shape[:1] != (1000,):
                # one of our checkpoints (or the legacy format): head included
                model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
                load_weights(model, state, weights, arch, num_classes)
                return model
    elif pretrained == "none":
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    hub = timm.models.get_pretrained_cfg(arch).hf_hub_id
    overlay = {"file": str(imagenet_file)} if imagenet_file else None
    try:
        # 1000 classes, as the file: timm then loads every key strictly (with another
        # num_classes it drops the head and silently tolerates missing keys)
        model = timm.create_model(arch, pretrained=True, num_classes=1000,
                                  pretrained_cfg_overlay=overlay)
    except Exception as e:  # offline, a file of another model, a damaged file
        reason = one_line(e).strip()[:200] or type(e).__name__
        if imagenet_file:
            raise CheckpointError(f"{imagenet_file}: not ImageNet weights of {arch} "
                                  f"({reason})") from None
        raise CheckpointError(
            f"cannot get the ImageNet weights of {arch} from the Hugging Face Hub ({hub}: "
            f"{reason}); on an offline machine pass --weights PATH to a local copy of that "
            "repository's model.safetensors, or start from random weights with --pretrained "
            "none") from None
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{imagenet_file or hub}: {key} holds non-finite values "
                                  "(NaN or inf): refused")
    model.reset_classifier(num_classes)
    return model


def train_mode(model, freeze_backbone=False):
    """model.train(), except that a frozen backbone's BatchNorm layers stay in eval mode: in
    train mode they would still update their running statistics (and normalise each batch
    with its own), i.e. the "frozen" features would change."""
    model.train()
    if freeze_backbone:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()):
                module.eval()
    return model


def imagenet_cache(imagenet):
    """Where torch.hub keeps the file: $TORCH_HOME/hub/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(imagenet.url).name


def imagenet_state(arch, imagenet):
    """torchvision's ImageNet weights from the torch cache (downloaded there once, its hash
    checked as torchvision does), loaded with weights_only=True: a file in the cache is
    never trusted to run code. Old torchvision key names are renamed."""
    url, cache = imagenet.url, imagenet_cache(imagenet)
    if not cache.is_file():
        match = re.search(r"-([a-f0-9]{8,})\.", cache.name)  # torchvision's check_hash
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            # Downloaded to a temp file and moved into place once its hash matches.
            torch.hub.download_url_to_file(url, str(cache), match and match.group(1),
                                           progress=False)
        except (urllib.error.URLError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"cannot download the ImageNet weights of {arch} from {url} ({one_line(e)}); "
                f"on an offline machine copy that file to {cache} or pass --weights PATH to a "
                "local copy, or start from random weights with --pretrained none") from None
    return read_state_dict(cache, what="ImageNet weights file", corrupt_hint=(
        f"delete it to download it again, or copy torchvision's {cache.name} there"))


def with_sigmoid(model):
    """The inference model: (N, 3, H, W) normalised images -> (N, 14) probabilities."""
    return nn.Sequential(model, nn.Sigmoid()).eval()


class WithCAM(nn.Module):
    """The inference model with its class activation maps: (N, 3, H, W) normalised images ->
    (probabilities (N, K), maps (N, K, H/32, W/32)).

    With F the last ReLU'd feature map and W, b the head, CAM_k = W_k . F + b_k: a 1x1
    convolution of F, whose spatial mean is exactly the logit (the head is linear and the
    model pools by the mean). The probabilities take the model's own path, unchanged."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()
        self.head = model.fc if isinstance(model, torchvision.models.ResNet) else model.classifier
        self.relu = nn.ReLU()  # a module, not torchvision's in-place F.relu: hooks see it

    def feature_map(self, x):
        m = self.model
        if not isinstance(m, torchvision.models.ResNet):  # torchvision's or timm's DenseNet
            return self.relu(m.features(x))  # timm's ends in BatchNorm+ReLU: the same map
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def forward(self, x):
        f = self.feature_map(x)  # (N, C, h, w)
        probabilities = torch.sigmoid(self.head(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)))
        maps = F.conv2d(f, self.head.weight[:, :, None, None], self.head.bias)
        return probabilities, maps


# ---------------------------------------------------------------------------------------------
# Loading state dicts safely (weights_only), from our checkpoints and from the legacy format

def read_state_dict(path, what="checkpoint", obj=None, corrupt_hint=None):
    """A state dict from any file we accept: a bare state dict, our checkpoint (its 'model'),
    or the legacy CheXNet format {'state_dict': {'module.densenet121.features...': ...}}.
    Keys come back in today's torchvision names. `obj`: the file's content, if already loaded."""
    obj = load_file(path, what, corrupt_hint) if obj is None else obj
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not (isinstance(obj, dict) and obj and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise CheckpointError(f"{path}: not a state dict ({what} holds a {type(obj).__name__})")
    return _torchvision_names(obj)


def load_file(path, what="checkpoint", corrupt_hint=None):
    """torch.load with weights_only=True: tensors and plain containers, never arbitrary code."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refused code, truncated zip, not a torch file at all, disk error
        # torch's message goes on to suggest weights_only=False: never for a file we did not make.
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        if found:
            raise CheckpointError(f"{path}: refused: the {what} holds Python objects other than "
                                  f"tensors ({found.group(1)}), and loading them could run code"
                                  ) from None
        hint = f"; {corrupt_hint}" if corrupt_hint else ""
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
            reason = "not a PyTorch file"
        else:
            lines = str(e).strip().splitlines()
            reason = (lines[0] if lines else type(e).__name__).split(". ")[0][:160]
        raise CheckpointError(f"{path}: corrupt or not a {what} ({reason}){hint}") from None


_LEGACY_PREFIXES = ("module.", "_orig_mod.", "densenet121.", "resnet50.")
# Old torchvision DenseNet names: denselayer1.norm.1 -> norm1, conv.2 -> conv2
_OLD_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:1|2)\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _torchvision_names(state):
    """Strip DataParallel/DDP/compile/CheXNet-wrapper prefixes and rename old torchvision
    DenseNet keys, so legacy checkpoints and torchvision's own files load into build_model."""
    renamed = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _LEGACY_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        match = _OLD_DENSENET.match(key)
        if match:
            key = match.group(1) + match.group(2)
        # The original CheXNet head is Sequential(Linear, Sigmoid): classifier.0 -> classifier
        key = re.sub(r"^classifier\.0\.", "classifier.", key)
        renamed[key] = value
    return renamed


def load_weights(model, state, path, arch, num_classes):
    """Load a state dict into the bare model, or say in one line why it does not fit.

    Files written before PyTorch 0.4.1 (torchvision's densenet121-a639ec97.pth, the original
    CheXNet checkpoints) have no BatchNorm `num_batches_tracked` buffers: those keep the
    model's own value (it only matters for BatchNorm with momentum=None, which no model here
    uses). Non-finite weights are refused: they would only give NaN probabilities.
    """
    own = model.state_dict()
    state = dict(state)
    for key in own:
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = own[key]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        if wrong:
            k = wrong[0]
            detail = f"{k} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}"
        else:
            detail = (f"{len(missing)} missing keys (e.g. {missing[0]})" if missing
                      else f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CheckpointError(f"{path}: does not fit {arch} with {num_classes} classes: {detail}")
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: {key} holds non-finite values (NaN or inf): refused")
    model.load_state_dict(state)
