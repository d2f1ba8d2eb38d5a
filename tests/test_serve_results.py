"""serve.py's results beyond the report and heatmaps: --parametric-maps' DICOM Parametric Maps
(node/pmap.py). The builder alone (unit), then the node with real parts as tests/test_serve.py
runs it (its fixtures: Orthanc on 127.0.0.1, DCMTK's storescu, the small exported model with
operating points, DX files of NIH images), results read back through Orthanc's REST API."""
import io
import json
import sys

import numpy as np
import pytest

from conftest import REPO, assert_clean_error, run_script
from dicom_files import dicom_errors, dx_file
from test_serve import (SC_CLASS, SR_CLASS, NodeProcess, all_sent, destination, need, storescu,
                        uid_of, wait_for)
from test_serve import dx_files, model_dir, orthanc, pacs  # noqa: F401 (fixtures)

PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # serve.py's default --uid-root
# The maps' values are stored as round(value x 65535): what a reader gets back is the value
# to half a step (7.6e-6), plus float32 rounding of the value itself
TOLERANCE = 1e-5


def real_values(ds):
    """A Parametric Map's values as its Real World Value Mapping gives them, (rows, columns)
    float64 (highdicom reads the object)."""
    import highdicom as hd
    pm = hd.pm.ParametricMap.from_dataset(ds)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert (mapping.RealWorldValueFirstValueMapped, mapping.RealWorldValueLastValueMapped) == \
        (0, 65535)
    return (np.asarray(pm.pixel_array, np.float64).reshape(ds.Rows, ds.Columns)
            * mapping.RealWorldValueSlope + mapping.RealWorldValueIntercept)


def quantities(ds):
    """{concept name meaning: the coded value} of a map's Quantity Definition Sequence."""
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    return {item.ConceptNameCodeSequence[0].CodeMeaning: (
        item.ConceptCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodingSchemeDesignator,
        item.ConceptCodeSequence[0].CodeMeaning) for item in mapping.QuantityDefinitionSequence}


def source_reference(ds):
    """The SOP Instance UID the map's frame says it was derived from, and whether its pixels
    are the source's (Spatial Locations Preserved)."""
    frame = ds.PerFrameFunctionalGroupsSequence[0]
    item = frame.DerivationImageSequence[0].SourceImageSequence[0]
    return str(item.ReferencedSOPInstanceUID), item.get("SpatialLocationsPreserved")


# ---------------------------------------------------------------------------------------------
# The builder

def test_map_values_are_the_heatmap_s_map_on_the_image_s_grid():
    """map_values: the ten crops' map normalised to [0, 1] (its lowest 0, its highest 1) and
    scaled to the image's rows x columns, neither transposed nor flipped (a peak in a non-square
    map lands where it was, scaled), in the heatmap's order (normalised, then scaled up); a
    map larger than the image is scaled down first."""
    sys.path.insert(0, str(REPO))
    from cam import normalise, resize_maps
    from node.pmap import map_values, stored_values
    heat = np.zeros((64, 80), np.float32) - 3.0
    heat[10, 60] = 5.0  # a peak at row 10 of 64, column 60 of 80
    values = map_values(heat, (640, 1200))
    assert values.shape == (640, 1200) and values.dtype == np.float32
    assert values.min() == 0.0 and values.max() <= 1.0
    row, column = np.unravel_index(np.argmax(values), values.shape)
    assert abs(row - 10.5 * 10) <= 10 and abs(column - 60.5 * 15) <= 15
    np.testing.assert_array_equal(values, np.clip(resize_maps(normalise(heat)[None],
                                                              (640, 1200))[0], 0, 1))
    small = map_values(heat, (32, 40))  # a source smaller than the map
    assert small.shape == (32, 40) and small.min() == 0.0 and small.max() == 1.0
    flat = map_values(np.full((8, 8), 0.3, np.float32), (16, 16))
    assert not flat.any()  # a constant map is all zeros, as its heatmap's colours
    assert stored_values(np.array([0.0, 0.5, 1.0, 1.2, -0.1])).tolist() == [0, 32768, 65535,
                                                                          65535, 0]


