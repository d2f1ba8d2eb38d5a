"""What compressed pixel data declares, read before anything is decoded (standard library only).

A DICOM header says how large its image is, but a decoder allocates what the compressed stream
itself declares: a 122 KB JPEG Baseline DX whose header says 1024x1024 and whose JPEG frame
header says 65500x65500 made a decoder allocate 15 GB. And a decoder given a stream cut short
may fill the missing rows with grey and say nothing. So, for every codec the scripts and the
DICOM node decode, before decoding:

- `frame_problem`: each frame's codestream must declare the header's rows, columns and samples
  (JPEG: the SOF marker; JPEG-LS: SOF55 and an LSE marker that enlarges it; JPEG 2000 and
  HTJ2K: the SIZ marker of the codestream, in a JP2 file its contiguous-codestream box; RLE:
  its segment table) and be complete (JPEG, JPEG-LS, JPEG 2000: the end-of-image marker ends
  it, before any padding of 00 or FF bytes; RLE: every segment starting inside the frame,
  pydicom's decoder checking each one's length);
- `inflated_problem`: a Deflated Explicit VR Little Endian data set (the whole data set is
  zlib-compressed) must not inflate to more than a limit (pydicom inflates it at once, with
  no bound).

PNG and JPEG files need neither: Pillow reads their declared size first (images.load_gray
checks it) and refuses a truncated file by default.
"""
import struct
import zlib

# JPEG (ITU T.81) start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15; JPEG-LS (T.87) SOF55
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                 "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                "1.2.840.10008.1.2.4.203"}
RLE_SYNTAX = "1.2.840.10008.1.2.5"
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
END_OF_IMAGE = b"\xff\xd9"  # JPEG's EOI, JPEG 2000's EOC


