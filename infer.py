"""CheXNet evaluation and inference: PyTorch (CPU, CUDA, Gaudi; every device under torchrun),
OpenVINO FP32 or OpenVINO INT8.

    python infer.py --mode int8                      # ten-crop evaluation on the test split
    python infer.py --mode torch --device cuda       # PyTorch on a GPU, batched
    torchrun --nproc_per_node=8 infer.py --mode torch  # every GPU, rank 0 gathers and writes
    python infer.py --image a.png b.png              # the 14 probabilities of each image
    python infer.py --export --checkpoint runs/chexnet/best.pt   # what infer.sh runs

Evaluation follows the CheXNet protocol: Resize(256) -> TenCrop(224) -> ImageNet normalisation,
probabilities averaged over the 10 crops; per-disease ROC-AUC; predictions to a CSV, written in
chunks as they are made: the same command after a kill continues after the last complete chunk.
Crops come from the preprocessed store of --resize when there is one (the same pixels).
The OpenVINO modes import no torch: an edge box needs openvino, numpy, pillow, scikit-learn.
The models themselves (OpenVINO, PyTorch) and their batched prediction live in backends.py,
the chunks of predictions (Chunks, predict_in_chunks) in predictions.py.
"""
import hashlib
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from backends import (BACKEND_NAMES, METADATA, MODEL_NAMES, InferError, TorchModel,
                      TorchPredictor, data_defaults, export_id, file_digest, import_torch,
                      load_openvino, predict_openvino, read_metadata, torch_checkpoint)
from common import (ArgumentParser, DataError, SetupError, add_device_args, atomic_write_text,
                    check_writable_file, exclusive_lock, fraction, one_line, positive_int,
                    strict_json)
from dataset import add_data_args, check_data_dir, split_images
from images import TEN_CROPS, average_crops, eval_input, protocol_name
from labels import parse_class_map, shared_classes
from metrics import mean_auc, roc_aucs
from predictions import Chunks, predict_in_chunks
from report import add_report_args
from tables import detect_dataset
from subgroups import add_subgroup_args, demographics_for


def class_map(text):
    """--class-map (argparse type): labels.parse_class_map."""
    import argparse
    try:
        return parse_class_map(text)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Evaluation

def evaluation_suffix(part, trained_on, dataset):
    """'' for the test part of the data set the model was trained on; '_val' for val; and
    '_on_<dataset>' for another data set's evaluation (CheXpert for an NIH model...), whose
    predictions and operating points never replace those of the model's own data set.
    dataset: the kind of data set evaluated (Data.dataset); trained_on: the model's data
    directory."""
    elsewhere = isinstance(trained_on, str) and detect_dataset(trained_on) != dataset
    return ("" if part == "test" else f"_{part}"), (f"_on_{dataset}" if elsewhere else "")


