"""Decoding and preprocessing of chest X-rays: numpy and Pillow only (no torch), so the OpenVINO
edge path shares the exact evaluation protocol.

Every image is handled as one 8-bit grayscale channel (H, W) until the very end, where it is
normalised and replicated to the 3 channels of the ImageNet-initialised model.
"""
import functools

import numpy as np
from PIL import Image

from codestreams import frame_problem, inflated_problem
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


# The largest image any script decodes: an 8192x8192 16-bit image (128 MiB decoded; chest
# X-rays are at most ~4300x3500). Checked on the header, BEFORE decoding, so a small file that
# declares a huge image (a decompression bomb) costs nothing: DICOM Rows x Columns x
# SamplesPerPixel x NumberOfFrames x BitsAllocated / 8, and a PNG's / JPEG's width x height x
# bytes per pixel. One constant for every reader (images.py, the DICOM node).
MAX_DECODED_BYTES = 8192 * 8192 * 2
# A DICOM data set's elements other than its pixels (a deflated data set inflates to at most
# MAX_DECODED_BYTES + this)
MAX_HEADER_BYTES = 16 * 2 ** 20


def check_declared_size(path, nbytes, what):
    """A DataError before decoding when the header declares more than MAX_DECODED_BYTES."""
    if not 0 < nbytes <= MAX_DECODED_BYTES:
        raise DataError(f"{path}: declares {what} ({nbytes / 2 ** 20:.0f} MiB decoded), over the "
                        f"limit of {MAX_DECODED_BYTES / 2 ** 20:.0f} MiB (images.MAX_DECODED_BYTES:"
                        " an 8192x8192 16-bit image); a corrupt file or a decompression bomb")