def test_a_parametric_map_holds_the_values_on_the_source_s_grid_and_claims_no_geometry(
        tmp_path):
    """build_parametric_maps: one map per finding given, each in the source's study, in a
    series of the source's own, referencing it pixel for pixel, its values to 1e-5 through the
    Real World Value Mapping, its finding coded as the report codes it, research use said.
    Geometry: the source's Frame of Reference, or one derived from the source's UID (the same
    for every map of the image); its Pixel Spacing, never Imager Pixel Spacing; never a plane
    position or orientation, even where the source (wrongly) has one. UIDs derive from the
    source, the model and the finding: built again, the same."""
    import pydicom
    from pydicom.uid import generate_uid

    from node.pmap import build_parametric_maps
    from node.results import result_uid, with_type2
    from node.sr import finding_code
    png = sorted((REPO / "sample" / "images").glob("*.png"))[0]
    path = dx_file(png, tmp_path / "dx.dcm", generate_uid(), generate_uid(), 1)
    source = with_type2(pydicom.dcmread(path, stop_before_pixels=True))
    identity = {"sha256": "ab" * 32, "name": "CheXNet test", "notice": "a notice",
                "classes": ["Atelectasis", "Cardiomegaly", "Nodule", "Épanchement"]}
    rng = np.random.default_rng(0)
    shape = (source.Rows, source.Columns)
    values = {k: rng.random(shape).astype(np.float32) for k in (1, 3)}

    def build(src):
        return [(k, pydicom.dcmread(io.BytesIO(data)))
                for k, data in build_parametric_maps(src, list(values.items()), identity,
                                                     UID_ROOT)]

    maps = build(source)
    assert [k for k, _ in maps] == [1, 3]
    uid = str(source.SOPInstanceUID)
    for k, pm in maps:
        name = identity["classes"][k]
        assert pm.SOPClassUID == PM_CLASS
        assert pm.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # Explicit VR LE
        assert pm.StudyInstanceUID == source.StudyInstanceUID and pm.PatientID == source.PatientID
        assert pm.SOPInstanceUID == result_uid(uid, "ab" * 32, f"pm-{name}", UID_ROOT)
        assert pm.SeriesInstanceUID == result_uid(uid, "ab" * 32, "pm-series", UID_ROOT)
        assert source_reference(pm) == (uid, "YES")
        assert (pm.Rows, pm.Columns, pm.NumberOfFrames, pm.BitsAllocated) == (*shape, 1, 16)
        assert np.abs(real_values(pm) - values[k]).max() <= TOLERANCE
        code = finding_code(name)
        assert quantities(pm) == {"Quantity": ("CAM", "99CHEXNET", "Class activation map"),
                                  "Finding": (code.value, code.scheme_designator, code.meaning)}
        assert pm.ContentQualification == "RESEARCH" and pm.ImageType[0] == "DERIVED"
        assert "research use only" in pm.ImageComments and "a notice" in pm.ImageComments
        assert "research use only" in pm.SeriesDescription
        assert pm.PatientOrientation == ["L", "F"]  # the source's: the map is on its pixels
        # no Frame of Reference in the source: one of its own, derived from the source's UID
        assert pm.FrameOfReferenceUID == result_uid(uid, "", "frame-of-reference", UID_ROOT)
        assert pm.PositionReferenceIndicator == ""
        shared = pm.SharedFunctionalGroupsSequence[0]
        assert "PixelSpacing" not in shared.PixelMeasuresSequence[0]
        assert len(shared.PlanePositionSequence[0]) == 0
        assert len(shared.PlaneOrientationSequence[0]) == 0
        assert "PlanePositionSequence" not in pm.PerFrameFunctionalGroupsSequence[0]
    assert [pm.SOPInstanceUID for _, pm in build(source)] == [pm.SOPInstanceUID for _, pm in maps]

    # A source with a Frame of Reference and a calibrated Pixel Spacing keeps both; Imager
    # Pixel Spacing (at the detector) is never taken for it; a plane position the source should
    # not have is not taken either
    framed = with_type2(pydicom.dcmread(path, stop_before_pixels=True))
    framed.FrameOfReferenceUID, framed.PositionReferenceIndicator = "1.2.3.4.5", "XY"
    framed.PixelSpacing, framed.ImagerPixelSpacing = [0.139, 0.14], [0.15, 0.15]
    framed.ImagePositionPatient = [1, 2, 3]
    _, pm = build(framed)[0]
    assert (pm.FrameOfReferenceUID, pm.PositionReferenceIndicator) == ("1.2.3.4.5", "XY")
    shared = pm.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.139, 0.14]
    assert len(shared.PlanePositionSequence[0]) == 0 and "ImagePositionPatient" not in pm
    # a source's Frame of Reference UID the standard does not allow (a leading zero) is not
    # copied, nor an indicator with control characters: each map would be invalid
    framed.FrameOfReferenceUID, framed.PositionReferenceIndicator = "1.2.03.4", "XY"
    _, pm = build(framed)[0]
    assert pm.FrameOfReferenceUID == result_uid(uid, "", "frame-of-reference", UID_ROOT)
    framed.FrameOfReferenceUID, framed.PositionReferenceIndicator = "1.2.3.4.5", "XY\x1b\x07"
    _, pm = build(framed)[0]
    assert (pm.FrameOfReferenceUID, pm.PositionReferenceIndicator) == ("1.2.3.4.5", "")
    # a float32's spacing (18 digits) fits DS's 16; no body part: no empty Laterality beside
    # the Frame Laterality (dciodvfy: present when the condition is unsatisfied)
    framed.PixelSpacing = ["0.1868000030517578", "0.1868000030517578"]
    del framed.BodyPartExamined
    _, pm = build(framed)[0]
    spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert all(len(str(v)) <= 16 for v in spacing) and abs(float(spacing[0]) - 0.1868) < 1e-6
    assert "Laterality" not in pm
    detector_only = with_type2(pydicom.dcmread(path, stop_before_pixels=True))
    detector_only.ImagerPixelSpacing = [0.15, 0.15]
    detector_only.PixelSpacing = [0, 0.1]  # not a spacing: left out
    _, pm = build(detector_only)[0]
    assert "PixelSpacing" not in pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]


