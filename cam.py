"""Where the model looks: class activation maps in image coordinates, overlays, and their
localization scored against NIH's radiologist boxes. numpy, Pillow and scipy (no torch), so the
OpenVINO modes give heatmaps on an edge box too.

For DenseNet-121 the class activation map is exact: with F the last ReLU'd feature map
(1024 x 7 x 7 for a 224 crop) and W, b the head, CAM_k = W_k . F + b_k, whose spatial mean is
the logit. The exported OpenVINO models return it beside the probabilities.

Localization (`python infer.py --localize`), as in the ChestX-ray8 paper (Wang et al. 2017):
a heatmap, min-max normalised, is thresholded; each connected region gives a box; a radiologist
box counts as found when a predicted box overlaps it by IoBB > T (intersection over the
predicted box's area) or IoU > T; AFP is the average number of predicted boxes per image that
match no radiologist box. The threshold is chosen on the val split's boxed images (best mean
accuracy over the IoU thresholds), never on test; a random heatmap and a fixed centre prior go
through the same steps as baselines.
"""
import csv
import functools
import gzip
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from threadpoolctl import ThreadpoolController

from common import REPO_DIR, DataError, os_reason
from images import average_crops, ten_crop_boxes
from labels import NIH_CLASSES, shared_classes
import optional
from report import panel_grid, save_figure

BOX_FILE_NAMES = ("BBox_List_2017.csv", "BBox_List_2017.csv.gz")
SHIPPED_BOXES = REPO_DIR / "nih" / "BBox_List_2017.csv.gz"
BOX_ALIASES = {"Infiltrate": "Infiltration"}  # the box file's name for it
IOBB = (0.1, 0.25, 0.5, 0.75, 0.9)
IOU = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
TAUS = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))  # heatmap thresholds tried on val

# ChestX-ray8 (Wang et al., CVPR 2017), Table 4: localization accuracy by T(IoBB).
CHESTXRAY8_TABLE4 = {
    0.1: [0.7277, 0.9931, 0.7124, 0.7886, 0.4352, 0.1645, 0.7500, 0.4591],
    0.25: [0.5500, 0.9794, 0.5424, 0.5772, 0.2823, 0.0506, 0.5583, 0.3469],
    0.5: [0.2833, 0.8767, 0.3333, 0.4227, 0.1411, 0.0126, 0.3833, 0.1836],
    0.75: [0.1666, 0.7260, 0.2418, 0.3252, 0.1176, 0.0126, 0.2583, 0.1020],
    0.9: [0.1333, 0.6849, 0.2091, 0.2520, 0.0588, 0.0126, 0.2416, 0.0816],
}
BOXED_DISEASES = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                  "Pneumonia", "Pneumothorax"]


# ---------------------------------------------------------------------------------------------
# Heatmaps in image coordinates

def resize_maps(maps, size, resample=Image.BILINEAR):
    """(K, h, w) float -> (K, H, W), one map at a time (Pillow, bilinear by default). size:
    (H, W)."""
    return np.stack([np.asarray(Image.fromarray(np.asarray(m, np.float32), mode="F").resize(
        (size[1], size[0]), resample)) for m in maps])


def feather(start, crop, length):
    """(crop,) weights of a crop at `start` of an axis of `length`, for averaging overlapping
    crops: 1 on the side where the crop meets the image's border, falling to 0 (a squared
    sine or cosine, flat at both ends) across the whole crop toward each side where it ends
    inside the image. Where one crop stops and its neighbour goes on, the average has no step
    and no kink: the old weights, 1 at every crop's centre and 0 at all its edges, fell to 0
    within a few pixels of the border, and a straight seam showed there."""
    t = (np.arange(crop) + 0.5) / crop
    inside_before, inside_after = start > 0, start + crop < length
    if inside_before and inside_after:
        return np.sin(np.pi * t) ** 2
    if inside_after:
        return np.cos(np.pi / 2 * t) ** 2
    if inside_before:
        return np.sin(np.pi / 2 * t) ** 2
    return np.ones(crop)


@functools.lru_cache(maxsize=1)
def _blas():
    return ThreadpoolController()  # 6 ms: it looks through the loaded libraries


@functools.lru_cache(maxsize=32)
def resize_matrix(n_in, n_out):
    """(n_out, n_in) float32: Pillow's bicubic resize along one axis as a matrix (column j is a
    unit impulse at j, resized), so that resizing an (h, w) map is rows @ map @ cols.T.
    Bicubic, not bilinear: a 7x7 map blown up 32 times bilinearly is a field of flat facets
    whose ridges drew stars around each peak."""
    impulses = np.eye(n_in, dtype=np.float32)[:, None, :]  # n_in maps of one row
    matrix = np.ascontiguousarray(resize_maps(impulses, (1, n_out), Image.BICUBIC)[:, 0, :].T)
    matrix.flags.writeable = False  # shared by every later call (cached)
    return matrix


