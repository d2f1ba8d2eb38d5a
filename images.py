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


def load_gray(path):
    """Decode an image as 8-bit single-channel (H, W) PIL image.

    NIH ships 8-bit grayscale PNGs and a few RGBA ones whose colour channels are equal and
    alpha opaque, so one channel loses nothing. 16-bit PNGs (several public chest X-ray sets)
    are scaled by their bit depth, 0..65535 -> 0..255, not clipped as convert('L') would.
    """
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(im, dtype=np.float64)
                return Image.fromarray(np.round(pixels.clip(0, 65535) / 257.0).astype(np.uint8))
            return im.convert("L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({one_line(e)})") from None


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
