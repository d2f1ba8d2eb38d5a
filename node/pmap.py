"""--parametric-maps: beside each positive finding's secondary-capture heatmap, a DICOM
Parametric Map (highdicom) of the same class activation map as numbers, on the source image's
own pixel grid, which a viewer can lay over the X-ray in a colour map and opacity of its own
(the secondary capture has the X-ray and the colours burnt in).

What it holds (docs/serve.md, "The parametric map"):
- the values: the map the heatmap's colours were made from (cam.tencrop_heatmap, normalised by
  cam.normalise: 0 where the model put the least weight, 1 the most), scaled to the image's
  rows x columns, in [0, 1]. Stored as 16-bit unsigned integers, value / 65535, which the Real
  World Value Mapping says (no units; the quantity a class activation, of the finding coded as
  the report codes it): the Parametric Map IOD takes integer pixels of 16 bits only (dciodvfy
  refuses 8), a step of 1.5e-5 is far finer than the map (7x7 per 224-pixel crop; the heatmap
  shows 256 colours), half the size of 32-bit floats (2 MB for a 1024x1024 image, not 4), and
  integer pixel data is what every viewer and PACS decodes, Float Pixel Data not.
- the geometry: a chest radiograph is a projection. It has no plane in the patient (no Image
  Position or Orientation (Patient)), often no Frame of Reference, and may have a pixel
  spacing only at the detector (Imager Pixel Spacing). The map claims no more than the source
  does: its Plane Position and Plane Orientation items are empty (the standard requires them
  only of ORIGINAL frames; a map's frame is DERIVED), Pixel Spacing is the source's own where it
  has one (never Imager Pixel Spacing, which is not a distance in the patient), and the map
  lies pixel for pixel on the source: same rows and columns, referenced by its Derivation
  Image Sequence with Spatial Locations Preserved YES. The Frame of Reference is the source's;
  a source without one (the Parametric Map IOD requires the module) gets one derived from its
  SOP Instance UID, which names the source's pixel grid and nothing more (Position Reference
  Indicator empty).
"""
import numpy as np
import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import format_number_as_ds

from node.dicom import UID_RE, VERSION, encode_file
from node.results import result_charset, result_uid, source_laterality
from node.sr import PRIVATE_SCHEME, coding_scheme_identification, finding_code

SCALE = 65535  # stored value / SCALE = the map's value in [0, 1]
CAM = Code("CAM", PRIVATE_SCHEME, "Class activation map")
FRAME_LABEL = 0x00209453
# What the copy of the source that highdicom builds from leaves out: geometry it would take
# for a plane in the patient (a projection image has none; a value here, hostile or not,
# would make highdicom fail or claim one)
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
            "SpacingBetweenSlices", "ImageOrientationSlide", "ImageCenterPointCoordinatesSequence",
            "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
            "NumberOfFrames", "FrameOfReferenceUID", "PositionReferenceIndicator")


class _ProjectionMap(hd.pm.ParametricMap):
    """highdicom's Parametric Map of a source without a plane in the patient. highdicom (0.28)
    indexes such a map's one frame by Frame Label but gives the frame neither a label nor an
    index value, then fails reading its own frames back ('Unexpected mismatch between dimension
    index values...'): the frame gets both here, before that reading. Does nothing where
    highdicom gave them."""

    def _build_luts(self):
        pointers = [item.DimensionIndexPointer for item in self.get("DimensionIndexSequence", [])]
        content = self.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0]
        if pointers == [FRAME_LABEL] and not content.get("DimensionIndexValues"):
            content.DimensionIndexValues = [1]
            content.FrameLabel = "class activation map"
        super()._build_luts()


def map_values(heat, shape):
    """A finding's map as the parametric map holds it, (H, W) float32 in [0, 1]: the ten crops'
    map (cam.tencrop_heatmap, at the resized image's size) normalised and scaled to the image's
    `shape` in the order the heatmap's colours are (cam.blend_jet): normalised, then scaled up
    (bilinear, as floats); a map larger than the image is scaled down first."""
    from cam import normalise, resize_maps
    heat = np.asarray(heat, np.float32)
    shape = tuple(shape)
    if heat.shape[0] > shape[0] or heat.shape[1] > shape[1]:
        values = normalise(resize_maps(heat[None], shape)[0])
    else:
        values = normalise(heat)
        if values.shape != shape:
            values = resize_maps(values[None], shape)[0]
    return np.clip(values, 0.0, 1.0).astype(np.float32)


def stored_values(values):
    """[0, 1] -> the map's 16-bit stored values (value x 65535, rounded)."""
    return np.round(np.clip(values, 0.0, 1.0) * SCALE).astype(np.uint16)


def _frame_of_reference(source, uid_root):
    """(Frame of Reference UID, Position Reference Indicator) of the maps of `source`: the
    source's, else one derived from its SOP Instance UID (the same for every map of the image,
    whichever model) with the indicator empty: no geometry claimed."""
    value = source.get("FrameOfReferenceUID")
    # the standard's UID (no leading zero in a component), which the node's receive check,
    # lenient with what modalities write, does not ask of a source
    if isinstance(value, str) and len(value) <= 64 and UID_RE.match(value) and not any(
            len(part) > 1 and part.startswith("0") for part in value.split(".")):
        indicator = source.get("PositionReferenceIndicator")
        valid = isinstance(indicator, str) and len(indicator) <= 64 and "\\" not in indicator \
            and indicator.isprintable()
        return value, indicator if valid else ""
    return result_uid(str(source.SOPInstanceUID), "", "frame-of-reference", uid_root), ""