def tencrop_heatmap(cams, resized_hw, crop, out_hw=None):
    """Ten crops' maps (10, K, h, w), in crop_gray's order, -> (K, H, W) float32 over the image:
    each map upsampled to crop x crop, mirrored back when its crop was mirrored, put where the
    crop came from in the resized image (resized_hw), overlaps averaged with feather() weights
    (no seams where a crop ends), then resized to out_hw (the original image's size, so that it
    lines up with NIH's box coordinates).

    Each step is separable, so a crop's contribution is rows @ map @ cols.T with rows
    (H, h) and cols (W, w) doing the upsampling, feathering, mirroring and placing: two matrix
    products for all crops and maps (29 ms -> 1 ms for 5 maps of a 256 x 256 image)."""
    height, width = resized_hw
    n, k, h, w = cams.shape
    up_rows, up_cols = resize_matrix(h, crop), resize_matrix(w, crop)
    rows = np.zeros((height, n, h), np.float32)
    cols = np.zeros((n, w, width), np.float32)
    edges_rows, edges_cols = np.zeros((n, height), np.float32), np.zeros((n, width), np.float32)
    for i, (top, left, flipped) in enumerate(ten_crop_boxes(height, width, crop)):
        # the weights by where the crop lies in the image; a mirrored crop's map mirrored back
        along_rows = feather(top, crop, height).astype(np.float32)
        along_cols = feather(left, crop, width).astype(np.float32)
        rows[top:top + crop, i] = up_rows * along_rows[:, None]
        cols[i, :, left:left + crop] = ((up_cols[::-1] if flipped else up_cols)
                                        * along_cols[:, None]).T
        edges_rows[i, top:top + crop] = along_rows
        edges_cols[i, left:left + crop] = along_cols
    # OpenBLAS's threads would spin on a core for 0.1 s after each product, taking it from
    # inference (the node builds heatmaps while images are being classified)
    with _blas().limit(limits=1, user_api="blas"):
        # (n, k, h, w) @ (n, 1, w, W) -> (k, n*h, W); (H, n*h) @ that -> (K, H, W)
        half = np.matmul(cams.astype(np.float32), cols[:, None]).transpose(1, 0, 2, 3)
        total = np.matmul(rows.reshape(height, n * h), half.reshape(k, n * h, width))
        weight = edges_rows.T @ edges_cols
    gaps = weight == 0  # no crop there: an image over 1.75 times as long as wide (256, 224)
    heat = total / np.where(gaps, 1, weight)
    if gaps.any():  # not NaN there (a flat, blank overlay): the nearest pixel a crop saw
        nearest = ndimage.distance_transform_edt(gaps, return_distances=False, return_indices=True)
        heat = heat[:, nearest[0], nearest[1]]
    return heat if out_hw is None or tuple(out_hw) == (height, width) else resize_maps(heat, out_hw)


def normalise(heat):
    """Min-max to [0, 1] (a constant map is all zeros)."""
    lo, hi = float(heat.min()), float(heat.max())
    return (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)


# ---------------------------------------------------------------------------------------------
# Boxes: (x, y, w, h) in pixels of the original image, as NIH's file has them

def find_box_file(data_dir):
    """The data directory's box file, else the one shipped with the code (also for None)."""
    for name in BOX_FILE_NAMES if data_dir is not None else ():
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    return SHIPPED_BOXES


def read_boxes(path):
    """{image name: {disease: [(x, y, w, h), ...]}} from BBox_List_2017.csv: read as the
    predictions CSV is (predictions.read_predictions): a byte-order mark is no part of the header,
    quoted names are read whole, and a row has exactly an image, a disease and 4 numbers (NIH's
    header ends with empty columns; cells past the 6th must be empty), else the line is named."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = []
            for row in reader:
                rows.append((reader.line_num, row))
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{path}: cannot read the box file ({os_reason(e)})") from None
    except csv.Error as e:
        raise DataError(f"{path}:{len(rows) + 1}: not CSV ({e})") from None
    header = rows[0][1] if rows else []
    if header[:2] != ["Image Index", "Finding Label"] or len(header) < 6 or \
            not header[2].startswith("Bbox"):
        raise DataError(f"{path}: not a box file (expected the columns Image Index, Finding "
                        "Label, Bbox [x, y, w, h])")
    boxes = {}
    for line, row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue
        try:
            if len(row) < 6 or any(cell.strip() for cell in row[6:]):
                raise ValueError(len(row))
            name, disease = row[0], BOX_ALIASES.get(row[1], row[1])
            x, y, w, h = (float(v) for v in row[2:6])
        except (ValueError, IndexError):
            raise DataError(f"{path}:{line}: expected an image, a disease and 4 numbers, got "
                            f"{len(row)} fields") from None
        if disease not in NIH_CLASSES:  # the box file is NIH's
            raise DataError(f"{path}:{line}: unknown disease {row[1]!r}")
        if not (w > 0 and h > 0 and x >= 0 and y >= 0 and np.isfinite([x, y, w, h]).all()):
            raise DataError(f"{path}:{line}: box {x:g}, {y:g}, {w:g}, {h:g} is not a box")
        boxes.setdefault(name, {}).setdefault(disease, []).append((x, y, w, h))
    return boxes


# NIH's boxes are in the pixels of the released images, all 1024x1024 (not the label table's
# OriginalImage[Width,Height], the radiographs' size before NIH reduced them: the boxes reach
# x = 1012 on images whose original is 2992 wide)
RELEASED_SIDE = 1024


def box_scale(name, size):
    """(x, y) factors from NIH's box coordinates to an image of `size` (width, height): a
    square image is the released one or a resized copy of it (the bundled sample is 256x256);
    a DataError, to skip the image with its reason, where the boxes cannot be placed."""
    width, height = size
    if width != height:
        raise DataError(f"cannot place NIH's boxes on {name}: it is {width}x{height}, not the "
                        f"released {RELEASED_SIDE}x{RELEASED_SIDE} image nor a resized copy "
                        "(a crop or another image)")
    return width / RELEASED_SIDE, height / RELEASED_SIDE


def scaled_boxes(boxes, scale):
    """{disease: [(x, y, w, h)]} multiplied by box_scale's factors."""
    sx, sy = scale
    return {d: [(x * sx, y * sy, w * sx, h * sy) for x, y, w, h in b] for d, b in boxes.items()}


