"""The results as DICOM beside the report (node/sr.py): secondary-capture heatmaps in the
source's study; the UIDs derived from the source and the model; the results' character set;
and the source's header as the results copy it (with_type2)."""
import re
import unicodedata

# Imported by the node's process once, before any thread (serve.py imports node/ first): a
# first import racing in several threads fails
import highdicom as hd
import pydicom.pixels  # noqa: F401
from highdicom.frame import encode_frame
from pydicom.charset import python_encoding
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from node.dicom import VERSION, encode_file
from node.logs import log


def class_name_problem(names):
    """Why the model's class names cannot name findings in the reports and heatmaps, or None:
    each is a report's text value, a heatmap's Image Comments and the title burnt into it (one
    line, not empty), names its heatmap's UID (no two alike) and means its code in the report
    (Code Meaning is LO: 64 characters at most)."""
    for name in names:
        if not name.strip():
            return f"class name {name!r} is empty"
        if len(name) > 64:
            return f"class name {name[:20]!r}... is longer than 64 characters"
        if any(unicodedata.category(c)[0] == "C" for c in name):
            return f"class name {name!r} holds a control character"
        if "\\" in name:  # DICOM's value delimiter: one name would read as several
            return f"class name {name!r} holds a backslash"
    repeated = sorted({name for name in names if names.count(name) > 1})
    return f"class names repeat: {', '.join(repeated)}" if repeated else None


def result_uid(source_uid, model_digest, what, root):
    """Deterministic: the same image and model always give the same result UIDs, so a result
    sent twice (after a kill) is one instance at the PACS."""
    from pydicom.uid import generate_uid
    return generate_uid(prefix=root, entropy_srcs=[source_uid, model_digest, what])


def result_charset(source, texts):
    """The results' Specific Character Set: the source's where it is one character set
    without code extensions that highdicom knows and that holds `texts` (the model's class
    names: else they would reach the PACS as '?'), else UTF-8 (pydicom has decoded the source's
    names already). highdicom refuses some sets the standard allows, such as the Japanese
    images' ['', 'ISO 2022 IR 87'], and would fail the results."""
    value = source.get("SpecificCharacterSet")
    known = {v.value for v in hd.SpecificCharacterSetValues}
    if value is not None and not (isinstance(value, str) and value in known
                                  and not value.startswith("ISO 2022")):
        return "ISO_IR 192"
    codec = "ascii" if value is None else python_encoding.get(value)
    try:
        for text in texts:
            text.encode(codec)  # no codec (None): TypeError, UTF-8
    except (UnicodeEncodeError, TypeError, LookupError):
        return "ISO_IR 192"
    return value


def build_heatmaps(source, overlays, identity, uid_root, syntax):
    """Secondary captures of the overlays [(k, (H, W, 3) uint8)] of one image, in the source's
    study, encoded in `syntax`: JPEG Baseline (lossy, and marked so; a 1024x1024 overlay is
    0.2 MB instead of 3, which the node writes, sends and the PACS stores once per positive
    finding) or Explicit VR Little Endian (uncompressed). Yields (k, the encoded file).

    highdicom builds the first; the others differ from it only in the instance's own attributes
    (UID, number, comment, pixels), which are put into it in turn: 5 ms less each. So all
    overlays are of one size, the first's."""
    digest = identity["sha256"]
    jpeg = syntax == JPEGBaseline8Bit
    sc = None
    for k, rgb in overlays:
        name = identity["classes"][k]
        uid = result_uid(source.SOPInstanceUID, digest, f"sc-{name}", uid_root)
        if sc is None:
            sc = _heatmap_dataset(source, rgb, uid, identity, uid_root, syntax)
        elif rgb.shape != (sc.Rows, sc.Columns, 3):
            raise ValueError(f"overlay {k} is {rgb.shape}, the first {(sc.Rows, sc.Columns, 3)}")
        else:
            frame = encode_frame(
                rgb, transfer_syntax_uid=syntax, bits_allocated=sc.BitsAllocated,
                bits_stored=sc.BitsStored, photometric_interpretation=sc.PhotometricInterpretation,
                pixel_representation=sc.PixelRepresentation,
                planar_configuration=sc.PlanarConfiguration)
            sc.PixelData = encapsulate([frame]) if jpeg else frame
            sc.SOPInstanceUID = uid  # save_as puts it in the file meta too
        sc.InstanceNumber = k + 1
        if jpeg:  # PS3.3 C.7.6.1.1.5: a lossy image says so, for good (also once decompressed)
            sc.LossyImageCompressionRatio = f"{rgb.nbytes / len(sc.PixelData):.4g}"
        sc.ImageComments = "; ".join(filter(None, [
            f"{name}: class activation map", "research use only, not for diagnosis",
            identity.get("notice")]))
        yield k, encode_file(sc)