def _pixel_spacing(source):
    """The source's Pixel Spacing (row, column; mm in the patient) where it holds two positive
    numbers, else None (a DX's Imager Pixel Spacing is at the detector: never taken for it)."""
    try:
        spacing = [float(v) for v in source.get("PixelSpacing") or []]
    except (TypeError, ValueError):
        return None
    if len(spacing) != 2 or not all(0 < v < 1e4 for v in spacing):
        return None
    # as DS allows them (16 characters): a float32's digits, 0.1868000030517578, are 18
    return [format_number_as_ds(v) for v in spacing]


def build_parametric_maps(source, maps, identity, uid_root):
    """Parametric Maps of one image's findings, maps [(k, (H, W) float values in [0, 1])],
    each in the source's study, in a series of the image's own (one per source and model: a
    series holds one Frame of Reference), on the source's pixel grid. Yields (k, the encoded
    file), built one at a time."""
    digest = identity["sha256"]
    frame_of_reference, indicator = _frame_of_reference(source, uid_root)
    reference = pydicom.Dataset()  # the source as highdicom builds from it (GEOMETRY left out)
    for element in source:
        if element.keyword not in GEOMETRY:
            reference.add(element)
    reference.FrameOfReferenceUID = frame_of_reference
    reference.PositionReferenceIndicator = indicator
    series = result_uid(str(source.SOPInstanceUID), digest, "pm-series", uid_root)
    spacing = _pixel_spacing(source)
    for k, values in maps:
        name = identity["classes"][k]
        mapping = hd.pm.RealWorldValueMapping(
            lut_label="CAM", lut_explanation="class activation map, 0 (least) to 1 (most weight)",
            unit=codes.UCUM.NoUnits, value_range=(0, SCALE), slope=1 / SCALE, intercept=0,
            quantity_definition=CAM)
        # which finding: the report's code for it (node/sr.py), as the SR's Finding
        mapping.QuantityDefinitionSequence.append(hd.sr.CodeContentItem(
            name=codes.DCM.Finding, value=finding_code(name)))
        pm = _ProjectionMap(
            source_images=[reference], pixel_array=stored_values(values),
            series_instance_uid=series, series_number=9003,
            sop_instance_uid=result_uid(str(source.SOPInstanceUID), digest, f"pm-{name}",
                                        uid_root),
            instance_number=k + 1, manufacturer="CheXNet toolkit",
            manufacturer_model_name=identity["name"][:64], software_versions=VERSION,
            device_serial_number=digest[:64], contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=SCALE / 2 + 0.5,
                                                             window_width=SCALE + 1)],
            content_label="CAM", content_description=f"{name} CAM"[:64],
            content_qualification=hd.ContentQualificationValues.RESEARCH,
            specific_character_set=result_charset(source, identity["classes"]),
            series_description="CheXNet class activation maps - research use only")
        _projection_geometry(pm, spacing, name)
        source_laterality(pm, source)
        if "Laterality" in pm:  # Frame Laterality (U) says it: General Series' must be absent
            del pm.Laterality
        # The source's orientation where it names one: the map lies on its pixels
        orientation = [str(v) for v in (source.get("PatientOrientation") or [])]
        if len(orientation) == 2 and all(v in ("A", "P", "L", "R", "H", "F") for v in orientation):
            pm.PatientOrientation = orientation
        pm.ImageComments = "; ".join(filter(None, [
            f"{name}: class activation map, 0-1", "research use only, not for diagnosis",
            identity.get("notice")]))
        pm.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
        yield k, encode_file(pm)


def _projection_geometry(pm, spacing, name):
    """The functional groups the Parametric Map IOD requires of every map, holding no more
    than a projection image knows (this module's docstring): Pixel Measures (the source's Pixel
    Spacing, or empty), Plane Position and Plane Orientation (Patient) empty, their values
    being required only of ORIGINAL frames; the anatomy (the chest: the node classifies chest
    X-rays only; laterality U, unpaired); the frame labelled with the finding."""
    shared = pm.SharedFunctionalGroupsSequence[0]
    if "PlanePositionSequence" in pm.PerFrameFunctionalGroupsSequence[0] \
            or "PlaneOrientationSequence" in shared:  # highdicom found a plane: never here
        raise ValueError("the source image has a plane in the patient")
    measures = pydicom.Dataset()
    if spacing is not None:
        measures.PixelSpacing = spacing
    shared.PixelMeasuresSequence = [measures]
    shared.PlanePositionSequence = [pydicom.Dataset()]
    shared.PlaneOrientationSequence = [pydicom.Dataset()]
    anatomy = pydicom.Dataset()
    anatomy.FrameLaterality = "U"
    anatomy.AnatomicRegionSequence = [hd.sr.CodedConcept.from_code(codes.SCT.Chest)]
    shared.FrameAnatomySequence = [anatomy]
    content = pm.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0]
    if "FrameLabel" in content:
        content.FrameLabel = name
