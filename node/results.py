"""The results as DICOM: a Structured Report (highdicom; ReportWriter, the same report in a
tenth of the time) and secondary-capture heatmaps, in the source's study, under UIDs derived
from the source and the model; and the source's header as the results copy it (with_type2)."""
import threading
import unicodedata

# Imported by the node's process once, before any thread (serve.py imports node/ first): a
# first import racing in several threads fails
import highdicom as hd
import pydicom
import pydicom.pixels  # noqa: F401
from highdicom.frame import encode_frame
from pydicom.charset import python_encoding
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGBaseline8Bit
from pydicom.valuerep import DS

from node.dicom import VERSION, encode_file
from node.logs import log


def class_name_problem(names):
    """Why the model's class names cannot name findings in the reports and heatmaps, or None:
    each is a report's text value, a heatmap's Image Comments and the title burnt into it (one
    line, not empty), and names its heatmap's UID (no two alike)."""
    for name in names:
        if not name.strip():
            return f"class name {name!r} is empty"
        if any(unicodedata.category(c)[0] == "C" for c in name):
            return f"class name {name!r} holds a control character"
    repeated = sorted({name for name in names if names.count(name) > 1})
    return f"class names repeat: {', '.join(repeated)}" if repeated else None


def result_uid(source_uid, model_digest, what, root):
    """Deterministic: the same image and model always give the same result UIDs, so a result
    sent twice (after a kill) is one instance at the PACS."""
    from pydicom.uid import generate_uid
    return generate_uid(prefix=root, entropy_srcs=[source_uid, model_digest, what])


def _code(value, meaning):
    from pydicom.sr.coding import Code
    return Code(value, "99CHEXNET", meaning)


DECISION_CODES = {"positive": codes.SCT.Present, "negative": codes.SCT.Absent}


def sr_content(source, findings, identity, points_note):
    """The report's content tree (highdicom): the findings, the model, the source image."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    items = [
        hd.sr.TextContentItem(_code("RUO", "Intended use"),
                              "RESEARCH USE ONLY - NOT FOR DIAGNOSIS. Not a medical device; "
                              "findings must not be used for clinical decisions.", contains),
        hd.sr.TextContentItem(codes.DCM.AlgorithmName, identity["name"], contains),
        hd.sr.TextContentItem(codes.DCM.AlgorithmVersion,
                              f"{identity['version']}; model sha256 {identity['sha256']}; "
                              f"exported {identity['exported']}; {identity['runtime']}", contains),
        hd.sr.TextContentItem(_code("MODEL-FILES", "Model files SHA-256"), "; ".join(
            f"{k} {v}" for k, v in identity["files"].items()), contains),
        hd.sr.TextContentItem(_code("OPERATING-POINTS", "Operating points"), points_note,
                              contains),
        _source_item(source),
    ]
    for row in findings:
        group = hd.sr.ContainerContentItem(_code("FINDING-RESULT", "Finding result"),
                                           relationship_type=contains)
        children = [
            hd.sr.TextContentItem(codes.DCM.Finding, row["finding"], contains),
            hd.sr.NumContentItem(_code("PROBABILITY", "Probability"), row["probability"], unit,
                                 relationship_type=contains)]
        if row.get("calibrated_probability") is not None:
            children.append(hd.sr.NumContentItem(
                _code("CALIBRATED", "Calibrated probability (Platt)"),
                row["calibrated_probability"], unit, relationship_type=contains))
        if row["decision"] is None:
            children.append(hd.sr.TextContentItem(_code("DECISION", "Decision"),
                                                  "not determined (no threshold)", contains))
        else:
            children += [
                hd.sr.NumContentItem(_code("THRESHOLD", "Decision threshold"), row["threshold"],
                                     unit, relationship_type=contains),
                hd.sr.CodeContentItem(_code("DECISION", "Decision"),
                                      DECISION_CODES[row["decision"]], contains)]
        group.ContentSequence = children
        items.append(group)
    return _root(items)


def _source_item(source):
    return hd.sr.ImageContentItem(codes.DCM.SourceOfMeasurement, source.SOPClassUID,
                                  source.SOPInstanceUID,
                                  relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _root(items):
    root = hd.sr.ContainerContentItem(_code("CXR-AI", "Chest X-ray AI classification"))
    root.ContentSequence = items
    return root


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


def _sr_document(source, content, identity, uid_root):
    """A Comprehensive SR in the source's study (patient and study copied by highdicom)."""
    digest = identity["sha256"]
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=content,
        specific_character_set=result_charset(source, identity["classes"]),
        series_instance_uid=result_uid(source.StudyInstanceUID, digest, "sr-series", uid_root),
        series_number=9001, sop_instance_uid=result_uid(source.SOPInstanceUID, digest, "sr",
                                                        uid_root),
        instance_number=1, manufacturer="CheXNet toolkit", is_complete=True,
        series_description="CheXNet AI findings - research use only", software_versions=VERSION)


def build_sr(source, findings, identity, points_note, uid_root):
    """The report, every part of it built by highdicom (ReportWriter's reference)."""
    return encode_file(_sr_document(source, sr_content(source, findings, identity, points_note),
                                 identity, uid_root))


CONTENT_SEQUENCE = 0x0040A730  # (0040,A730): the report's content tree