def frame_problem(syntax, frame, rows, columns, samples, bits_allocated):
    """Why `frame` (one frame's compressed bytes) cannot be the declared image, or None. Only
    headers and the last bytes are read; a transfer syntax this does not know is not checked
    (its decoder is then the only check)."""
    syntax = str(syntax)
    if syntax in JPEG_SYNTAXES:
        declared = _jpeg_frame(frame)
        what = "JPEG-LS" if syntax.endswith((".80", ".81")) else "JPEG"
    elif syntax in J2K_SYNTAXES:
        declared = _j2k_frame(frame)
        what = "JPEG 2000"
    elif syntax == RLE_SYNTAX:
        return _rle_problem(frame, samples * -(-bits_allocated // 8))
    else:
        return None
    if isinstance(declared, str):
        return f"its {what} stream {declared}"
    (height, width, components), (stream, end) = declared
    if (height, width, components) != (rows, columns, samples):
        return (f"its {what} stream declares {width}x{height} with {components} component(s), "
                f"the DICOM header {columns}x{rows} with {samples}")
    if not _ends_with_end_marker(stream, end):
        return f"its {what} stream is truncated (it does not end with its end-of-image marker)"
    return None


def _ends_with_end_marker(data, end):
    """Whether data[:end] ends with the end-of-image marker FF D9 before any padding of 00
    (DICOM's even length, or more) and FF (JPEG's fill bytes), which decoders pass over; read
    from the end in pieces, never copying a frame of up to 128 MB."""
    while end > 0:
        start = max(0, end - 65536)
        kept = data[start:end].rstrip(b"\x00\xff")
        if kept:
            last = start + len(kept) - 1  # the last byte that is not padding
            return data[last] == 0xD9 and last > 0 and data[last - 1] == 0xFF
        end = start
    return False


def _jpeg_frame(data):
    """((height, width, components), (the stream, where it ends)) from the frame header (SOF, or
    JPEG-LS's SOF55 and an LSE marker of ID 4 that redefines the size), read up to the first
    scan; or why not."""
    if data[:2] != b"\xff\xd8":
        return "does not start with a start-of-image marker"
    at, size = 2, None
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return f"has no marker at byte {at}"
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            at += 2
            continue
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if marker in JPEG_SOF:
            if size is not None:
                return "declares a second frame header"
            if at + 10 > len(data):
                break
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            size = [height, width, data[at + 9]]
        elif marker in (0xDE, 0xDF):  # DHP, EXP: a decoder allocates what DHP declares
            return "is hierarchical JPEG (a DHP or EXP marker), which DICOM does not use"
        elif marker == 0xF8 and at + 5 <= len(data) and data[at + 4] == 4 and size is not None:
            # JPEG-LS oversize dimensions (T.87 C.2.4.1.4): Wxy bytes each for Y and X
            wxy = data[at + 5]
            if not 2 <= wxy <= 4 or at + 6 + 2 * wxy > len(data):
                return "has a malformed LSE marker"
            size[0] = int.from_bytes(data[at + 6:at + 6 + wxy], "big")
            size[1] = int.from_bytes(data[at + 6 + wxy:at + 6 + 2 * wxy], "big")
        elif marker == 0xDA:  # the first scan: the frame's size is known by now
            if size is None:
                return "has no frame header before its scan"
            if size[0] == 0:
                return ("declares its height later, in a DNL marker (not read: the DICOM "
                        "header's size cannot be checked)")
            return tuple(size), (data, len(data))
        elif marker == 0xD9:
            return "ends before its scan"
        at += 2 + length
    return "ends before its first scan"


def _j2k_frame(data):
    """((height, width, components) of the SIZ marker, (data, where its codestream ends)) of a J2K
    codestream, or of a JP2 file's contiguous-codestream box (boxes walked by their lengths);
    or why not."""
    end = len(data)  # where the codestream ends
    if data[4:8] == b"jP  ":  # a JP2 file (ISO 15444-1 I.4): the codestream is a box
        at = 0
        while True:
            if at + 8 > len(data):
                return "is a JP2 file without a codestream box"
            length, kind = struct.unpack(">I4s", data[at:at + 8])
            box_head = 8
            if length == 1:  # the length in the next 8 bytes (XLBox)
                if at + 16 > len(data):
                    return "is a JP2 file with a truncated box"
                length, box_head = struct.unpack(">Q", data[at + 8:at + 16])[0], 16
            elif length == 0:  # to the end of the file
                length = len(data) - at
            if length < box_head:
                return "is a JP2 file with a malformed box"
            if kind == b"jp2c":
                start, end = at + box_head, min(at + length, len(data))
                break
            at += length
    else:
        start = 0
    head = data[start:start + 42]
    if head[:4] != b"\xff\x4f\xff\x51" or len(head) < 42:
        return "does not start with its SOC and SIZ markers"
    x, y, x0, y0, _, _, tx0, ty0 = struct.unpack(">IIIIIIII", head[8:40])
    components = struct.unpack(">H", head[40:42])[0]
    if x0 or y0 or tx0 or ty0:  # a decoder allocates the whole reference grid, x by y
        return (f"declares its image at an offset ({x0}, {y0}; tiles at {tx0}, {ty0}) on a "
                f"{x}x{y} grid: a DICOM frame's starts at 0")
    return (y, x, components), (data, end)


def _rle_problem(data, segments_needed):
    """Why an RLE frame's segment table cannot be the declared image, or None."""
    if len(data) < 64:
        return "its RLE header is shorter than 64 bytes"
    table = struct.unpack("<16I", data[:64])
    count, offsets = table[0], table[1:]
    if count != segments_needed:
        return (f"its RLE stream has {count} segment(s), the DICOM header needs "
                f"{segments_needed}")
    used = offsets[:count]
    if used[0] != 64 or any(b <= a for a, b in zip(used, used[1:])) or used[-1] >= len(data):
        return "its RLE segment table points outside the frame (truncated or corrupt)"
    return None


def inflated_problem(stream, limit):
    """Why a deflated data set cannot be read, or None: `stream` is a binary file (a DICOM file
    from its preamble); the data set after the file meta may inflate to at most `limit` bytes.
    Not deflated (or no file meta): None. Read in 1 MiB pieces; the output is never held."""
    meta_end, syntax = _file_meta(stream)
    if syntax != DEFLATED_SYNTAX:
        return None
    stream.seek(meta_end)
    inflate, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        while True:
            chunk = stream.read(2 ** 20)
            if not chunk:
                break
            while chunk:
                total += len(inflate.decompress(chunk, 2 ** 22))
                chunk = inflate.unconsumed_tail
                if total > limit:
                    return (f"its deflated data set inflates to over {limit / 2 ** 20:.0f} MiB "
                            "(a deflate bomb?)")
    except zlib.error as e:
        return f"its deflated data set is corrupt ({e})"
    return None


LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV",
            b"UV"}
VRS = LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                  b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}


def _file_meta(stream):
    """(where the file meta ends, its Transfer Syntax UID, stripped as pydicom strips it) of a
    DICOM file; (0, None) where it has no file meta (group 0002 after the preamble and DICM).
    Each element in explicit VR, or in implicit VR as a careless writer leaves it and pydicom
    still reads (pydicom's own reader of the meta takes only a path and does not say where the
    meta ends)."""
    stream.seek(0)
    if stream.read(132)[128:] != b"DICM":
        return 0, None
    at, syntax = 132, None
    while True:
        head = stream.read(8)
        if len(head) < 8 or head[:2] != b"\x02\x00":
            return at, syntax
        element, vr = struct.unpack("<H", head[2:4])[0], head[4:6]
        if vr in LONG_VRS:
            extra = stream.read(4)
            if len(extra) < 4:
                return at, syntax
            length, start = struct.unpack("<I", extra)[0], at + 12
        elif vr in VRS:
            length, start = struct.unpack("<H", head[6:8])[0], at + 8
        else:  # implicit VR: a 4-byte length after the tag
            length, start = struct.unpack("<I", head[4:8])[0], at + 8
        if element == 0x0010:
            stream.seek(start)
            syntax = stream.read(min(length, 256)).strip(b"\x00 ").decode("ascii", "replace")
        at = start + length
        stream.seek(at)