def _heatmap_dataset(source, rgb, uid, identity, uid_root, syntax):
    jpeg = syntax == JPEGBaseline8Bit
    # The overlay lies on the source's pixels: its orientation is the source's, when known
    orientation = [str(v) for v in (source.get("PatientOrientation") or [])]
    known = len(orientation) == 2 and all(v in ("A", "P", "L", "R", "H", "F")
                                          for v in orientation)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, bits_allocated=8,
        photometric_interpretation="YBR_FULL_422" if jpeg else "RGB",
        coordinate_system="PATIENT", patient_orientation=orientation if known else ("L", "F"),
        series_instance_uid=result_uid(source.StudyInstanceUID, identity["sha256"], "sc-series",
                                       uid_root),
        series_number=9002, sop_instance_uid=uid, instance_number=1,
        manufacturer="CheXNet toolkit", transfer_syntax_uid=syntax,
        specific_character_set=result_charset(source, identity["classes"]),
        series_description="CheXNet heatmaps - research use only",
        software_versions=VERSION)
    if not known:
        sc.PatientOrientation = None  # type 2: empty, unknown (never guessed)
    sc.BurnedInAnnotation = "YES"
    source_laterality(sc, source)
    if jpeg:
        sc.LossyImageCompression = "01"
        sc.LossyImageCompressionMethod = "ISO_10918_1"
    return sc


def source_laterality(ds, source):
    """General Series' Laterality (2C) is needed unless the body part is known to be unpaired:
    the source's body part where it names one properly, else Laterality empty (unknown)."""
    body_part = str(source.get("BodyPartExamined") or "")
    if re.fullmatch(r"[A-Z0-9_ ]{1,16}", body_part):
        ds.BodyPartExamined = body_part
    else:
        ds.Laterality = None


def uncompressed(ds):
    """A result as a destination that takes no compressed transfer syntax gets it: a JPEG
    heatmap decoded to RGB (still marked lossy), under its own SOP Instance UID (one result,
    however it travels: a resend after a crash must replace it, not add a second)."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    return ds


# The results copy the source's patient and study (PS3.3 C.7.1.1, C.7.2.1): these are type 2,
# present but possibly empty; de-identified images often leave them out altogether, and
# real ones hold values the standard does not allow (a sex 'U', a year for a date), which
# highdicom refuses: the results would never be built
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")
SEX_VALUES = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F"}


def with_type2(ds):
    """The header as the results copy it: each TYPE2 attribute present, as text with the
    standard's VR, empty where the source lacks it or holds a value the standard does not allow
    there (said in a log line: the results still come, with that attribute empty). An element
    the source sent with another VR (a Study ID as US, a name as OB, an empty sequence) is made
    again with the right one: pydicom would write the wrong one, or fail. The source's own
    file is not changed."""
    from pydicom.valuerep import DA, TM
    changed = []
    for keyword in TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
            continue
        element = ds[keyword]
        try:
            value = ds[keyword].value
            if ds[keyword].VM > 1:  # one person, one date: the first of several
                value = value[0]
        except Exception:  # a value pydicom cannot even read
            value = None
        text = "" if value is None or isinstance(value, (bytes, bytearray, list)) or \
            ds[keyword].VR in ("SQ", "OB", "OW", "UN") else str(value).strip()
        if keyword == "PatientSex":
            fixed = SEX_VALUES.get(text.upper(), "")
        elif keyword.endswith("Date") and text:
            try:
                fixed = text if len(text) == 8 and DA(text) is not None else ""
            except ValueError:
                fixed = ""
        elif keyword.endswith("Time") and text:
            try:
                fixed = text if TM(text) is not None else ""
            except ValueError:
                fixed = ""
        elif keyword in ("StudyID", "AccessionNumber"):  # SH: at most 16 characters
            fixed = text if len(text) <= 16 else ""
        elif keyword == "PatientID":  # LO: at most 64
            fixed = text if len(text) <= 64 else ""
        else:  # the two person names
            fixed = text
        if fixed != text or str(ds[keyword].value) != text:
            changed.append(f"{keyword} {str(element.value)[:40]!r} ({element.VR}) -> {fixed!r}")
        del ds[keyword]
        setattr(ds, keyword, fixed)  # the dictionary's VR
    if changed:
        log.info("%s: values the standard does not allow, as the results carry them: %s",
                 ds.get("SOPInstanceUID", "?"), ", ".join(changed))
    return ds

