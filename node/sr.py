"""The Structured Report: TID 1500 (Measurement Report) in a Comprehensive 3D SR, built by
highdicom, one measurement group per finding with its coded concept, the probability (raw and
calibrated), the threshold and the decision (SNOMED Present/Absent), the algorithm that made it
and the source image; ReportWriter, the same report in a fraction of the time.

The codes (docs/serve.md has the table): a finding takes the code of pydicom's DICOM code
dictionary that names it, else one of this project's private coding scheme (PRIVATE_SCHEME);
no SNOMED code is made up. Any class set works: a name without a code of its own gets a private
one derived from it.
"""
import hashlib
import struct
import threading

import highdicom as hd
from highdicom.sr.templates import DEFAULT_LANGUAGE
import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DS

from node.dicom import VERSION, encode_file
from node.logs import log
from node.results import result_charset, result_uid

PRIVATE_SCHEME = "99CHEXNET"  # this project's coding scheme (PS3.16 8.2: 99 = private)

# A finding's code where pydicom's dictionary has one that names it (the chest X-ray data sets'
# Effusion is pleural, Edema pulmonary, Infiltration an infiltrate)
STANDARD_CODES = {
    "Cardiomegaly": codes.SCT.Cardiomegaly,
    "Effusion": codes.SCT.PleuralEffusion, "Pleural Effusion": codes.SCT.PleuralEffusion,
    "Nodule": codes.SCT.Nodule,
    "Mass": codes.SCT.Mass,
    "Pneumothorax": codes.SCT.Pneumothorax,
    "Edema": codes.SCT.PulmonaryEdema,
    "Fibrosis": codes.SCT.Fibrosis,
    "Infiltration": codes.DCM.Infiltrate,
}
# The private codes of the other NIH and CheXpert/MIMIC findings (Code Value is SH: 16 at most)
PRIVATE_CODES = {
    "Atelectasis": "ATELECTASIS", "Consolidation": "CONSOLIDATION", "Pneumonia": "PNEUMONIA",
    "Emphysema": "EMPHYSEMA", "Pleural_Thickening": "PLEURAL-THICK", "Hernia": "HERNIA",
    "No Finding": "NO-FINDING", "Enlarged Cardiomediastinum": "ENLARGED-CM",
    "Lung Opacity": "LUNG-OPACITY", "Lung Lesion": "LUNG-LESION", "Pleural Other":
    "PLEURAL-OTHER", "Fracture": "FRACTURE", "Support Devices": "SUPPORT-DEVICES",
}


def _private(value, meaning):
    return Code(value, PRIVATE_SCHEME, meaning)


def finding_code(name):
    """The code of the class `name`: the dictionary's, this project's, or for a class of
    another data set 'X-' and the first 14 hex digits of its name's SHA-256, meaning the name."""
    if name in STANDARD_CODES:
        return STANDARD_CODES[name]
    value = PRIVATE_CODES.get(name) or "X-" + hashlib.sha256(name.encode()).hexdigest()[:14]
    return _private(value, name)


PROCEDURE = _private("CHEST-XR", "Chest radiograph")
INTENDED_USE = _private("RUO", "Intended use")
NOTICE = _private("NOTICE", "Notice")
RAW = _private("SIGMOID", "Model output (sigmoid)")
CALIBRATED = _private("PLATT", "Platt-calibrated model output")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
DECISION_CODES = {"positive": codes.SCT.Present, "negative": codes.SCT.Absent}
RESEARCH_USE = ("RESEARCH USE ONLY - NOT FOR DIAGNOSIS. Not a medical device; findings must "
                "not be used for clinical decisions.")


def algorithm(identity, points_note):
    """TID 4019: the model by name and version, its files' SHA-256 and operating points."""
    return hd.sr.AlgorithmIdentification(
        name=identity["name"], version=identity["version"], manufacturer="CheXNet toolkit",
        parameters=[
            f"model sha256 {identity['sha256']}", f"exported {identity['exported']}",
            identity["runtime"], *(f"{k} sha256 {v}" for k, v in identity["files"].items()),
            f"operating points: {points_note}"])