def check_boxes_inside(boxes, name, size, path):
    """A radiologist box outside its image means a wrong box file or a wrong image."""
    width, height = size
    for disease, found in boxes.items():
        for x, y, w, h in found:
            if x + w > width + 1 or y + h > height + 1:
                raise DataError(f"{path}: the {disease} box of {name} ({x:g}, {y:g}, {w:g}, "
                                f"{h:g}) is outside the {width}x{height} image")


def heatmap_boxes(heat, tau):
    """Boxes around the connected regions where the normalised heatmap is >= tau."""
    ndimage = optional.ndimage("--localize")
    regions, _ = ndimage.label(normalise(heat) >= tau)
    return [(s[1].start, s[0].start, s[1].stop - s[1].start, s[0].stop - s[0].start)
            for s in ndimage.find_objects(regions) if s is not None]


def _overlap(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    return w * h


def iobb(predicted, truth):
    """Intersection over the predicted box's area (ChestX-ray8's measure)."""
    return _overlap(predicted, truth) / (predicted[2] * predicted[3])


def iou(predicted, truth):
    inter = _overlap(predicted, truth)
    return inter / (predicted[2] * predicted[3] + truth[2] * truth[3] - inter)


def score_boxes(predicted, truth):
    """For one image and disease: per radiologist box, whether some predicted box has IoBB > T
    (for each T) and IoU > T; per T, the predicted boxes matching no radiologist box."""
    found = {"iobb": np.zeros((len(IOBB), len(truth)), bool),
             "iou": np.zeros((len(IOU), len(truth)), bool)}
    false = {"iobb": np.zeros(len(IOBB)), "iou": np.zeros(len(IOU))}
    for measure, thresholds in (("iobb", IOBB), ("iou", IOU)):
        f = iobb if measure == "iobb" else iou
        scores = np.array([[f(p, t) for t in truth] for p in predicted]).reshape(len(predicted),
                                                                                  len(truth))
        for i, threshold in enumerate(thresholds):
            hit = scores > threshold
            found[measure][i] = hit.any(0)
            false[measure][i] = (~hit.any(1)).sum()
    return found, false


def pointing_hit(heat, truth, scale=1.0):
    """Whether the heatmap's maximum lies inside a radiologist box. scale: box pixels per
    heatmap pixel."""
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    x, y = (col + 0.5) * scale, (row + 0.5) * scale
    return any(bx <= x <= bx + bw and by <= y <= by + bh for bx, by, bw, bh in truth)


# ---------------------------------------------------------------------------------------------
# Baselines: what a heatmap that knows nothing about the image scores

def random_heatmap(shape, seed):
    """Smooth random blobs (Gaussian-filtered noise), a fair rival: pure noise would break into
    thousands of single-pixel regions."""
    ndimage = optional.ndimage("--localize")
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((64, 64)), 4)
    return resize_maps(noise[None], shape)[0]