def evaluate(args, data, trained_on, rt=None):
    """Predict every image of the chosen part of the split of `data` (splitting.Data: the data
    flags, the model's own where not given) in chunks, resumable, then report; trained_on:
    the data directory the model came from. Everything a report needs (classes, operating
    points) is checked before the first image."""
    is_main = rt is None or rt.is_main
    log = (lambda *a, **k: print(*a, **k)) if is_main else (lambda *a, **k: None)
    meta = read_metadata(args.model_dir)
    part_suffix, elsewhere = evaluation_suffix(args.part, trained_on, data.dataset)
    # named by what it holds: calibrated probabilities never replace the raw ones
    out_csv = Path(args.out_csv or Path(args.model_dir) /
                   f"predictions_{args.mode}{part_suffix}{elsewhere}"
                   f"{'_calibrated' if args.calibrated else ''}.csv")
    if is_main:
        check_writable_file(out_csv, "--out-csv")
    check_data_dir(data.data_dir, data.dataset)
    data = data.resolved()
    list_path, images = split_images(data, args.part, not args.no_store, args.skip_bad_images,
                                     args.limit, log)
    # read now: a bad demographics table stops here, before predicting
    demographics = (demographics_for(data.data_dir, args.no_subgroups, args.patients_table, log,
                                     data.dataset) if is_main else None)
    if args.mode == "torch":
        from runtime import autocast
        checkpoint = torch_checkpoint(args.checkpoint, meta)
        predictor = TorchPredictor(checkpoint, images, rt, data.crop_size, args.batch_size,
                                   args.workers, args.channels_last,
                                   lambda: autocast(rt.device.type, args.amp, args.amp_dtype))
        model_id = file_digest(checkpoint)
        model_classes = predictor.class_names
    else:
        backend = load_openvino(args.model_dir, args.mode, meta, data.crop_size,
                                args.images_per_request, args.streams)
        model_id = export_id(args.model_dir, args.mode)
        model_classes = backend.class_names

        def predictor(indices):
            return predict_openvino(backend, images, indices, data.crop_size,
                                    args.images_per_request, args.workers)

    columns = evaluated_classes(model_classes, images, list_path, args.class_map)
    if args.part == "val":  # its entry is chosen again; the file must take it
        from operating_points import read_operating_points
        read_operating_points(args.model_dir)
        points, why = None, None
    else:
        points, why = evaluation_points(args.model_dir, args.mode + elsewhere, args.mode,
                                        model_id, columns[2])
    if args.calibrated and points is None and args.part != "val":
        raise InferError(f"--calibrated: {why}")
    key = {"model": model_id, "mode": args.mode, "names": hashlib.sha256(
        "\n".join(images.names).encode()).hexdigest(), "resize": data.resize,
        "crop": data.crop_size, "chunk": args.chunk_size, "amp": args.amp and args.amp_dtype}
    with ExitStack() as stack:
        if is_main:  # one evaluation per predictions file: they would share its chunks
            stack.enter_context(exclusive_lock(out_csv.parent / f".{out_csv.name}.lock",
                                               "another evaluation", "use another --out-csv"))
        chunks = Chunks(out_csv, key, args.chunk_size, images.names, log) if is_main else None
        probs, readable, timing = predict_in_chunks(predictor, len(images), args.chunk_size,
                                                    chunks, rt, log)
        if not is_main:
            return None
        result = report_evaluation(args, data, out_csv, list_path, images, probs, readable,
                                   model_id, model_classes, columns, (points, why), elsewhere,
                                   timing, sample_notice(args, meta, trained_on), demographics)
        chunks.remove()
        return result


def evaluated_classes(model_classes, images, list_path, class_map):
    """(model columns, list columns, names): all of them when the model was trained on these
    classes; else the classes the model and the list share (another data set: by name, or
    through the mapping), named as the list names them."""
    if model_classes == images.class_names:
        every = list(range(len(model_classes)))
        return every, every, list(model_classes)
    pairs = shared_classes(model_classes, images.class_names, class_map)
    if not pairs:
        raise InferError(f"{list_path}: labels none of the model's classes "
                         f"({', '.join(model_classes[:4])}...); map them with --class-map "
                         "'MODEL NAME=LIST NAME,...'")
    return ([i for i, _ in pairs], [j for _, j in pairs],
            [images.class_names[j] for _, j in pairs])


def evaluation_points(model_dir, key, own_key, model_id, classes):
    """(the operating points chosen on val for this evaluation: those chosen on this data set,
    else the model's own if the classes fit; or None and why not). A damaged file is an error
    here, before any image is predicted."""
    from operating_points import operating_points_for
    points, why = operating_points_for(model_dir, key, model_id, classes)
    if points is None and key != own_key:
        points, why = operating_points_for(model_dir, own_key, model_id, classes)
    return points, why


def sample_notice(args, meta, trained_on):
    """{'notice': one line} when the model was trained on the bundled sample, else {}: the
    checkpoint's data directory (trained_on, for --mode torch --checkpoint), else the export's
    record of it (older exports: the directory they were exported with, trained_on)."""
    from common import SAMPLE_NOTICE, trained_on_sample
    trained = trained_on if args.mode == "torch" and args.checkpoint else meta.get(
        "trained_on", trained_on)
    return {"notice": SAMPLE_NOTICE} if trained_on_sample(trained) else {}