@pytest.mark.integration
def test_parametric_maps_need_heatmaps():
    """--parametric-maps with --no-heatmaps: one line naming the flag, before anything."""
    assert_clean_error(run_script("serve.py", "--spool", "spool-unused", "--allow-any-ae",
                                  "--destination", "PACS@127.0.0.1:104", "--no-heatmaps",
                                  "--parametric-maps"), "--parametric-maps")


# ---------------------------------------------------------------------------------------------
# The node, with real parts

_BACKENDS = {}


def node_values(model_dir, path, positive):
    """{k: the values the node's map of positive finding k of the image file holds, (H, W)},
    computed as the node computes them: the exported model's ten-crop maps of the file
    (backends.load_openvino, as node/pipeline.py runs it), over the image (cam.tencrop_heatmap,
    node/workers.py's _heat), scaled to its pixels (node/pmap.py's map_values)."""
    sys.path.insert(0, str(REPO))
    from backends import data_defaults, load_openvino, read_metadata
    from cam import tencrop_heatmap
    from images import TEN_CROPS, eval_input, load_gray, shorter_to
    from node.pmap import map_values
    meta = read_metadata(model_dir)
    data = data_defaults(meta)
    if str(model_dir) not in _BACKENDS:  # compiled once
        _BACKENDS[str(model_dir)] = load_openvino(model_dir, "int8", meta, data.crop_size)
    backend = _BACKENDS[str(model_dir)]
    out = {}
    backend.run_all([(0, eval_input(path, data.resize, data.crop_size))],
                    lambda key, result: out.update(maps=result[1]), cams=True)
    gray = np.asarray(load_gray(path))
    heat = tencrop_heatmap(out["maps"][:TEN_CROPS][:, positive],
                           shorter_to(gray.shape[::-1], data.resize)[::-1], data.crop_size)
    return {k: map_values(heat[j], gray.shape) for j, k in enumerate(positive)}


def positives(spool, path):
    """(finding index, name) of the image's positive findings, by the node's done/ record."""
    record = json.loads((spool / "done" / f"{uid_of(path)}.json").read_text())
    return record, [(k, row["finding"]) for k, row in enumerate(record["findings"])
                    if row["decision"] == "positive"]


def by_class(pacs, modality, sop_class):
    return [ds for ds in pacs.instances(modality) if ds.SOPClassUID == sop_class]