def _context(identity, uid_root):
    """TID 1001: the observer is this device (the model), by a UID of its own."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid(identity["sha256"], identity["sha256"], "device", uid_root),
        name="CheXNet", manufacturer_name="CheXNet toolkit", model_name=identity["name"])
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def sr_content(source, findings, identity, points_note, uid_root):
    """The report's content tree (highdicom's TID 1500) for `findings` of `source`."""
    context = _context(identity, uid_root)
    algorithm_id = algorithm(identity, points_note)
    groups = []
    for row in findings:
        code = finding_code(row["finding"])
        # floats, as ReportWriter writes them (highdicom writes an int without its float)
        measurements = [hd.sr.Measurement(codes.DCM.Probability, float(row["probability"]),
                                          NO_UNITS, method=RAW)]
        if row.get("calibrated_probability") is not None:
            measurements.append(hd.sr.Measurement(
                codes.DCM.Probability, float(row["calibrated_probability"]), NO_UNITS,
                method=CALIBRATED))
        evaluations = []
        if row["decision"] is not None:
            measurements.append(hd.sr.Measurement(codes.DCM.ThresholdValue,
                                                  float(row["threshold"]), NO_UNITS))
            evaluations.append(hd.sr.QualitativeEvaluation(code,
                                                           DECISION_CODES[row["decision"]]))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=_tracking_uid(source, row["finding"], identity, uid_root),
                identifier=row["finding"]),
            finding_type=code, algorithm_id=algorithm_id, measurements=measurements,
            qualitative_evaluations=evaluations or None,
            source_images=[_source_image(source)]))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=PROCEDURE,
                                     imaging_measurements=groups)
    report[0].ContentSequence.append(_evaluations(identity))
    return report


def _evaluations(identity, *first):
    """TID 1500 row 12, the qualitative evaluations of the whole report: `first` items, then
    what it may be used for and, for a model trained on the bundled sample, that notice."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    container = hd.sr.ContainerContentItem(QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = [*first, hd.sr.TextContentItem(INTENDED_USE, RESEARCH_USE,
                                                               contains)]
    if identity.get("notice"):
        container.ContentSequence.append(hd.sr.TextContentItem(NOTICE, identity["notice"],
                                                               contains))
    return container


NOT_CLASSIFIED = (_private("RESULT", "Classification result"),
                  _private("NOT-CLASSIFIED", "Not classified: no result"))
REASON = _private("REASON", "Reason")


def build_unclassified_sr(source, reason, identity, uid_root):
    """The report of an image the node accepted and could not classify (it cannot be decoded,
    it is colour or multi-frame, a decoder failed): in its study, referencing it, no findings;
    a coded 'not classified' and the reason, where a TID 1500 report holds qualitative
    evaluations of the whole (row 12: a report without measurements is allowed one). Its UID
    is not the classified report's: a later result (the image sent again) comes beside it."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    # highdicom's MeasurementReport needs measurements: its root, language, observer and
    # procedure, as it writes them, without
    root = hd.sr.ContainerContentItem(codes.DCM.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = [
        *hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE),
        *_context(identity, uid_root),
        hd.sr.CodeContentItem(codes.DCM.ProcedureReported, PROCEDURE,
                              hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD),
        _evaluations(identity, hd.sr.CodeContentItem(*NOT_CLASSIFIED, contains),
                     hd.sr.TextContentItem(REASON, reason[:1000], contains))]
    return encode_file(_sr_document(source, root, identity, uid_root, "sr-unclassified"))


def unclassified_reason(ds):
    """The reason a report says its image was not classified, or None (a report of findings)."""
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == \
                QUALITATIVE_EVALUATIONS.value:
            for child in item.get("ContentSequence", []):
                if child.ConceptNameCodeSequence[0].CodeValue == REASON.value:
                    return str(child.TextValue)
    return None


def _source_image(source):
    # by its UIDs only (highdicom's from_source_image also asks for the pixel description)
    return hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)


def _tracking_uid(source, name, identity, uid_root):
    return result_uid(source.SOPInstanceUID, identity["sha256"], f"finding-{name}", uid_root)


def _sr_document(source, content, identity, uid_root, what="sr"):
    """A Comprehensive 3D SR in the source's study (patient and study copied by highdicom)."""
    digest = identity["sha256"]
    document = hd.sr.Comprehensive3DSR(
        evidence=[source], content=content,
        specific_character_set=result_charset(source, identity["classes"]),
        series_instance_uid=result_uid(source.StudyInstanceUID, digest, "sr-series", uid_root),
        series_number=9001, sop_instance_uid=result_uid(source.SOPInstanceUID, digest, what,
                                                        uid_root),
        instance_number=1, manufacturer="CheXNet toolkit", is_complete=True,
        series_description="CheXNet AI findings - research use only", software_versions=VERSION)
    document.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
    return document