def load_gray(path):
    """Decode an image as 8-bit single-channel (H, W) PIL image.

    NIH ships 8-bit grayscale PNGs and a few RGBA ones whose colour channels are equal and
    alpha opaque, so one channel loses nothing. 16-bit PNGs (several public chest X-ray sets)
    are scaled by their bit depth, 0..65535 -> 0..255, not clipped as convert('L') would.
    JPEG (CheXpert, MIMIC-CXR-JPG) goes the same way; DICOM through load_dicom.
    Whatever goes wrong in a decoder is a DataError naming the file (--skip-bad-images skips
    exactly those), never another exception type.
    """
    if is_dicom(path):
        return load_dicom(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            per_pixel = {"I": 4, "F": 4}.get(im.mode, 2 if im.mode.startswith("I;16")
                                              else len(im.getbands()))
            check_declared_size(path, w * h * per_pixel, f"a {w}x{h} {im.mode} image")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(im, dtype=np.float64)
                return Image.fromarray(np.round(pixels.clip(0, 65535) / 257.0).astype(np.uint8))
            return im.convert("L")
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # OSError, SyntaxError, struct.error...: a damaged file, whatever the plugin raises
        raise DataError(f"{path}: unreadable image ({one_line(e)[:200]})") from None


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
    (white = low) inverted. Without any VOI the values are read as stored: the range their bit
    depth allows (through the modality transform) is 0..255, so an 8-bit DICOM gives the PNG it
    came from. Compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg), after
    their codestreams are checked against the header (codestreams.py: size, truncation)."""
    import optional
    pydicom = optional.pydicom(f"{path}: reading DICOM")
    try:
        ds = read_dicom(path, MAX_DECODED_BYTES)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except pydicom.errors.InvalidDicomError:
        raise DataError(f"{path}: unreadable DICOM (not a DICOM file: no DICM marker at byte "
                        "128)") from None
    except Exception as e:  # truncated file, disk error
        raise DataError(f"{path}: unreadable DICOM ({one_line(e)[:200]})") from None
    try:
        return _dicom_pixels(path, ds)
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # a malformed attribute pydicom trips on: one line, never a traceback
        raise DataError(f"{path}: corrupt DICOM ({type(e).__name__}: {one_line(e)[:160]})"
                        ) from None


def read_dicom(source, image_bytes):
    """pydicom's data set of a DICOM file (a path, or the file's bytes); a DataError (not naming the file) where a deflated data set would inflate past
    `image_bytes` of pixels plus MAX_HEADER_BYTES: pydicom inflates it whole, at once. Every
    reader of DICOM files goes through here (the scripts, the store, the node, /predict)."""
    import io

    import pydicom
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    with stream:
        problem = inflated_problem(stream, image_bytes + MAX_HEADER_BYTES)
        if problem:
            raise DataError(problem)
        stream.seek(0)
        return pydicom.dcmread(stream)


def _dicom_pixels(path, ds):
    """The displayed 8-bit image of a read DICOM dataset; DataError naming the attribute."""
    image_attributes = [k for k in ("Rows", "Columns", "BitsAllocated") if k in ds]
    if "PixelData" not in ds:
        if image_attributes or _cut_short(path, ds):  # the file was cut before or inside its pixels
            why = (f"it declares an image ({', '.join(image_attributes)}) but has no Pixel Data"
                   if image_attributes else "the file ends inside its data set")
            raise DataError(f"{path}: truncated or corrupt DICOM ({why})")
        kind = getattr(ds.get("SOPClassUID"), "name", None) or "no SOP class"
        raise DataError(f"{path}: a DICOM without an image (no Pixel Data; {kind})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{path}: a {photometric or 'colour'} DICOM: only grayscale X-rays "
                        "(MONOCHROME1 or MONOCHROME2) are read")
    declared = {}
    for key, default in (("Rows", None), ("Columns", None), ("SamplesPerPixel", 1),
                         ("NumberOfFrames", 1), ("BitsAllocated", None)):
        value = ds.get(key, default)
        try:
            declared[key] = int(value)
        except (TypeError, ValueError):
            raise DataError(f"{path}: corrupt DICOM ({key} is {value!r}, not a number)") from None
        if declared[key] < 1:
            raise DataError(f"{path}: corrupt DICOM ({key} is {declared[key]})")
    if declared["NumberOfFrames"] != 1:
        raise DataError(f"{path}: a DICOM of {declared['NumberOfFrames']} frames: one 2-D "
                        "grayscale frame is read, not several frames")
    check_declared_size(path, declared["Rows"] * declared["Columns"] * declared["SamplesPerPixel"]
                        * declared["NumberOfFrames"] * -(-declared["BitsAllocated"] // 8),
                        f"a {declared['Columns']}x{declared['Rows']} image of "
                        f"{declared['BitsAllocated']} bits")
    problem = pixel_data_problem(ds)
    if problem:
        raise DataError(f"{path}: {problem}")
    try:
        stored = ds.pixel_array
    except Exception as e:  # no decoder for the transfer syntax, damaged pixel data
        syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
        name = getattr(syntax, "name", None) or "unknown transfer syntax"
        if syntax is not None and syntax.is_compressed and not _has_decoder(syntax):
            hint = "; install its decoder: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
        else:  # the decoder is there and failed: the data is at fault
            hint = "; the file is truncated or corrupt"
        raise DataError(f"{path}: cannot decode the DICOM pixel data ({name}: "
                        f"{one_line(e)[:160]}){hint}") from None
    if stored.ndim != 2:
        raise DataError(f"{path}: a DICOM of shape {stored.shape}: one 2-D grayscale frame "
                        "is read, not several frames")
    for key in ("RescaleSlope", "RescaleIntercept"):
        if key in ds:
            _finite(path, ds, key)
    if "RescaleSlope" in ds and _finite(path, ds, "RescaleSlope") == 0:
        raise DataError(f"{path}: corrupt DICOM (RescaleSlope is 0: every pixel the same)")
    if stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2:
        # Every step from here is a function of the stored value alone: an integer image goes
        # through them once per value it can hold (a lookup table, at most 65536 entries), not
        # once per pixel: the same numbers, in a quarter of the time.
        base = 0 if stored.dtype.kind == "u" else int(stored.min())
        index = stored if base == 0 else stored.astype(np.int32) - base
        domain = (np.arange(int(index.max()) + 1) + base).astype(stored.dtype)

        @functools.cache
        def held():  # the values the image holds, counted where they matter only (4 ms)
            return np.bincount(index.ravel(), minlength=len(domain)) > 0

        return Image.fromarray(np.take(_displayed(path, ds, domain, photometric, held), index))
    return Image.fromarray(_displayed(path, ds, stored, photometric))


def _displayed(path, ds, stored, photometric, held=None):
    """Stored values -> displayed 0..255 (uint8), each value on its own; the checks and the
    image's own range (without a VOI) count only the values the image holds (held(): a mask
    of `stored`; all of them without it)."""
    from pydicom.pixels import apply_modality_lut

    def of_image(values):
        return values if held is None else values[held()]

    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if not (np.isfinite(values).all() or np.isfinite(of_image(values)).all()):
        raise DataError(f"{path}: corrupt DICOM (its modality transform, RescaleSlope/"
                        "RescaleIntercept or Modality LUT, gives values that are not finite)")
    shown = _voi(path, values, ds)
    if shown is None:  # no VOI: the values as stored, over the range their bit depth allows
        low, high = _stored_range(ds, stored.dtype)
        if low is None:  # floating-point pixels have no bit depth: the image's own range
            low, high = of_image(values).min(), of_image(values).max()
        shown = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if not (np.isfinite(shown).all() or np.isfinite(of_image(shown)).all()):
        raise DataError(f"{path}: corrupt DICOM (its VOI transform gives values that are not "
                        "finite)")
    if photometric == "MONOCHROME1":
        shown = 1.0 - shown
    return np.round(shown.clip(0, 1) * 255).astype(np.uint8)


def _stored_range(ds, dtype):
    """(lowest, highest) modality value an integer image's stored bit depth allows (Bits
    Stored, signed where the pixels are), through its modality transform; (None, None) for
    floating-point pixels. Without a VOI transform this is what 0 and 255 show, so an 8-bit
    image reads as stored (the PNG it came from, exactly) and a 12-bit one as 0..4095,
    whatever range the image happens to hold."""
    from pydicom.pixels import apply_modality_lut
    if dtype.kind not in "iu":
        return None, None
    bits = ds.get("BitsStored")
    try:
        bits = int(bits)
    except (TypeError, ValueError):
        bits = 0
    if not 1 <= bits <= 8 * dtype.itemsize:
        bits = 8 * dtype.itemsize
    low, high = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if dtype.kind == "i" else (0, 2 ** bits - 1)
    # a Modality LUT maps each value on its own (its input is at most 16 bits); a rescale is
    # linear, so its ends are the ends of the range
    ends = np.arange(low, high + 1) if "ModalityLUTSequence" in ds and bits <= 16 \
        else np.array([low, high])
    values = np.asarray(apply_modality_lut(ends.astype(np.int64), ds), dtype=np.float64)
    return float(values.min()), float(values.max())


def pixel_data_problem(ds):
    """Why a data set's compressed pixel data cannot be the image its header declares, or
    None (codestreams.frame_problem on each frame: the size the stream itself declares, and
    its end). Nothing is decoded; uncompressed pixel data is not looked at here."""
    from pydicom.encaps import generate_frames
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is None or not syntax.is_compressed or "PixelData" not in ds:
        return None
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames") or 1)
        for i, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
            problem = frame_problem(syntax, frame, rows, columns, samples, bits)
            if problem:
                where = f" (frame {i + 1})" if frames > 1 else ""
                return f"truncated or corrupt DICOM pixel data{where}: {problem}"
    except Exception as e:  # no fragments, a broken item tag
        return f"truncated or corrupt DICOM pixel data ({type(e).__name__}: {one_line(e)[:120]})"
    return None


def _cut_short(path, ds):
    """Whether the file ends before its data set does: no element at all after the header, or
    the last element's declared length runs past the end of the file (pydicom keeps what is
    there without a word)."""
    import os
    tags = list(ds.keys())
    if not tags:
        return True
    raw = ds.get_item(tags[-1])
    end = getattr(raw, "value_tell", None)
    length = getattr(raw, "length", None)
    if end is None or length is None or length == 0xFFFFFFFF:
        return False
    try:
        return end + length > os.path.getsize(path)
    except OSError:
        return False


def _has_decoder(syntax):
    try:
        from pydicom.pixels import get_decoder
        return bool(get_decoder(syntax).is_available)
    except Exception:  # an unknown syntax has no decoder
        return False


def _finite(path, ds, key, value=None):
    """The attribute's (first) value as a finite float, or a DataError naming it."""
    from pydicom.multival import MultiValue
    raw = ds.get(key) if value is None else value
    raw = raw[0] if isinstance(raw, (list, tuple, MultiValue)) and len(raw) else raw
    try:
        number = float(raw)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise DataError(f"{path}: corrupt DICOM ({key} is {str(raw)[:40]!r}, not a finite number)")
    return number