def _head(document):
    """The document's encoding without its content tree (removed from it), None where an
    element follows the tree (then the tree's bytes cannot simply follow the rest)."""
    del document.ContentSequence
    return None if max(document.keys()) > CONTENT_SEQUENCE else encode_file(document)


class ReportWriter:
    """build_sr's report (the same elements and values) in a tenth of its time.

    highdicom builds and checks every content item, copies the tree twice and pydicom encodes
    it element by element: 0.12-0.25 s of Python per report on this CPU, the node's largest
    cost per image after inference. Every report of one model has the same content tree but
    for the source image's reference and the values, so the tree is built once by highdicom
    (sr_content) with a distinct stand-in in every place that changes, and encoded once (a
    template) with its sequences and items of undefined length (PS3.5 7.5.2: delimited, so a
    value of another length changes no length around it). A report is then highdicom's
    document for this source (patient, study, evidence; the content tree is its last element)
    followed by the template's bytes with this image's values, each encoded by pydicom.
    Findings of another shape (a threshold or calibration more or less) or another character
    set get their own template; a template whose stand-ins are not each found is not used
    (build_sr is)."""
    MAX_TEMPLATES = 16

    def __init__(self, identity, points_note, uid_root):
        self.identity, self.points_note, self.uid_root = identity, points_note, uid_root
        self.lock = threading.Lock()
        self.templates = {}
        # a CODE item's value, as in the template (its sequence and item of undefined length)
        self.decisions = {}
        for decision, code in DECISION_CODES.items():
            ds = pydicom.Dataset()
            ds.ConceptCodeSequence = [hd.sr.CodedConcept.from_code(code)]
            _undefined_lengths(ds["ConceptCodeSequence"])
            self.decisions[decision] = _elements(ds)

    def __call__(self, source, findings):
        key = (str(source.get("SpecificCharacterSet")), tuple(
            (row["finding"], row["threshold"], row["decision"] is None,
             row.get("calibrated_probability") is not None) for row in findings))
        with self.lock:
            template = self.templates.get(key)
        if template is None:
            template = self._template(source, findings)
            with self.lock:
                if len(self.templates) >= self.MAX_TEMPLATES:
                    self.templates.clear()
                self.templates[key] = template
        head = template and _head(_sr_document(source, _root([_source_item(source)]),
                                               self.identity, self.uid_root))
        if not head:
            return build_sr(source, findings, self.identity, self.points_note, self.uid_root)
        parts = [head]
        for chunk, slot in template:
            parts.append(chunk)
            if slot is not None:
                parts.append(self._slot(slot, source, findings))
        return b"".join(parts)

    def _slot(self, slot, source, findings):
        what, k = slot
        if what == "decision":
            return self.decisions[findings[k]["decision"]]
        ds = pydicom.Dataset()
        if what == "image":
            ds.ReferencedSOPClassUID = source.SOPClassUID
            ds.ReferencedSOPInstanceUID = source.SOPInstanceUID
        else:  # a NUM content item's value, as highdicom's NumContentItem writes a float
            ds.FloatingPointValue = findings[k][what]
            ds.NumericValue = DS(findings[k][what], auto_format=True)
        return _elements(ds)

    def _template(self, source, findings):
        """[(bytes, slot or None)] of the encoded content tree; [] where it cannot be."""
        stand_in = iter(range(7, 10 ** 6))  # n / 3 > 2: never a probability or threshold
        rows = []
        for row in findings:
            row = dict(row, probability=next(stand_in) / 3)
            if row.get("calibrated_probability") is not None:
                row["calibrated_probability"] = next(stand_in) / 3
            if row["decision"] is not None:
                row["decision"] = "positive"
            rows.append(row)
        document = _sr_document(source, sr_content(source, rows, self.identity,
                                                   self.points_note), self.identity,
                                self.uid_root)
        _undefined_lengths(document["ContentSequence"])
        whole = encode_file(document)
        head = _head(document)
        content = whole[len(head or b""):]
        if head is None or not content.startswith(b"\x40\x00\x30\xa7SQ"):
            log.warning("report template not usable (the content tree is not the document's "
                        "last element): every report is built by highdicom")
            return []
        slots = [("image", None)]
        for k, row in enumerate(rows):
            slots.append(("probability", k))
            if row.get("calibrated_probability") is not None:
                slots.append(("calibrated_probability", k))
            if row["decision"] is not None:
                slots.append(("decision", k))
        template, at = [], 0
        for slot in slots:
            encoded = self._slot(slot, source, rows)
            found = content.find(encoded, at)
            if found < 0 or (slot[0] != "decision" and content.count(encoded) != 1):
                log.warning("report template not usable (%s of finding %s): every report is "
                            "built by highdicom", *slot)
                return []
            template.append((content[at:found], slot))
            at = found + len(encoded)
        template.append((content[at:], None))
        return template


def _undefined_lengths(sequence):
    sequence.is_undefined_length = True
    for item in sequence.value:
        item.is_undefined_length_sequence_item = True
        for element in item:
            if element.VR == "SQ":
                _undefined_lengths(element)


def _elements(ds):
    """The encoding of ds's elements, as in the reports (Explicit VR Little Endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


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
        sc.ImageComments = f"{name}: class activation map; research use only, not for diagnosis"
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
    if jpeg:
        sc.LossyImageCompression = "01"
        sc.LossyImageCompressionMethod = "ISO_10918_1"
    return sc


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