def centre_heatmap(shape):
    """A fixed Gaussian at the image centre (sigma a quarter of the image)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.exp(-(((yy - shape[0] / 2) / (shape[0] / 4)) ** 2
                    + ((xx - shape[1] / 2) / (shape[1] / 4)) ** 2) / 2).astype(np.float32)


class Tally:
    """Localization results of one method over many boxed images, for every heatmap threshold
    tau at once (tau is chosen later, on val)."""

    def __init__(self, taus=TAUS):
        self.taus = tuple(float(t) for t in taus)  # TAUS, or the one --localize-tau fixes
        self.found = {t: {} for t in self.taus}  # tau -> disease -> list of (thresholds, boxes)
        self.false = {t: {} for t in self.taus}  # tau -> disease -> list of per-threshold counts
        self.points = {}  # disease -> list of bool

    def add(self, disease, heat, truth, scale):
        """heat: the heatmap (at any resolution); truth: boxes in original pixels; scale:
        original pixels per heatmap pixel."""
        self.points.setdefault(disease, []).append(pointing_hit(heat, truth, scale))
        for tau in self.taus:
            predicted = [(x * scale, y * scale, w * scale, h * scale)
                         for x, y, w, h in heatmap_boxes(heat, tau)]
            found, false = score_boxes(predicted, truth)
            self.found[tau].setdefault(disease, []).append(found)
            self.false[tau].setdefault(disease, []).append(false)

    def diseases(self):
        return [d for d in NIH_CLASSES if d in self.points]

    def table(self, tau):
        """{disease or 'overall': {"boxes", "images", "pointing", "iobb": {T: (acc, afp)},
        "iou": {T: (acc, afp)}}} at heatmap threshold tau."""
        out = {}
        groups = {d: [d] for d in self.diseases()}
        groups["overall"] = self.diseases()
        for key, diseases in groups.items():
            entry = {"images": sum(len(self.points[d]) for d in diseases),
                     "pointing": float(np.mean(sum((self.points[d] for d in diseases), [])))}
            for measure, thresholds in (("iobb", IOBB), ("iou", IOU)):
                found = np.concatenate([f[measure] for d in diseases
                                        for f in self.found[tau][d]], axis=1)
                false = np.stack([f[measure] for d in diseases for f in self.false[tau][d]])
                entry["boxes"] = int(found.shape[1])
                entry[measure] = {str(t): [float(found[i].mean()), float(false[:, i].mean())]
                                  for i, t in enumerate(thresholds)}
            out[key] = entry
        return out

    def best_tau(self):
        """The tau with the best mean accuracy over the IoU thresholds (on val). Not IoBB: a
        heatmap cut into many tiny boxes scores a high IoBB (a small box inside a radiologist's
        has IoBB 1) at the price of many false positives; IoU does not reward that."""
        def score(tau):
            t = self.table(tau)["overall"]["iou"]
            return np.mean([acc for acc, _ in t.values()])
        return max(self.taus, key=score)


# ---------------------------------------------------------------------------------------------
# Overlays

COLOURBAR_LABEL = "activation (min-max normalised per map)"
OVERLAY_MAX = 2048  # pixels a side of each panel of an overlay, at most
OVERLAY_MIN = 512  # and at least (the bundled sample's 256x256 images, enlarged)


def _draw_boxes(ax, boxes, highlight=None, fontsize=9):
    """Radiologist boxes [(disease, (x, y, w, h))] in the image's pixels: the disease of the
    map (highlight) solid, the image's other findings dashed."""
    from matplotlib.patches import Rectangle
    for disease, (x, y, w, h) in boxes:
        main = highlight is None or disease == highlight
        ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=2 if main else 1.2,
                               ls="-" if main else "--", ec="white" if main else "0.8"))
        right = x + w / 2 > ax.get_xlim()[1] / 2  # the label inside the image
        ax.text(x + w if right else x, y, f"{disease} (radiologist)" if main else disease,
                color="white", fontsize=fontsize, va="bottom", ha="right" if right else "left",
                clip_on=True, bbox=dict(fc="black", ec="none", alpha=0.6, pad=1))


def _extent(gray):
    """imshow's extent of the X-ray's pixels: a heatmap of any resolution drawn over them."""
    return (-0.5, gray.shape[1] - 0.5, gray.shape[0] - 0.5, -0.5)