@pytest.mark.system
def test_parametric_maps_reach_the_pacs_on_the_source_s_pixels(model_dir, dx_files, pacs,
                                                               tmp_path):
    """storescu -> node -> Orthanc. Without --parametric-maps none is made. With it, each
    positive finding of each image has one Parametric Map at the PACS besides its heatmap: in
    the image's study, referencing the image, its rows and columns, its finding coded as the
    report codes it, and values equal (to 1e-5, the 16-bit step) to the class activation map
    the node computed for that finding, computed here again from the file; dciodvfy reports no
    error in it."""
    import pydicom

    from node.results import result_uid
    from node.sr import finding_code
    plain = tmp_path / "plain"
    node = NodeProcess(model_dir, plain, pacs)
    try:
        assert storescu(dx_files[:1], node.port).returncode == 0
        wait_for(lambda: all_sent(plain, 1), 120, "the results without maps sent")
        _, found = positives(plain, dx_files[0])
        assert len(pacs.instances("SR")) == 1
        assert len(by_class(pacs, "OT", SC_CLASS)) == len(found)
        assert by_class(pacs, "OT", PM_CLASS) == []
    finally:
        node.stop()

    spool = tmp_path / "spool"
    node = NodeProcess(model_dir, spool, pacs, "--parametric-maps")
    try:
        files = dx_files[1:4]
        assert storescu(files, node.port).returncode == 0
        wait_for(lambda: all_sent(spool, 3), 180, "every result sent")
        maps = {str(ds.SOPInstanceUID): ds for ds in by_class(pacs, "OT", PM_CLASS)}
        expected, checked = set(), None
        for path in files:
            source = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(source.SOPInstanceUID)
            record, found = positives(spool, path)
            assert record["results"] == ["0-sr.dcm", *(f"1-sc-{k:02d}.dcm" for k, _ in found),
                                         *(f"2-pm-{k:02d}.dcm" for k, _ in found)]
            values = node_values(model_dir, path, [k for k, _ in found])
            for k, name in found:
                pm_uid = result_uid(uid, record["model"], f"pm-{name}", UID_ROOT)
                expected.add(pm_uid)
                pm = maps[pm_uid]
                assert pm.StudyInstanceUID == source.StudyInstanceUID
                assert pm.PatientID == source.PatientID
                assert source_reference(pm) == (uid, "YES")
                assert (pm.Rows, pm.Columns) == (source.Rows, source.Columns)
                code = finding_code(name)
                assert quantities(pm)["Finding"] == (code.value, code.scheme_designator,
                                                     code.meaning)
                assert pm.ContentQualification == "RESEARCH"
                difference = np.abs(real_values(pm) - values[k]).max()
                assert difference <= TOLERANCE, (name, difference)
                assert values[k].max() > 0.99 and values[k].min() < 0.01  # not flat
                checked = pm
        assert expected and set(maps) == expected  # one per positive finding, no other
        assert dicom_errors(need("dciodvfy"), checked, tmp_path / "pm.dcm") == []
        assert "parametric maps not built" not in node.text()
        assert "Traceback" not in node.text()
    finally:
        node.stop()


@pytest.mark.system
def test_a_destination_without_parametric_map_still_gets_reports_and_heatmaps(model_dir,
                                                                            dx_files,
                                                                            tmp_path):
    """A destination that stores reports and Secondary Captures but no Parametric Map: every
    report and heatmap arrives; the log says once that parametric maps cannot be sent; they
    (and only they) go to failed/ after their refusals; the outbox empties."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
    stored = []
    no_maps, fake = destination(
        {SR_CLASS: [ExplicitVRLittleEndian], SC_CLASS: [JPEGBaseline8Bit, ExplicitVRLittleEndian]},
        lambda event: stored.append(event.request.AffectedSOPClassUID) or 0x0000)
    spool = tmp_path / "spool"
    node = NodeProcess(model_dir, spool, fake, "--parametric-maps")
    try:
        files = dx_files[4:6]
        assert storescu(files, node.port).returncode == 0
        found = {}
        wait_for(lambda: len(list((spool / "done").glob("*.json"))) == 2, 120, "both classified")
        for path in files:
            found[uid_of(path)] = [k for k, _ in positives(spool, path)[1]]
        n_maps = sum(map(len, found.values()))
        assert n_maps > 0, "no positive finding: choose other images"
        wait_for(lambda: not any((spool / "outbox").iterdir()), 120, "the outbox emptied")
        assert stored.count(SR_CLASS) == 2 and stored.count(SC_CLASS) == n_maps
        assert PM_CLASS not in stored
        failed = sorted(p.name for p in (spool / "failed").glob("*/*"))
        assert failed == sorted(f"2-pm-{k:02d}.dcm" for ks in found.values() for k in ks)
        assert node.text().count("accepts no Parametric Map") == 1
        assert node.proc.poll() is None
    finally:
        node.stop()
        no_maps.shutdown()
