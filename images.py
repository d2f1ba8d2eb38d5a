"""Decoding and preprocessing of chest X-rays: numpy and Pillow only (no torch), so the OpenVINO
edge path shares the exact evaluation protocol.

Every image is handled as one 8-bit grayscale channel (H, W) until the very end, where it is
normalised and replicated to the 3 channels of the ImageNet-initialised model.
"""
import numpy as np
from PIL import Image

from common import DataError, one_line

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# torchvision's RandomResizedCrop defaults: area fraction and aspect ratio ranges.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


# Image files every script reads; DICOM files are also recognised by content, whatever their name.
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES


def load_gray(path):
    """Decode an image as 8-bit single-channel (H, W) PIL image.

    NIH ships 8-bit grayscale PNGs and a few RGBA ones whose colour channels are equal and
    alpha opaque, so one channel loses nothing. 16-bit PNGs (several public chest X-ray sets)
    are scaled by their bit depth, 0..65535 -> 0..255, not clipped as convert('L') would.
    JPEG (CheXpert, MIMIC-CXR-JPG) goes the same way; DICOM through load_dicom.
    """
    if is_dicom(path):
        return load_dicom(path)
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(im, dtype=np.float64)
                return Image.fromarray(np.round(pixels.clip(0, 65535) / 257.0).astype(np.uint8))
            return im.convert("L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({one_line(e)})") from None


def is_dicom(path):
    """By name (.dcm, .dicom), else by the DICM marker at byte 128 for names that are not
    .png/.jpg (hospital exports often have no extension); PNGs are never opened twice."""
    suffix = str(path).lower().rsplit(".", 1)[-1] if "." in str(path) else ""
    if f".{suffix}" in DICOM_SUFFIXES:
        return True
    if f".{suffix}" in RASTER_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False  # Pillow then names the problem


def load_dicom(path):
    """A grayscale DICOM as the 8-bit (H, W) image a radiologist's viewer shows by default.

    Stored values -> modality LUT (Rescale Slope/Intercept or a Modality LUT) -> the first VOI
    (a VOI LUT, else Window Center/Width with its VOI LUT Function) -> 0..255, and MONOCHROME1
    (white = low) inverted. Without any VOI the modality values' own range is stretched to
    0..255. Compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg)."""
    import optional
    pydicom = optional.pydicom(f"{path}: reading DICOM")
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:
        raise DataError(f"{path}: unreadable DICOM (not a DICOM file: no DICM marker at byte "
                        "128)") from None
    except Exception as e:  # truncated file, disk error
        raise DataError(f"{path}: unreadable DICOM ({one_line(e)})") from None
    if "PixelData" not in ds:
        kind = getattr(ds.get("SOPClassUID"), "name", None) or "no SOP class"
        raise DataError(f"{path}: a DICOM without an image (no Pixel Data; {kind})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{path}: a {photometric or 'colour'} DICOM: only grayscale X-rays "
                        "(MONOCHROME1 or MONOCHROME2) are read")
    try:
        stored = ds.pixel_array
    except Exception as e:  # no decoder for the transfer syntax, damaged pixel data
        syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
        name = getattr(syntax, "name", None) or "unknown transfer syntax"
        hint = ("; install its decoder: pip install pylibjpeg pylibjpeg-libjpeg "
                "pylibjpeg-openjpeg" if syntax is not None and syntax.is_compressed else "")
        raise DataError(f"{path}: cannot decode the DICOM pixel data ({name}: "
                        f"{one_line(e)[:160]}){hint}") from None
    if stored.ndim != 2:
        raise DataError(f"{path}: a DICOM of shape {stored.shape}: one 2-D grayscale frame "
                        "is read, not several frames")
    values = np.asarray(pydicom.pixels.apply_modality_lut(stored, ds), dtype=np.float64)
    shown = _voi(values, ds, pydicom)
    if shown is None:  # no VOI: the image's own range
        low, high = values.min(), values.max()
        shown = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        shown = 1.0 - shown
    return Image.fromarray(np.round(shown.clip(0, 1) * 255).astype(np.uint8))