def _voi(path, values, ds):
    """The first VOI transform of the DICOM as values in 0..1, or None when it has none."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        from pydicom.pixels import apply_voi_lut
        item = ds.VOILUTSequence[0]
        try:
            entries, _, bits = (int(v) for v in item.LUTDescriptor)
            data = item.get("LUTData")
            count = len(data) if data is not None and not isinstance(data, (bytes, int)) else None
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"{path}: corrupt DICOM (VOILUTSequence[0].LUTDescriptor is missing or "
                            "not three numbers)") from None
        if not 8 <= bits <= 16:
            raise DataError(f"{path}: corrupt DICOM (VOILUTSequence[0].LUTDescriptor declares "
                            f"{bits} bits per entry; 8 to 16 are allowed)")
        if data is None or (count is not None and count < (entries or 65536)):
            raise DataError(f"{path}: corrupt DICOM (VOILUTSequence[0].LUTData is missing or "
                            "shorter than its LUTDescriptor declares)")
        # A LUT is indexed by integer values (the modality output of an integer image)
        try:
            out = apply_voi_lut(np.round(values).astype(np.int64), ds, index=0, prefer_lut=True)
        except Exception as e:
            raise DataError(f"{path}: corrupt DICOM (VOILUTSequence[0]: {one_line(e)[:120]})"
                            ) from None
        return np.asarray(out, dtype=np.float64) / (2 ** bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c, w = _finite(path, ds, "WindowCenter"), _finite(path, ds, "WindowWidth")
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            raise DataError(f"{path}: corrupt DICOM (VOILUTFunction is {function[:40]!r}; "
                            "LINEAR, LINEAR_EXACT or SIGMOID)")
        if w <= 0 or (function == "LINEAR" and w < 1):
            return None  # not a valid window (PS3.3 C.11.2.1.2): fall back to the image's range
        # DICOM PS3.3 C.11.2.1.2: the linear, exact-linear and sigmoid VOI functions
        with np.errstate(over="ignore"):  # exp overflows to inf: the sigmoid's 0, as it should
            if function == "SIGMOID":
                return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
        if function == "LINEAR_EXACT":
            return (values - c) / w + 0.5
        return (values - (c - 0.5)) / max(w - 1, 1e-6) + 0.5
    return None


def resize_shorter(img, size):
    """torchvision.transforms.Resize(int) on a PIL image: shorter side to `size`, bilinear."""
    new = shorter_to(img.size, size)
    return img if new == img.size else img.resize(new, Image.BILINEAR)


def shorter_to(width_height, size):
    """(width, height) of resize_shorter's image."""
    w, h = width_height
    return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)


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


TEN_CROPS = 10


def average_crops(outputs, crops_per_image=TEN_CROPS):
    """The ten-crop protocol's last step: (n * crops, ...) outputs -> (n, ...), each image's
    crops averaged. numpy arrays and torch tensors alike; every back end averages here."""
    return outputs.reshape(-1, crops_per_image, *outputs.shape[1:]).mean(1)


CENTRE_CROP = "one centre crop"  # training's quick val AUC (main.py, curves.py), not ten crops


def protocol_name(resize, crop, ten_crop=True):
    """The evaluation protocol in words, for every printed AUROC to name its own: 'ten crops
    of 224 from images resized to 256' (infer.py, the export's check) or 'one centre crop ...'
    (training's validation after each epoch): they give different numbers for one model."""
    crops = "ten crops" if ten_crop else CENTRE_CROP
    return f"{crops} of {crop} from images resized to {resize}"


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