def report_evaluation(args, data, out_csv, list_path, images, probs, readable, model_id,
                      model_classes, columns, points_why, elsewhere, timing, notice=None,
                      demographics=None):
    """Score the predictions against the list's labels: on val, choose and save the operating
    points; write the predictions CSV and the report; print the summary. data: the evaluation's
    splitting.Data; notice: sample_notice's dict, carried into the report."""
    from predictions import write_predictions
    from operating_points import calibrate
    from report import (
        PROBABILITIES_SHORT,
        build_report,
        choose_operating_points,
        on_calibrated,
        platt_notes,
        save_operating_points,
        summary,
        write_report,
    )
    model_cols, list_cols, classes = columns
    points, why = points_why
    names = [nm for nm, ok in zip(images.names, readable) if ok]
    labels, probs = images.labels[readable][:, list_cols], probs[readable][:, model_cols]
    if not np.isfinite(probs).all():
        raise InferError(f"the model gives non-finite probabilities on {list_path}")
    notes = []
    if classes != model_classes:
        notes.append(f"note: {len(classes)} of the model's {len(model_classes)} classes are "
                     f"labelled in {list_path}: " + ", ".join(
                         model_classes[i] + ("" if model_classes[i] == c else f" = {c}")
                         for i, c in zip(model_cols, classes)))
    if args.part == "val":  # thresholds and calibration are chosen here, never on test
        chosen = choose_operating_points(labels, probs, model_id, list_path, classes,
                                         args.target_sensitivity)
        where = save_operating_points(args.model_dir, args.mode + elsewhere, chosen)
        notes += platt_notes(chosen)
        notes.append(f"operating points (thresholds by rule, Platt calibration) chosen on these "
                     f"{len(names)} val images: {where}")
        points = chosen if args.calibrated else None
    elif points is None:
        notes.append(f"note: {why}")
    elif args.calibrated:
        notes += platt_notes(points)
    # the report describes the probabilities written, raw or calibrated (then with the
    # thresholds mapped through the calibration: the same decisions)
    written = calibrate(probs, points) if args.calibrated else probs
    scored = points if args.part == "test" else None
    if scored is not None and args.calibrated:
        scored = on_calibrated(scored)
    protocol = (f"{protocol_name(data.resize, data.crop_size)}, "
                f"{BACKEND_NAMES[args.mode]}")
    context = dict(mode=args.mode, part=args.part, list=str(list_path), protocol=protocol,
                   **(notice or {}))
    split = Path(data.split)  # a folder of lists, resolved: report.py may run elsewhere
    write_predictions(out_csv, names, classes, written, source={
        **context, "made_by": "infer.py", "calibrated": bool(args.calibrated),
        "data_dir": str(Path(data.data_dir).resolve()),
        "split": str(split.resolve()) if split.is_dir() else str(data.split),
        "split_seed": data.split_seed, "keep_laterals": bool(data.keep_laterals),
        "model_dir": str(Path(args.model_dir).resolve()), "model": model_id,
        # the points themselves, as chosen (raw): a later --part val must not change them
        "operating_points": points if scored is not None else None,
        "no_subgroups": bool(args.no_subgroups),
        "patients_table": (str(Path(args.patients_table).resolve())
                           if args.patients_table else None)})
    report = build_report(names, labels, written, classes, scored, args.n_boot, args.boot_seed,
                          args.calibrated, predictions=str(out_csv), demographics=demographics,
                          made_by="infer.py", **context)
    skipped = len(images) - len(names)
    print(f"mode {args.mode}: {len(names)} {args.part} images of {list_path}, {protocol}"
          + (f" ({skipped} unreadable skipped)" if skipped else ""))
    print(summary(report))
    predicted, seconds = timing
    if predicted:
        print(f"throughput: {predicted / seconds:.1f} images/s, "
              f"{TEN_CROPS * predicted / seconds:.1f} crops/s (end to end, decoding included); "
              f"{predicted} images predicted now in {seconds:.1f} s")
    for note in notes:
        print(note)
    print(f"predictions: {out_csv} ({PROBABILITIES_SHORT[bool(args.calibrated)]})")
    for path in write_report(out_csv.with_suffix(""), report, labels, written, classes, scored,
                             figures=not args.no_figures,
                             platt=None if args.calibrated else scored):
        print(f"report: {path}")
    aucs = roc_aucs(labels, probs)
    return {"aucs": aucs, "mean_auc": mean_auc(aucs), "probs": written, "names": names,
            "seconds": seconds, "report": report}