def _voi(values, ds, pydicom):
    """The first VOI transform of the DICOM as values in 0..1, or None when it has none."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        # A LUT is indexed by integer values (the modality output of an integer image)
        out = pydicom.pixels.apply_voi_lut(np.round(values).astype(np.int64), ds, index=0,
                                           prefer_lut=True)
        return np.asarray(out, dtype=np.float64) / (2 ** bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        def first(v):  # a multi-valued element lists several windows: the first is default
            multi = (list, tuple, pydicom.multival.MultiValue)
            return float(v[0]) if isinstance(v, multi) else float(v)
        c, w = first(ds.WindowCenter), first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
        if w <= 0 or (function == "LINEAR" and w < 1):
            return None  # not a valid window (PS3.3 C.11.2.1.2): fall back to the image's range
        # DICOM PS3.3 C.11.2.1.2: the linear, exact-linear and sigmoid VOI functions
        if function == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
        if function == "LINEAR_EXACT":
            return (values - c) / w + 0.5
        return (values - (c - 0.5)) / max(w - 1, 1e-6) + 0.5
    return None


def resize_shorter(img, size):
    """torchvision.transforms.Resize(int) on a PIL image: shorter side to `size`, bilinear."""
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, Image.BILINEAR)


def fit_square(img, size):
    """(size, size) uint8: shorter side to `size`, then the centre square. The preprocessed
    store holds exactly this; NIH images are square, so for them it is a plain resize."""
    gray = resize_shorter(img, size)
    w, h = gray.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(gray.crop((left, top, left + size, top + size)))


def normalize_gray(gray_u8):
    """(..., H, W) uint8 -> (..., 3, H, W) float32, ImageNet-normalised per channel."""
    x = gray_u8.astype(np.float32)[..., None, :, :] / 255.0
    return (x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]


# ---------------------------------------------------------------------------------------------
# Evaluation: Resize -> TenCrop (or CenterCrop), as torchvision does

def crop_gray(gray, crop, ten_crop=True):
    """Crops of a resized (H, W) uint8 array, as torchvision's TenCrop / CenterCrop take them.

    Returns (10, crop, crop) uint8 for ten-crop (corners and centre of the image, then of its
    mirror image) or (1, crop, crop) for the centre crop.
    """
    h, w = gray.shape
    if h < crop or w < crop:
        raise DataError(f"crop {crop} is larger than the resized image {w}x{h}")
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    centre = gray[top:top + crop, left:left + crop]
    if not ten_crop:
        return centre[None]
    five = [gray[:crop, :crop], gray[:crop, w - crop:], gray[h - crop:, :crop],
            gray[h - crop:, w - crop:], centre]
    return np.stack(five + [c[:, ::-1] for c in (five[1], five[0], five[3], five[2], five[4])])


def ten_crop_boxes(height, width, crop):
    """Where each of crop_gray's 10 crops comes from in a (height, width) image:
    [(top, left, flipped)] in crop_gray's order (the last five are mirror images)."""
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    five = [(0, 0), (0, width - crop), (height - crop, 0), (height - crop, width - crop),
            (top, left)]
    return [(t, l, False) for t, l in five] + [(t, l, True) for t, l in
                                              (five[1], five[0], five[3], five[2], five[4])]


def eval_gray(path, resize=256, crop=224, ten_crop=True):
    """(10 or 1, crop, crop) uint8: the evaluation crops of one image file."""
    return crop_gray(np.asarray(resize_shorter(load_gray(path), resize)), crop, ten_crop)


def eval_input(path, resize=256, crop=224, ten_crop=True):
    """The evaluation protocol for one image file: Resize(resize) -> TenCrop(crop) (or centre
    crop) -> ImageNet normalisation. Returns (10 or 1, 3, crop, crop) float32."""
    return normalize_gray(eval_gray(path, resize, crop, ten_crop))


# ---------------------------------------------------------------------------------------------
# Training: RandomResizedCrop + horizontal flip, one code path for PNGs and the store

def draw_train_box(rng, aspect=1.0, scale=CROP_SCALE, ratio=CROP_RATIO):
    """torchvision's RandomResizedCrop.get_params in units of the image: (top, left, height,
    width) as fractions of the image's height and width, and whether to flip.

    Drawn in fractions, not pixels, so the same generator gives the same box on the 1024x1024
    original and on a 512 or 256 copy of it. aspect: the image's width / height.
    """
    log_ratio = np.log(ratio)
    for _ in range(10):
        area = rng.uniform(*scale)
        r = np.exp(rng.uniform(*log_ratio))  # width / height of the box, in pixels
        w, h = np.sqrt(area * r / aspect), np.sqrt(area / r * aspect)
        if w <= 1 and h <= 1:
            box = (rng.uniform(0, 1 - h), rng.uniform(0, 1 - w), h, w)
            break
    else:  # as torchvision: the whole image, clamped to the ratio range, centred
        w, h = (min(1.0, max(ratio) / aspect), min(1.0, aspect / min(ratio)))
        box = ((1 - h) / 2, (1 - w) / 2, h, w)
    return box, bool(rng.random() < 0.5)


def train_crop(gray, box, flip, crop):
    """(crop, crop) uint8: the box (fractions, from draw_train_box) of a (H, W) uint8 image,
    resized with Pillow's antialiased bilinear filter (as RandomResizedCrop on a PIL image),
    mirrored if flip."""
    h, w = gray.shape
    top, left, bh, bw = box
    out = np.asarray(Image.fromarray(gray).resize(
        (crop, crop), Image.BILINEAR, box=(left * w, top * h, (left + bw) * w, (top + bh) * h)))
    return out[:, ::-1] if flip else out


def train_rng(seed, epoch, index):
    """Augmentation randomness from (seed, epoch, image index) alone, never from a global
    generator: loader workers, restarts and resumed runs draw exactly the same crops."""
    return np.random.default_rng([seed, epoch, index])
