"""DICOM test files written with pydicom from real NIH PNGs, the ways hospitals store them:
MONOCHROME2 and MONOCHROME1, 12 bits stored in 16, a modality rescale, a window or a VOI LUT,
JPEG 2000 compressed. Each decodes, by the DICOM standard, to the PNG's own pixels. Also, for
the DICOM node's tests and benchmark: where DCMTK's programs are, and a report read back."""
import os
import shutil
import subprocess

import numpy as np
from PIL import Image

KINDS = ("window", "monochrome1", "voi_lut", "rescale", "no_voi", "no_voi_monochrome1",
         "jpeg2000")


def write_dicom(png, path, kind="window"):
    """Write `png` (an 8-bit grayscale image) as a DICOM file of the given kind; returns path."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (JPEG2000Lossless, ExplicitVRLittleEndian, SecondaryCaptureImageStorage,
                             generate_uid)
    png8 = np.asarray(Image.open(png).convert("L")).astype(np.uint16)
    stored = png8 * 16  # 12 bits: 0..4080
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "test"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    # The linear VOI function maps [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] onto 0..1: here
    # 0..4080, so the window gives back stored / 4080 * 255 = the PNG's value.
    window = (2040.5, 4081)
    if kind in ("monochrome1", "jpeg2000"):
        ds.PhotometricInterpretation = "MONOCHROME1"
        stored = (255 - png8) * 16
    if kind == "rescale":  # Hounsfield-like values: modality value = stored - 1024
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "US"
        window = (2040.5 - 1024, 4081)
    if kind == "voi_lut":  # a 16-bit LUT: stored x -> x / 16 * 257, so / 65535 * 255 = PNG
        item = pydicom.Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        lut = np.minimum(np.round(np.arange(4096) / 16 * 257), 65535).astype(np.uint16)
        item.add_new(0x00283006, "OW", lut.tobytes())  # LUT Data
        ds.VOILUTSequence = [item]
    elif not kind.startswith("no_voi"):
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype(np.uint16).tobytes()
    if kind.startswith("no_voi"):  # 8 bits as stored, no window: read as stored, the PNG's own
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        stored = png8 if kind == "no_voi" else 255 - png8
        ds.PhotometricInterpretation = "MONOCHROME2" if kind == "no_voi" else "MONOCHROME1"
        ds.PixelData = stored.astype(np.uint8).tobytes()
    if kind == "jpeg2000":
        ds.compress(JPEG2000Lossless, stored.astype(np.uint16))
    ds.save_as(path, enforce_file_format=True)
    return path


def dx_file(png, path, study, series, number, sop_class="1.2.840.10008.5.1.4.1.1.1.1"):
    """A DX (for presentation) file of the NIH PNG, 12 bits with a window, as a modality
    writes it: patient, study, series, orientation."""
    import pydicom
    from pydicom.uid import generate_uid
    write_dicom(png, path)
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^NIH", png.stem, "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "A1", "1"
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, number
    ds.PatientOrientation, ds.ViewPosition, ds.BodyPartExamined = ["L", "F"], "PA", "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.save_as(path, enforce_file_format=True)
    return path


def dcmtk(binary):
    """The path of DCMTK's program (storescu, storescp), or None: not pynetdicom's programs of
    the same names, which a virtual environment puts first on the PATH."""
    folders = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/bin"]
    for folder in dict.fromkeys(folders):
        found = shutil.which(binary, path=folder)
        try:
            if found and "$dcmtk:" in subprocess.run([found, "--version"], capture_output=True,
                                                     text=True, timeout=30).stdout:
                return found
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def dicom_errors(dciodvfy, ds, path):
    """dicom3tools' dciodvfy (its path) on the dataset, written to path: its error lines
    (warnings such as 'unrecognized defined term' for this project's private coding scheme
    are not errors)."""
    ds.save_as(path)
    proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
    return [line for line in (proc.stdout + proc.stderr).splitlines()
            if line.startswith("Error")]


def evidence_uids(sr):
    """The SOP Instance UIDs a report names as its evidence."""
    return [str(item.ReferencedSOPInstanceUID)
            for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence]


def sr_findings(sr):
    """{finding: (probability, threshold, decision)} and the referenced image UID of a report,
    read by highdicom's TID 1500 reader, and {concept: its TEXT items' values joined by '; '}."""
    from node.sr import read_sr
    findings, source = read_sr(sr)
    texts = {}

    def walk(items):
        for item in items:
            if item.ValueType == "TEXT":
                meaning = item.ConceptNameCodeSequence[0].CodeMeaning
                texts[meaning] = "; ".join(filter(None, [texts.get(meaning), str(item.TextValue)]))
            walk(item.get("ContentSequence", []))
    walk(sr.ContentSequence)
    return ({name: (p, threshold, decision) for name, (p, _, threshold, decision)
             in findings.items()}, source, texts)


def compressed_dicom(png, path, syntax, edit=None):
    """The PNG as a single-frame 8-bit DICOM in a compressed transfer syntax (JPEG Baseline
    through Pillow, the others through pydicom's encoders), its one frame's codestream passed
    through edit(bytes) -> bytes where given (a hostile stream: another size declared, cut
    short). Returns path."""
    import io

    import pydicom
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEGBaseline8Bit
    write_dicom(png, path, "no_voi")
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if syntax == JPEGBaseline8Bit:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        frame = buffer.getvalue()
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax, pixels)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    if edit is not None:
        frame = edit(frame)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def declare_size(frame, width, height):
    """A JPEG, JPEG-LS or JPEG 2000 codestream whose frame header (SOF, SOF55; SIZ) declares
    width x height, its data unchanged: a stream that lies about its size."""
    import struct
    frame = bytearray(frame)
    if frame[:2] == b"\xff\xd8":  # JPEG, JPEG-LS: the first SOFn (or SOF55)
        at = 2
        while frame[at + 1] not in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7):
            at += 2 + struct.unpack(">H", frame[at + 2:at + 4])[0]
        frame[at + 5:at + 9] = struct.pack(">HH", height, width)
    else:  # JPEG 2000: SIZ right after SOC
        frame[8:16] = struct.pack(">II", width, height)
    return bytes(frame)


def deflate_bomb(path, gigabytes=0.5):
    """A Deflated Explicit VR Little Endian DX of a few MB whose data set inflates to
    `gigabytes` GB: its identifying elements, then a private element of zeros, streamed into
    the deflated data set (the file meta written by pydicom). Returns path."""
    import struct
    import zlib

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "DX", generate_uid(), generate_uid()
    ds.add_new(0x00290010, "LO", "BOMB")
    elements = pydicom.filebase.DicomBytesIO()
    elements.is_little_endian, elements.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(elements, ds)
    head = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(head, meta)
    size = int(gigabytes * 2 ** 30)
    zeros_element = struct.pack("<HH2sHI", 0x0029, 0x1010, b"OB", 0, size)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(2 ** 24)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + head.getvalue())
        f.write(deflate.compress(elements.getvalue() + zeros_element))
        for _ in range(size // len(zeros)):
            f.write(deflate.compress(zeros))
        f.write(deflate.flush())
    return path
