"""A received object checked before anything is decoded: read in full (a truncated object or a
deflate bomb fails here), its image attributes present and its declared size within the
limit, compressed pixel data declaring that same image; and what the quarantine keeps of an
object refused by its header."""
from common import one_line
from images import pixel_data_problem, read_dicom
from node.dicom import DOES_NOT_MATCH, OUT_OF_RESOURCES, SUCCESS, encode_file


def read_dataset(data, max_image_mb):
    """The data set of a received object (bytes of a DICOM file), parsed up to its end (a
    truncated object fails here, pydicom's error); images.read_dicom's DataError for a deflate
    bomb (it would be inflated in the node's own process)."""
    ds = read_dicom(data, max_image_mb * 2 ** 20)
    ds.get("PixelData")
    return ds


def image_problem(ds, max_image_mb):
    """(problem, status) of a header's image attributes: present, their declared size (rows x
    columns x frames x samples x bytes) within the limit, uncompressed pixel data complete,
    compressed pixel data declaring that same image in its own stream and not cut short
    (images.pixel_data_problem). Nothing is decoded: a decompression bomb is refused by what
    it declares, in the DICOM header or in its codestream."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as e:
        return f"image attributes missing or invalid ({one_line(e)[:80]})", DOES_NOT_MATCH
    if min(rows, columns, frames, samples, bits) <= 0 or "PixelData" not in ds:
        return "no image (Rows/Columns/Pixel Data)", DOES_NOT_MATCH
    declared = rows * columns * frames * samples * -(-bits // 8)
    if declared > max_image_mb * 2 ** 20:
        return (f"declared image {columns}x{rows}x{frames} frames x {bits} bits = "
                f"{declared / 2 ** 20:.0f} MiB over --max-image-mb {max_image_mb:g}",
                OUT_OF_RESOURCES)
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is not None and not syntax.is_compressed:
        have = len(ds.PixelData)
        if have < declared:
            return f"pixel data truncated ({have} of {declared} bytes)", DOES_NOT_MATCH
    problem = pixel_data_problem(ds)
    if problem:
        return problem, DOES_NOT_MATCH
    return None, SUCCESS


def without_pixels(ds):
    """The object's encoding without its pixels (None where even that cannot be encoded: the
    quarantine then keeps the reason alone)."""
    try:
        ds = ds.copy()
        for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if key in ds:
                del ds[key]
        return encode_file(ds)
    except Exception:
        return None