def classify_images(args, data, trained_on):
    """Each image's 14 probabilities (ten-crop at data's sizes), most likely first; positive /
    negative by the operating points chosen on val when there are some for this model and
    mode. data: the data flags (splitting.Data, its split unresolved: the labels of the
    images, where its lists hold them); trained_on: the data directory the model came from."""
    from operating_points import calibrate, operating_points_for, thresholds_of
    from report import on_calibrated, thresholds_note
    if args.cam:  # before any work: no matplotlib, or a file where the folder should be
        from optional import pyplot
        pyplot("--cam")
        from common import check_writable_dir
        check_writable_dir(args.cam, "--cam")
    meta = read_metadata(args.model_dir)
    if args.mode == "torch":
        checkpoint = torch_checkpoint(args.checkpoint, meta)
        backend, model_id = TorchModel(checkpoint), file_digest(checkpoint)
    else:
        backend = load_openvino(args.model_dir, args.mode, meta, data.crop_size,
                                args.images_per_request, args.streams)
        model_id = export_id(args.model_dir, args.mode)
    classes = backend.class_names
    points, why = operating_points_for(args.model_dir, args.mode, model_id, classes)
    if args.calibrated and points is None:
        raise InferError(f"--calibrated: {why}")
    width = max(20, max(map(len, classes)) + 2)
    model = checkpoint if args.mode == "torch" else Path(args.model_dir) / MODEL_NAMES[args.mode]
    print(f"mode {args.mode}: {model} ({len(classes)} classes, ten {data.crop_size}x"
          f"{data.crop_size} crops of the image resized to {data.resize})")
    notice = sample_notice(args, meta, trained_on).get("notice")
    if notice:
        print(notice)
    known_labels = image_labels(data, {Path(path).name for path in args.image})
    if points is not None:  # thresholds as they apply to the probabilities printed
        shown_thresholds = thresholds_of(on_calibrated(points) if args.calibrated else points,
                                         args.rule)
    for path in args.image:
        crops = np.concatenate([eval_input(path, data.resize, data.crop_size)]
                               * args.images_per_request)
        result = {}
        backend.run_all([(0, crops)],
                        lambda key, out: result.update(p=average_crops(out[:TEN_CROPS])[0]))
        probs = np.asarray(result["p"], dtype=np.float64)
        if not np.isfinite(probs).all():
            raise InferError(f"{path}: the model gives non-finite probabilities")
        shown = calibrate(probs[None], points)[0] if args.calibrated else probs
        print(f"{path}:")
        for k in np.argsort(-probs):
            line = f"  {classes[k]:<{width}}{shown[k]:.4f}"
            if points is not None:  # the decision is the raw one's; the threshold as shown
                t = thresholds_of(points, args.rule)[k]
                line += (f"  {'positive' if probs[k] >= t else 'negative'} (threshold "
                         f"{shown_thresholds[k]:.4f})" if np.isfinite(t) else
                         "  n/a (no threshold)")
            print(line)
        if Path(path).name in known_labels:  # after the 14 lines, which scripts read
            print(f"  labels in {known_labels[Path(path).name]}")
    if points is None:
        print(f"note: {why}")
    else:
        for line in thresholds_note(points, args.rule):
            print(line)
    if args.cam:
        from cam import write_cams
        thresholds = None if points is None else thresholds_of(points, args.rule)
        for path in write_cams(backend, args.image, args.cam, data.resize, data.crop_size,
                               args.mode, args.cam_method, data.data_dir, args.images_per_request,
                               thresholds, args.rule, notice,
                               calibrate=(lambda raw: calibrate(raw[None], points)[0])
                               if args.calibrated else None):
            print(f"heatmap: {path}")


def image_labels(data, wanted):
    """{image name: "list: its findings"} for the names in `wanted` that the lists of the
    split of `data` (--data-dir, --split) hold; {} when there is no such split here."""
    from labels import list_header, read_list
    found = {}
    try:
        for path in data.resolved().lists.values():
            names, labels = read_list(path)
            classes = list_header(path)[0]
            for i in (i for i, name in enumerate(names) if name in wanted):
                positive = [classes[k] for k in np.flatnonzero(labels[i] == 1)]
                found[names[i]] = f"{path}: " + (", ".join(positive) or "No Finding")
    except (DataError, OSError):
        return {}
    return found