def coding_scheme_identification():
    """The item naming this project's private coding scheme (PS3.3 C.12.1.1.2.1: a private
    scheme is identified in the objects that use its codes)."""
    scheme = pydicom.Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "CheXNet toolkit chest X-ray findings (docs/serve.md)"
    scheme.CodingSchemeResponsibleOrganization = "CheXNet toolkit"
    return scheme


def build_sr(source, findings, identity, points_note, uid_root):
    """The report, every part of it built by highdicom (ReportWriter's reference)."""
    return encode_file(_sr_document(
        source, sr_content(source, findings, identity, points_note, uid_root), identity,
        uid_root))


def read_sr(ds):
    """{class name: (probability, calibrated or None, threshold or None, 'Present'/'Absent' or
    None)} and the source image's SOP Instance UID, read back by highdicom's own TID 1500
    reader (what another system reading the report gets)."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    report = sr.content
    out, source = {}, None
    for group in report.get_image_measurement_groups():
        name = group.tracking_identifier
        values = {"raw": None, "calibrated": None, "threshold": None}
        for m in group.get_measurements():
            method = m.method.meaning if m.method is not None else None
            if m.name == codes.DCM.ThresholdValue:
                values["threshold"] = m.value
            else:
                values["calibrated" if method == CALIBRATED.meaning else "raw"] = m.value
        decisions = group.get_qualitative_evaluations()
        decision = decisions[0].value.meaning if decisions else None
        source = group.source_images[0].referenced_sop_instance_uid
        out[name] = (values["raw"], values["calibrated"], values["threshold"], decision)
    return out, source


CONTENT_SEQUENCE = 0x0040A730  # (0040,A730): the report's content tree


def _head(document):
    """The document's encoding without its content tree (removed from it), None where an
    element follows the tree (then the tree's bytes cannot simply follow the rest)."""
    del document.ContentSequence
    return None if max(document.keys()) > CONTENT_SEQUENCE else encode_file(document)


class ReportWriter:
    """build_sr's report (the same elements and values) in a fraction of its time.

    highdicom builds and checks every content item, copies the tree twice and pydicom encodes
    it element by element: 0.1-0.5 s of Python per report on this CPU, the node's largest cost
    per image after inference. Every report of one model has the same content tree but for the
    source image's references, the findings' tracking UIDs and the values, so the tree is built
    once by highdicom (sr_content) with a distinct stand-in in every place that changes, and
    encoded once (a template) with its sequences and items of undefined length (PS3.5 7.5.2:
    delimited, so a value of another length changes no length around it). A report is then
    highdicom's document for this source (patient, study, evidence; the content tree is its
    last element) followed by the template's bytes with this image's values, each encoded by
    pydicom. Findings of another shape (a threshold or calibration more or less) or another
    character set get their own template; a template whose stand-ins are not each found is
    not used (build_sr is)."""
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
            (row["finding"], row["decision"] is None,
             row.get("calibrated_probability") is not None) for row in findings))
        with self.lock:
            template = self.templates.get(key)
        if template is None:
            template = self._template(source, findings)
            with self.lock:
                if len(self.templates) >= self.MAX_TEMPLATES:
                    self.templates.clear()
                self.templates[key] = template
        head = template and _head(_sr_document(source, _least_report(source), self.identity,
                                               self.uid_root))
        if not head:
            return build_sr(source, findings, self.identity, self.points_note, self.uid_root)
        parts = [head]
        for chunk, slot in template:
            parts.append(chunk)
            if slot is not None:
                parts.append(self._slot(slot, source, findings))
        return b"".join(parts)

    def _slot(self, slot, source, findings):
        """The encoded elements of one place that changes (pydicom's encoding, by hand: a
        report has some 80 of them, and pydicom takes 0.2 ms for each)."""
        what, k = slot
        if what == "decision":
            return self.decisions[findings[k]["decision"]]
        if what == "image":
            return (_explicit(0x00081150, "UI", _uid(source.SOPClassUID))
                    + _explicit(0x00081155, "UI", _uid(source.SOPInstanceUID)))
        if what == "tracking":
            return _explicit(0x0040A124, "UI", _uid(_tracking_uid(
                source, findings[k]["finding"], self.identity, self.uid_root)))
        value = float(findings[k][what])  # a NUM item's value, as highdicom writes a float
        number = str(DS(value, auto_format=True)).encode()
        return (_explicit(0x0040A161, "FD", struct.pack("<d", value))
                + _explicit(0x0040A30A, "DS", number + b" " * (len(number) % 2)))

    def _template(self, source, findings):
        """[(bytes, slot or None)] of the encoded content tree; [] where it cannot be."""
        stand_in = iter(range(7, 10 ** 6))  # n / 3 > 2: never a probability or threshold
        rows = []
        for row in findings:
            row = dict(row, probability=next(stand_in) / 3)
            if row.get("calibrated_probability") is not None:
                row["calibrated_probability"] = next(stand_in) / 3
            if row["decision"] is not None:
                row.update(decision="positive", threshold=next(stand_in) / 3)
            rows.append(row)
        document = _sr_document(source, sr_content(source, rows, self.identity,
                                                   self.points_note, self.uid_root),
                                self.identity, self.uid_root)
        _undefined_lengths(document["ContentSequence"])
        whole = encode_file(document)
        head = _head(document)
        content = whole[len(head or b""):]
        if head is None or not content.startswith(b"\x40\x00\x30\xa7SQ"):
            log.warning("report template not usable (the content tree is not the document's "
                        "last element): every report is built by highdicom")
            return []
        found = []  # (offset, length, slot): where each value of this image lies
        for k, row in enumerate(rows):
            for what in ("tracking", "probability", "calibrated_probability", "threshold"):
                if (what == "calibrated_probability" and row.get(what) is None
                        or what == "threshold" and row["decision"] is None):
                    continue  # as sr_content: no threshold without a decision
                encoded = self._slot((what, k), source, rows)
                hits = _offsets(content, encoded)
                if len(hits) != 1:
                    return _unusable(f"{what} of finding {k}")
                found.append((hits[0], len(encoded), (what, k)))
        decided = [k for k, row in enumerate(rows) if row["decision"] is not None]
        hits = _offsets(content, self.decisions["positive"])
        if len(hits) != len(decided):  # in the groups' order
            return _unusable("the decisions")
        found += [(at, len(self.decisions["positive"]), ("decision", k))
                  for at, k in zip(hits, decided)]
        encoded = self._slot(("image", 0), source, rows)
        hits = _offsets(content, encoded)
        if len(hits) != len(rows):  # each group's source image
            return _unusable("the source image")
        found += [(at, len(encoded), ("image", 0)) for at in hits]
        template, at = [], 0
        for offset, length, slot in sorted(found):
            if offset < at:
                return _unusable(f"{slot[0]} of finding {slot[1]}")
            template.append((content[at:offset], slot))
            at = offset + length
        template.append((content[at:], None))
        return template


def _least_report(source):
    """The least content tree whose document's elements outside the tree are every report's:
    the root (title, TID 1500) referencing the source, as every report does."""
    root = hd.sr.ContainerContentItem(codes.DCM.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = [_source_image(source)]
    return root


def _offsets(content, encoded):
    """Every offset of `encoded` in `content`, left to right, none overlapping."""
    offsets, at = [], 0
    while (at := content.find(encoded, at)) >= 0:
        offsets.append(at)
        at += len(encoded)
    return offsets


def _unusable(what):
    log.warning("report template not usable (%s): every report is built by highdicom", what)
    return []


def _undefined_lengths(sequence):
    sequence.is_undefined_length = True
    for item in sequence.value:
        item.is_undefined_length_sequence_item = True
        for element in item:
            if element.VR == "SQ":
                _undefined_lengths(element)


def _explicit(tag, vr, value):
    """One element in Explicit VR Little Endian, of a VR with a 2-byte length."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _uid(uid):
    value = str(uid).encode()
    return value + b"\0" * (len(value) % 2)


def _elements(ds):
    """The encoding of ds's elements, as in the reports (Explicit VR Little Endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()