def overlay(gray, heat, title, boxes=(), disease=None):
    """The plain X-ray (H, W) uint8 and, beside it, the normalised heatmap over it in the jet
    colour map, each at the X-ray's own resolution, with a colour bar, NIH's radiologist boxes
    of the image (boxes: [(disease, (x, y, w, h))] in its pixels; the map's own disease
    solid) and the title: an RGB PIL image."""
    import io

    plt = optional.pyplot("--cam")
    # Each panel at the X-ray's own resolution, within OVERLAY_MIN to OVERLAY_MAX pixels a
    # side: a small image enlarged to be read, a huge scan not a figure of gigabytes.
    scale = min(OVERLAY_MAX / max(gray.shape), max(1.0, OVERLAY_MIN / max(gray.shape)))
    height, width = (max(1, round(n * scale)) for n in gray.shape)
    dpi = 100
    lines = title.count("\n") + 1  # a notice under the title takes a line of its own
    gap, bar, head = max(8, width // 40), max(120, width // 7), max(40, height // 14) * lines
    total_w, total_h = 2 * width + gap + bar, height + head
    fig = plt.figure(figsize=(total_w / dpi, total_h / dpi), dpi=dpi, facecolor="white")
    font = max(9, height // 60)
    panels = []
    for i in range(2):
        ax = fig.add_axes([i * (width + gap) / total_w, 0, width / total_w, height / total_h])
        ax.imshow(gray, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
        ax.set_axis_off()
        panels.append(ax)
    image = panels[1].imshow(normalise(heat), cmap="jet", alpha=0.4, vmin=0, vmax=1,
                             interpolation="antialiased", extent=_extent(gray))
    _draw_boxes(panels[1], boxes, disease, font)
    for ax in panels:  # a box reaching outside the image does not move the view
        ax.set_xlim(-0.5, gray.shape[1] - 0.5)
        ax.set_ylim(gray.shape[0] - 0.5, -0.5)
    cax = fig.add_axes([(2 * width + gap + bar * 0.15) / total_w, 0.1 * height / total_h,
                        bar * 0.18 / total_w, 0.8 * height / total_h])
    cbar = fig.colorbar(image, cax=cax)
    cbar.solids.set_alpha(1)
    cbar.set_label(COLOURBAR_LABEL, fontsize=font)
    cax.tick_params(labelsize=font)
    fig.text(0.005, 1 - head * 0.5 / total_h, title, fontsize=font * 1.3, va="center")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


JET_ENTRIES = 256  # matplotlib's default colour-map size, and what one byte holds


@functools.lru_cache(maxsize=1)
def _jet_blend_table():
    """(256 * 256, 3) uint8: 0.6 x grey level + 0.4 x jet entry, for every pair."""
    cmap = optional.colormap("jet", "the node's heatmaps").resampled(JET_ENTRIES)
    colours = cmap(np.arange(JET_ENTRIES))[:, :3]
    levels = np.arange(256, dtype=np.float32)[:, None, None] / 255.0
    return ((0.6 * levels + 0.4 * colours[None]) * 255).clip(0, 255).astype(np.uint8).reshape(
        -1, 3)


def blend_jet(gray, heat):
    """0.6 x-ray + 0.4 jet colour of the normalised heatmap, (H, W, 3) uint8, looked up in a
    table per (grey level, colour-map entry) pair: the same bytes as blending the
    colour-mapped (H, W) floats, in half the time.

    heat: the X-ray's (H, W), or smaller: then it is normalised and put in colour-map entries at
    its own size, and the entries are scaled to (H, W) as an 8-bit image (bilinear). That is
    what the node does with the ten crops' 256 x 256 map (5 ms less per heatmap than scaling
    the floats first); the entries differ by one or two where the map is steep. A map larger
    than the X-ray (a source under 256 pixels) is scaled down as floats first: binned first,
    its peaks would be averaged away."""
    if heat.shape[0] > gray.shape[0] or heat.shape[1] > gray.shape[1]:
        heat = resize_maps(heat[None], gray.shape)[0]
    entry = normalise(heat) * JET_ENTRIES  # matplotlib's binning of [0, 1] (Colormap.__call__)
    entry[entry == JET_ENTRIES] = JET_ENTRIES - 1
    entry = entry.astype(np.uint8)
    if entry.shape != gray.shape:
        entry = np.asarray(Image.fromarray(entry).resize(gray.shape[::-1], Image.BILINEAR))
    pair = gray.astype(np.intp) * JET_ENTRIES + entry
    return np.take(_jet_blend_table(), pair, axis=0)


def registered_overlay(gray, heat, title):
    """The X-ray (H, W) uint8 with the normalised heatmap in the jet colour map blended over
    it, the title in a band at the top: an (H, W, 3) uint8 image on the X-ray's own pixel grid,
    so that a viewer can lay it over or beside the source image (serve.py's secondary
    capture; overlay() is the figure for people, with the plain X-ray and a colour bar).
    heat: the X-ray's size or smaller (blend_jet)."""
    rgb = blend_jet(gray, heat)
    height, width = gray.shape
    # The title's end is the research-use notice: the font shrinks until all of it fits
    size = max(12, height // 40)
    while True:
        try:
            font = ImageFont.load_default(size=size)
        except (TypeError, OSError):  # Pillow < 10.1 has one bitmap size
            font = ImageFont.load_default()
        if font.getlength(title) <= width - size or size <= 6:
            break
        size -= 1
    # Drawn in a band of its own, put over the top rows (not a 3 MB image made and copied back)
    band = Image.new("RGB", (width, min(height, int(size * 1.6) + 1)))
    ImageDraw.Draw(band).text((size // 2, size // 4), title, fill=(255, 255, 255), font=font)
    rgb[:band.height] = np.asarray(band)
    return rgb


def grid(gray, heats, titles, path, title=None, boxes=None):
    """Every class's heatmap over the X-ray in one figure, with a colour bar; title: what the
    maps are (method, mode); boxes: {disease: [(x, y, w, h)]} in the X-ray's pixels, drawn in
    their disease's panel (titles start with the class name)."""
    plt = optional.pyplot("--cam")
    fig, axes = panel_grid(plt, title or Path(path).stem, len(titles) + 1)
    for ax, heat, name in zip(axes, heats, titles):
        ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
        image = ax.imshow(normalise(heat), cmap="jet", alpha=0.4, vmin=0, vmax=1,
                          extent=_extent(gray))
        for disease, found in (boxes or {}).items():
            if name.split()[0] == disease:
                _draw_boxes(ax, [(disease, b) for b in found], disease, 7)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    axes[-1].imshow(gray, cmap="gray", vmin=0, vmax=255)  # the plain X-ray
    axes[-1].set_title("the X-ray", fontsize=10)
    axes[-1].axis("off")
    cbar = fig.colorbar(image, ax=list(axes), shrink=0.6, pad=0.01)
    cbar.solids.set_alpha(1)
    cbar.set_label(COLOURBAR_LABEL)
    save_figure(fig, path)


def image_boxes(data_dir, name, shape, log=print):
    """NIH's radiologist boxes of one image, {disease: [(x, y, w, h)]} scaled to an (H, W)
    image of it (box_scale). {} for an image without boxes, or one they cannot be placed on
    (said: a heatmap without the boxes its file name promises is not left unexplained)."""
    found = read_boxes(find_box_file(data_dir)).get(name, {})
    try:
        return scaled_boxes(found, box_scale(name, shape[::-1])) if found else {}
    except DataError as e:
        log(f"note: {e}; the heatmap is drawn without them")
        return {}


# ---------------------------------------------------------------------------------------------
# Running a model: heatmaps of one image, overlays, the localization benchmark

def crop_maps(backend, crops, method="cam", per_request=1):
    """(probabilities (10, K), maps (10, K, h, w)) of one image's ten crops (float32
    (10, 3, crop, crop)). backend: a TorchModel or an OpenVINOModel compiled for requests of
    `per_request` images."""
    if method == "gradcam++":
        return gradcam_plus_plus(backend, crops)
    if not backend.has_cams:
        raise DataError("this exported model has no class activation maps (exported before "
                        "they existed); run `bash infer.sh` to export it again")
    crops = np.concatenate([crops] * per_request) if hasattr(backend, "compiled") else crops
    result = {}
    backend.run_all([(0, crops)], lambda key, out: result.update(out=out), cams=True)
    probs, maps = result["out"]
    return np.asarray(probs)[:10], np.asarray(maps)[:10]


def gradcam_plus_plus(backend, crops, log=None):
    """Grad-CAM++ maps through the maintained `grad-cam` package (torch mode). Its target is
    model.WithCAM's ReLU module: torchvision's DenseNet applies F.relu in place after its last
    feature layer, which breaks the hooks grad-cam sets on that layer."""
    try:
        from pytorch_grad_cam import GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise DataError("--cam-method gradcam++ needs the grad-cam package "
                        "(pip install grad-cam)") from None
    import torch
    if not hasattr(backend, "with_cams"):
        raise DataError("--cam-method gradcam++ works in --mode torch")
    wrapped = backend.with_cams
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = wrapped

        def forward(self, x):
            f = wrapped.feature_map(x)
            return wrapped.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(f, 1), 1))

    x = torch.from_numpy(crops)
    with torch.inference_mode():
        probs = torch.sigmoid(Logits()(x)).numpy()
    classes = wrapped.head.out_features
    log(f"Grad-CAM++: a backward pass of the {len(x)} crops for each of {classes} classes "
        "(minutes on a CPU at 224x224)")
    maps, start = [], time.perf_counter()
    last = start
    with GradCAMPlusPlus(model=Logits(), target_layers=[wrapped.relu]) as explainer:
        for k in range(classes):  # a backward pass of the ten crops per class: minutes on a CPU
            maps.append(explainer(input_tensor=x, targets=[ClassifierOutputTarget(k)] * len(x)))
            now = time.perf_counter()
            if k == 0 or now - last >= 10 or k == classes - 1:  # a line every 10 s at most
                last = now
                log(f"Grad-CAM++: {k + 1}/{classes} classes in {now - start:.0f} s, about "
                    f"{(now - start) / (k + 1) * (classes - k - 1):.0f} s left")
    return probs, np.stack(maps, 1)  # (10, K, crop, crop)


# Overlays are drawn at the original resolution up to this longer side (NIH's 1024): a
# 5000x5000 original costs the memory of a 1024x1024 one (14 float maps), not 25x that.
MAX_OVERLAY_SIDE = 1024


def overlay_size(width, height, limit=MAX_OVERLAY_SIDE):
    """(width, height) of the overlays of a width x height image: the same, or scaled down so
    that the longer side is `limit`."""
    scale = min(1.0, limit / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_heatmaps(backend, path, resize, crop, method="cam", per_request=1):
    """(probabilities (14,), heatmaps (14, H, W), the X-ray (H, W) uint8) of one image file, at
    the original resolution capped to MAX_OVERLAY_SIDE: the evaluation's ten crops, their maps
    put back where each crop came from. Memory follows the crop size and the cap, never the
    original's size."""
    from images import crop_gray, load_gray, normalize_gray, resize_shorter
    image = load_gray(path)
    resized = np.asarray(resize_shorter(image, resize))
    width, height = overlay_size(*image.size)
    gray = np.asarray(image if image.size == (width, height)
                      else image.resize((width, height), Image.BILINEAR))
    del image
    probs, maps = crop_maps(backend, normalize_gray(crop_gray(resized, crop)), method,
                            per_request)
    return average_crops(probs)[0], tencrop_heatmap(maps, resized.shape, crop, gray.shape), gray


def cam_stem(path, method, mode):
    """The file name stem of an image's heatmaps: its name, a short hash of its resolved path
    (two images called 1.png in two folders never share files), the method and the mode (a
    Grad-CAM++ or INT8 run never overwrites a CAM or FP32 one)."""
    import hashlib
    resolved = str(Path(path).resolve())
    digest = hashlib.sha256(resolved.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{Path(path).stem}_{digest}_{method.replace('+', 'p')}_{mode}"


# Why Grad-CAM++'s maps of different findings look alike here, said on the figure itself
GRADCAM_NOTE = ("\nGrad-CAM++ keeps only features of positive weight, which the findings share "
                "on CheXNet's linear head: its maps look alike (CAM, the default, is exact)")


def decision_words(p, threshold, rule, shown=None):
    """'p = 0.437, positive (youden threshold 0.312)': what a heatmap's title says of its
    finding, so that a map is never read without the decision it goes with. shown: the
    (probability, threshold) to print instead (Platt-calibrated: the map keeps every
    decision); the decision is always the raw probability's at the raw threshold."""
    shown_p, shown_t = shown or (p, threshold)
    if threshold is None or not np.isfinite(threshold):
        return f"p = {shown_p:.3f}, no decision (no threshold chosen on val)"
    return (f"p = {shown_p:.3f}, {'positive' if p >= threshold else 'negative'} ({rule} "
            f"threshold {shown_t:.3f})")


def write_cams(backend, paths, out_dir, resize, crop, mode, method="cam", data_dir=None,
               per_request=1, thresholds=None, rule="youden", notice=None, calibrate=None):
    """For each image: an overlay for every class called positive at `thresholds` (K, NaN:
    none; None or no positive: the 3 most probable) and a grid of all K, named by cam_stem,
    each titled with its probability and decision (and `notice`, the sample model's); NIH's
    boxes of the image drawn when data_dir (or the shipped file) has some. calibrate: raw [K]
    -> Platt-calibrated [K], the probabilities and thresholds the titles then show (as
    infer.py --calibrated prints them). Returns the files written."""
    from common import atomic_path, check_writable_dir
    out_dir = Path(out_dir)
    check_writable_dir(out_dir, "--cam")  # before any image: a file there is one line
    written = []
    classes = backend.class_names
    limits = np.full(len(classes), np.nan) if thresholds is None else np.asarray(thresholds)
    foot = f"\n{notice}" if notice else ""
    what = "Platt-calibrated probability" if calibrate else "probability"
    for path in paths:
        probs, heat, gray = image_heatmaps(backend, path, resize, crop, method, per_request)
        chosen = np.flatnonzero(probs >= np.nan_to_num(limits, nan=2.0))
        if not len(chosen):
            chosen = np.argsort(-probs)[:3]
        stem = cam_stem(path, method, mode)
        boxes = image_boxes(data_dir, Path(path).name, gray.shape)
        shown_probs = calibrate(probs) if calibrate else probs
        shown_limits = calibrate(np.nan_to_num(limits, nan=0.5)) if calibrate else limits
        for k in chosen:
            name = "".join(c if c.isalnum() or c in "-." else "_" for c in classes[k])
            target = out_dir / f"{stem}_{name}.png"
            words = decision_words(probs[k], limits[k], rule, (shown_probs[k], shown_limits[k]))
            with atomic_path(target, "heatmap") as tmp:
                overlay(gray, heat[k], f"{Path(path).name}: {classes[k]}, {words}  ({method}, "
                        f"{mode}" + (", Platt-calibrated p" if calibrate else "") + ")"
                        + foot, [(d, b) for d, found in boxes.items() for b in found],
                        classes[k]).save(tmp, format="PNG")
            written.append(target)
        target = out_dir / f"{stem}_all.png"
        marks = ["" if not np.isfinite(t) else " +" if p >= t else " -"
                 for p, t in zip(probs, limits)]
        grid(gray, heat, [f"{n} {p:.3f}{m}" for n, p, m in zip(classes, shown_probs, marks)],
             target,
             f"{Path(path).name}: {method} heatmaps, {mode} model ({what} beside each "
             "finding" + (f"; + positive, - negative at the {rule} thresholds" if thresholds
                          is not None else "; no thresholds chosen on val") + ")"
             + (GRADCAM_NOTE if method == "gradcam++" else "") + foot,
             boxes)
        written.append(target)
    return written


def localize(backend, data_dir, lists, resize, crop, method="cam", tau=None, per_request=1,
             skip_bad_images=False, limit=None, log=print):
    """The localization benchmark over the boxed images of val (to choose each method's heatmap
    threshold) and test (to score it): {method: {"tau", "val", "test"}}. `method` makes the
    model's heatmaps (cam, gradcam++); tau: a fixed heatmap threshold instead."""
    from dataset import ImageList, SkippedImage
    from images import crop_gray, normalize_gray, resize_shorter
    classes = backend.class_names
    box_file = find_box_file(data_dir)
    boxes = read_boxes(box_file)
    fixed = tau  # any value in (0, 1]: scored exactly as given
    taus = TAUS if fixed is None else (float(fixed),)
    tallies = {part: {m: Tally(taus) for m in ("model", "random", "centre")}
               for part in ("val", "test")}
    for part in ("val", "test") if fixed is None else ("test",):
        images = ImageList(data_dir, lists[part], resize, None, skip_bad_images, limit)
        boxed = [i for i, n in enumerate(images.names) if n in boxes]
        if not boxed:
            raise DataError(f"{lists[part]}: none of its images has a box in {box_file}; " + (
                "the heatmap threshold is chosen on val's boxed images (or fix it with "
                "--localize-tau, e.g. 0.5, as --split official needs: it puts every boxed "
                "image in test)" if part == "val" else "the score is on test's boxed images"))
        count = sum(len(b) for i in boxed for b in boxes[images.names[i]].values())
        log(f"{part}: {len(boxed)} boxed images, {count} boxes")
        unplaced = []
        for i in boxed:
            name = images.names[i]
            try:  # PNG, JPEG or DICOM, as everywhere; unreadable ones skipped like everywhere
                original = images.load(i)
            except SkippedImage:
                continue
            size = original.size
            try:  # the boxes in this image's pixels (the sample's are 256x256)
                truths = scaled_boxes(boxes[name], box_scale(name, size))
            except DataError as e:
                unplaced.append(str(e))
                continue
            check_boxes_inside(truths, name, size, box_file)
            image = np.asarray(resize_shorter(original, resize))
            del original
            _, maps = crop_maps(backend, normalize_gray(crop_gray(image, crop)), method,
                                per_request)
            heat = tencrop_heatmap(maps, image.shape, crop)  # at the resized size
            scale = size[0] / image.shape[1]
            seed = int.from_bytes(name.encode()[-8:].rjust(8, b"\0"), "little") % 2 ** 32
            for disease, truth in truths.items():
                pair = shared_classes(classes, [disease])  # the model's column for it
                if not pair:
                    continue  # a finding this model was not trained on
                k = pair[0][0]
                tallies[part]["model"].add(disease, heat[k], truth, scale)
                tallies[part]["random"].add(disease, random_heatmap(image.shape, seed + k),
                                            truth, scale)
                tallies[part]["centre"].add(disease, centre_heatmap(image.shape), truth, scale)
        if unplaced:
            log(f"note: {part}: {len(unplaced)} boxed image(s) left out: {unplaced[0]}")
            if len(unplaced) == len(boxed):
                raise DataError(f"{lists[part]}: NIH's boxes cannot be placed on any of its "
                                f"{len(boxed)} boxed images ({unplaced[0]})")
    results = {}
    for method in ("model", "random", "centre"):
        tau = fixed if fixed is not None else float(tallies["val"][method].best_tau())
        results[method] = {"tau": tau, "test": tallies["test"][method].table(tau),
                           "val": None if fixed is not None else tallies["val"][method].table(tau)}
    return {"box_file": str(box_file), "methods": results, "iobb": list(IOBB), "iou": list(IOU),
            "tau_chosen_on": "fixed (--localize-tau)" if fixed is not None else "val"}


def format_localization(result):
    """Per disease: the model's accuracy at T(IoBB) 0.1 / 0.25 / 0.5 and the pointing game,
    with the ChestX-ray8 paper's T(IoBB) 0.1 beside it; then every method overall."""
    model = result["methods"]["model"]["test"]
    lines = [f"{'test, by T(IoBB)':<20}{'boxes':>6}{'0.1':>7}{'0.25':>7}{'0.5':>7}{'point':>7}"
             f"{'CXR8 0.1':>10}"]
    for disease, e in model.items():
        paper = (f"{CHESTXRAY8_TABLE4[0.1][BOXED_DISEASES.index(disease)]:.3f}"
                 if disease in BOXED_DISEASES else "")
        lines.append(f"{disease:<20}{e['boxes']:>6}" + "".join(
            f"{e['iobb'][t][0]:>7.3f}" for t in ("0.1", "0.25", "0.5")) + f"{e['pointing']:>7.3f}"
            f"{paper:>10}")
    lines.append(f"{'overall, by method':<20}{'tau':>6}{'0.1':>7}{'0.25':>7}{'0.5':>7}{'point':>7}"
                 f"{'AFP 0.1':>10}")
    for method, r in result["methods"].items():
        e = r["test"]["overall"]
        lines.append(f"{method:<20}{r['tau']:>6.3g}" + "".join(
            f"{e['iobb'][t][0]:>7.3f}" for t in ("0.1", "0.25", "0.5")) + f"{e['pointing']:>7.3f}"
            f"{e['iobb']['0.1'][1]:>10.2f}")
    return "\n".join(lines)