def localize(args, data):
    """The localization benchmark (cam.py) for this mode's model on the split of `data`
    (splitting.Data), as a table and a JSON."""
    from cam import format_localization
    from cam import localize as run
    meta = read_metadata(args.model_dir)
    backend = (TorchModel(torch_checkpoint(args.checkpoint, meta)) if args.mode == "torch"
               else load_openvino(args.model_dir, args.mode, meta, data.crop_size,
                                  args.images_per_request, args.streams))
    check_data_dir(data.data_dir, data.dataset)
    data = data.resolved()
    lists = data.lists
    out = Path(args.out_csv).parent if args.out_csv else Path(args.model_dir)
    target = out / f"localization_{args.mode}.json"
    check_writable_file(target, "--out-csv")
    result = run(backend, data.data_dir, lists, data.resize, data.crop_size, args.cam_method,
                 args.localize_tau, args.images_per_request, args.skip_bad_images, args.limit)
    result.update(mode=args.mode, cam_method=args.cam_method, split=str(lists["test"].parent))
    atomic_write_text(target, json.dumps(strict_json(result), indent=1, allow_nan=False) + "\n",
                      "localization")
    print(format_localization(result))
    print(f"localization: {target}")
    return result


# ---------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    add_data_args(p)
    p.add_argument("--mode", default="fp32", choices=["torch", "fp32", "int8"])
    p.add_argument("--part", default="test", choices=["test", "val"],
                   help="which list of the split to evaluate")
    p.add_argument("--model-dir", default="models", help="where infer.sh writes the models")
    p.add_argument("--checkpoint", default=None,
                   help="PyTorch checkpoint (--mode torch, --export); default: the exported one's")
    p.add_argument("--image", nargs="+", default=None, help="print the probabilities of images")
    p.add_argument("--out-csv", default=None,
                   help="default: MODEL_DIR/predictions_MODE.csv (_val for --part val)")
    p.add_argument("--no-store", action="store_true",
                   help="decode PNGs even where `python dataset.py prepare` made a store")
    p.add_argument("--chunk-size", type=positive_int, default=1000,
                   help="images per saved chunk of predictions (what a kill can cost)")
    # Decoding and cropping a 1024x1024 PNG costs ~7% of what DenseNet-121 INT8 costs on the
    # same core, so a thread per 4 cores keeps ahead without taking cores from inference.
    p.add_argument("--workers", type=positive_int, default=None,
                   help="decoding threads (OpenVINO; default a quarter of the cores) or loader "
                        "workers per process (torch; default the cores shared by the processes "
                        "on an accelerator, up to 16; 1 on a CPU)")
    # OpenVINO
    p.add_argument("--images-per-request", type=positive_int, default=1,
                   help="OpenVINO: images (10 crops each) per inference request")
    p.add_argument("--streams", type=positive_int, default=None,
                   help="OpenVINO CPU streams (default: the THROUGHPUT hint chooses)")
    # PyTorch
    add_device_args(p, "--mode torch: ")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="--mode torch: images (10 crops each) per batch and process (default "
                        "32 on a GPU or Gaudi, 1 on a CPU, where larger batches run slower)")
    p.add_argument("--amp", action="store_true", help="--mode torch: mixed precision autocast")
    p.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true", help="--mode torch: NHWC")
    # Heatmaps (cam.py)
    p.add_argument("--cam", nargs="?", const="cams", default=None, metavar="DIR",
                   help="with --image: heatmap overlays of the positive (or 3 likeliest) "
                        "diseases and a grid of all 14, into DIR (default cams/)")
    p.add_argument("--cam-method", default="cam", choices=["cam", "gradcam++"],
                   help="class activation maps (every mode) or Grad-CAM++ (--mode torch)")
    p.add_argument("--localize", action="store_true",
                   help="score the heatmaps against NIH's radiologist boxes (val picks the "
                        "threshold, test is scored)")
    p.add_argument("--localize-tau", type=fraction, default=None,
                   help="--localize: a fixed heatmap threshold instead of the one that does best "
                        "on val's boxed images (needed where val has none: --split official)")
    p.add_argument("--class-map", type=class_map, default=None,
                   help="evaluating on another data set: 'MODEL NAME=LIST NAME,...' pairs the "
                        "model's classes with the list's (default: same names, and NIH's "
                        "Effusion = CheXpert's Pleural Effusion)")
    # Report (report.py): intervals, operating points, calibration
    add_report_args(p)
    p.add_argument("--rule", default="youden", choices=["youden", "f1", "sensitivity"],
                   help="--image: which of the operating points chosen on val decides")
    p.add_argument("--target-sensitivity", type=fraction, default=0.9,
                   help="--part val: the sensitivity the 'sensitivity' rule's thresholds reach")
    p.add_argument("--no-figures", action="store_true",
                   help="write the report's JSON and Markdown only (no ROC/PR/reliability PNGs)")
    p.add_argument("--calibrated", action="store_true",
                   help="apply the Platt calibration fitted on val (--part val first)")
    add_subgroup_args(p)  # --no-subgroups, --patients-table
    # Export (infer.sh)
    p.add_argument("--export", action="store_true", help="export FP32 and INT8 (infer.sh)")
    p.add_argument("--calibration-size", type=positive_int, default=300,
                   help="val images to calibrate INT8 on")
    p.add_argument("--validation-size", type=positive_int, default=300,
                   help="other val images on which INT8 is compared with FP32")
    p.add_argument("--max-auc-drop", type=float, default=None,
                   help="accuracy-controlled quantization: largest allowed drop of val mean AUC")
    # Unset data flags come from the checkpoint (export) or the exported model (evaluation):
    # a model trained on 56x56 crops of the sample is calibrated and evaluated the same way.
    p.set_defaults(data_dir=None, split=None, resize=None, crop_size=None, split_seed=None,
                   keep_laterals=None)
    args = p.parse_args(argv)
    modes = [flag for flag, on in (("--export", args.export), ("--image", args.image),
                                   ("--localize", args.localize)) if on]
    if len(modes) > 1:  # each is its own command: never one silently winning over the other
        p.error(f"argument {modes[1]}: not allowed with {modes[0]} (one of --export, --image, "
                "--localize, or none for an evaluation)")
    if args.workers is None and (args.mode != "torch" or args.export or args.image):
        # decoding threads: a quarter of the cores by default, a default that depends on the
        # other flags (parsed again with it: nothing is written into the parsed flags)
        p.set_defaults(workers=max(1, (os.cpu_count() or 1) // 4))
        args = p.parse_args(argv)
    if args.mode != "torch" and args.device not in ("auto", "cpu") and not args.export:
        p.error(f"argument --device: {args.device} is for --mode torch; OpenVINO runs on the CPU")
    if args.cam and not args.image:
        p.error("argument --cam: draws the heatmaps of --image files (--localize scores them "
                "on a split)")
    if args.cam_method != "cam" and args.mode != "torch":
        p.error(f"argument --cam-method: {args.cam_method} needs --mode torch")
    if args.max_auc_drop is not None and not 0 <= args.max_auc_drop < 1:
        p.error(f"argument --max-auc-drop: must be in [0, 1), got {args.max_auc_drop}")
    return args


def main(argv=None):
    args = get_args(argv)
    rt = None
    try:
        # The data flags as given; unset ones (None) come from the checkpoint or the export
        given = dict(data_dir=args.data_dir, split=args.split, split_seed=args.split_seed,
                     keep_laterals=args.keep_laterals, resize=args.resize,
                     crop_size=args.crop_size)
        if args.export:
            if not args.checkpoint:
                raise InferError("--export needs --checkpoint")
            import_torch()
            from export import ExportSettings, export
            return export(ExportSettings(
                args.checkpoint, args.model_dir, calibration_size=args.calibration_size,
                validation_size=args.validation_size, max_auc_drop=args.max_auc_drop,
                workers=args.workers, streams=args.streams, use_store=not args.no_store,
                skip_bad_images=args.skip_bad_images, n_boot=args.n_boot,
                boot_seed=args.boot_seed), **given)
        meta = read_metadata(args.model_dir)
        if args.mode == "torch":
            import_torch()
        if args.mode == "torch" and args.checkpoint:  # this checkpoint, not the exported one
            from checkpoint import read_training_flags
            source, where = read_training_flags(args.checkpoint), args.checkpoint
        else:
            source, where = meta, Path(args.model_dir) / METADATA
        data = data_defaults(source, where, **given)
        trained_on = source.get("data_dir")  # the data directory the model came from
        if args.mode == "torch":
            if not (args.image or args.localize):
                from runtime import setup
                rt = setup(args.device)
        if args.localize:
            return localize(args, data)
        if args.image:
            return classify_images(args, data, trained_on)
        return evaluate(args, data, trained_on, rt)
    except (DataError, SetupError) as e:  # DataError includes model.py's CheckpointError
        if rt is None or rt.is_main:
            print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: run the same command to continue after the last saved chunk",
              file=sys.stderr)
        sys.exit(130)
    finally:
        if rt is not None and rt.distributed:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
