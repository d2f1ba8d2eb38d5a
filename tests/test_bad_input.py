"""Bad input, one row per case: the command, what its one-line `error:` must say, and the files
that must be the same afterwards. Every script's main() runs in this process (no start-up
cost); a traceback fails the test."""
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, assert_clean_error, make_data_dir, run_main
from labels import read_list, write_list

CASES = {}


def case(name, module, *fragments):
    """Register a case: fn(ctx) returns the arguments, or (arguments, paths that must not change)."""
    def register(fn):
        CASES[name] = (module, fragments, fn)
        return fn
    return register


class Context:
    def __init__(self, tmp, nih_dir, small_model, nih_images):
        self.tmp, self.nih, self.work, self.nih_images = tmp, nih_dir, small_model[0], nih_images

    def data_dir(self, n=12):
        image_dir, table = self.nih_images
        names = sorted(p.name for p in image_dir.iterdir())[:n]
        return make_data_dir(self.tmp / "data", image_dir, table, names)

    def run_copy(self):
        """A copy of a finished training run (last.pt, best.pt, metrics.jsonl)."""
        shutil.copytree(self.work / "run", self.tmp / "run")
        return self.tmp / "run"

    def models_copy(self):
        shutil.copytree(self.work / "models", self.tmp / "models",
                        ignore=shutil.ignore_patterns("predictions*"))
        return self.tmp / "models"

    def infer(self, models, *extra):
        return ["--model-dir", models, "--data-dir", self.nih, "--limit", "2", *extra]


# ---- flags -----------------------------------------------------------------------------------

for flag, value, says in [
        ("--batch-size", "0", "must be a positive integer"), ("--batch-size", "-4", "positive integer"),
        ("--lr", "-1", "must be a positive number"), ("--lr", "nan", "must be a positive number"),
        ("--crop-size", "0", "positive integer"), ("--crop-scale", "2", "must be a number in (0, 1]"),
        ("--workers", "-1", "must be an integer >= 0"), ("--split-seed", "-1", "integer in [0, 2**63)"),
        ("--epochs", "0", "positive integer"), ("--epochs", "-1", "positive integer"),
        ("--save-every", "-1", "integer >= 0"), ("--limit", "0", "positive integer"),
        ("--limit", "-5", "positive integer"), ("--resize", "0", "positive integer"),
        ("--log-every", "0", "positive integer"), ("--weight-decay", "-1", "number >= 0")]:
    case(f"main {flag} {value}", "main", f"argument {flag}", says)(
        lambda ctx, flag=flag, value=value: ([*TINY, flag, value, "--out-dir", ctx.tmp / "run"],
                                             [ctx.tmp / "run"]))

case("main --seed 2**64", "main", "argument --seed", "[0, 2**63)")(
    lambda ctx: [*TINY, "--seed", str(2 ** 64)])
case("main crop larger than resize", "main", "--crop-size: 300 is larger than --resize 256")(
    lambda ctx: ["--crop-size", "300"])
case("main crop larger than train size", "main", "--crop-size: 224 is larger than --train-size 100")(
    lambda ctx: ["--train-size", "100"])

for flag, value, says in [
        ("--images-per-request", "0", "positive integer"), ("--workers", "0", "positive integer"),
        ("--calibration-size", "0", "positive integer"), ("--limit", "0", "positive integer"),
        ("--chunk-size", "0", "positive integer"), ("--max-auc-drop", "2", "must be in [0, 1)")]:
    case(f"infer {flag} {value}", "infer", f"argument {flag}", says)(
        lambda ctx, flag=flag, value=value: [flag, value])

case("main --uncertain maybe", "main", "argument --uncertain", "invalid choice")(
    lambda ctx: [*TINY, "--uncertain", "maybe"])
case("infer --class-map without =", "infer", "argument --class-map", "MODEL NAME=LIST NAME")(
    lambda ctx: ["--class-map", "Effusion"])
case("main --arch unknown", "main", "argument --arch", "invalid choice")(
    lambda ctx: [*TINY, "--arch", "densenet999"])

case("infer crop larger than resize", "infer", "--crop-size 300 is larger than --resize 256")(
    lambda ctx: ["--model-dir", ctx.tmp / "none", "--crop-size", "300"])

for value in ("0", "-64"):
    case(f"prepare --size {value}", "dataset", "argument --size")(
        lambda ctx, value=value: (["prepare", "--data-dir", ctx.data_dir(), "--size", value],
                                  [ctx.tmp / "data"]))


# ---- data: label tables, lists, splits, directories ----------------------------------------

def _with_table(ctx, text=None, raw=None, name="Data_Entry_2017_v2020.csv"):
    data = ctx.data_dir()
    (data / "Data_Entry_2017_v2020.csv").unlink()
    if raw is not None:
        (data / name).write_bytes(raw)
    else:
        (data / name).write_text(text)
    return ["--data-dir", data, "--split", "random"]


case("label table empty", "stats", "Data_Entry_2017_v2020.csv: label table is empty")(
    lambda ctx: _with_table(ctx, ""))
case("label table corrupt gzip", "stats", "Data_Entry_2017_v2020.csv.gz: cannot read label table")(
    lambda ctx: _with_table(ctx, raw=gzip.compress(b"Image Index,Finding Labels\n" * 50)[:40]
                            + b"\x00garbage" * 20, name="Data_Entry_2017_v2020.csv.gz"))
case("label table huge patient id", "stats", "csv:3: Patient ID", "at most 18 digits")(
    lambda ctx: _with_table(ctx, "Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass,1\n"
                            "00000002_000.png,Mass,99999999999999999999999\n"))
case("label table duplicate row", "stats", "csv:3: image '00000001_000.png' is listed twice")(
    lambda ctx: _with_table(ctx, "Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass,1\n"
                            "00000001_000.png,Nodule,1\n"))


def _split_dir(ctx, edit):
    """The sample's split copied to a directory, then edited: edit(names) per list."""
    out = ctx.tmp / "split"
    out.mkdir()
    lists = {s: read_list(REPO / "sample" / f"{s}_list.txt") for s in ("train", "val", "test")}
    edit(lists)
    for s, (names, labels) in lists.items():
        write_list(out / f"{s}_list.txt", names, labels)
    return ["--split", out]


def _dup_in_list(lists):
    names, labels = lists["val"]
    lists["val"] = (names + names[:1], torch.cat([torch.from_numpy(labels), torch.from_numpy(labels[:1])]).numpy())


def _leak(lists):
    names, labels = lists["test"]
    lists["test"] = (names + lists["train"][0][:1], torch.cat([
        torch.from_numpy(labels), torch.from_numpy(lists["train"][1][:1])]).numpy())


def _patient_leak(lists):
    names, labels = lists["test"]
    patient = lists["train"][0][0].split("_")[0]
    lists["test"] = (names + [f"{patient}_999.png"], torch.cat([
        torch.from_numpy(labels), torch.from_numpy(labels[:1])]).numpy())


case("list duplicate name", "stats", "val_list.txt:41: image", "listed twice (first on line 1)")(
    lambda ctx: _split_dir(ctx, _dup_in_list))
case("image in two splits", "stats", "is also in", "train_list.txt: the splits leak")(
    lambda ctx: _split_dir(ctx, _leak))
case("patient in two splits", "main", "_999.png) is also in", "one patient must stay in one split")(
    lambda ctx: [*TINY, *_split_dir(ctx, _patient_leak)[0:2], "--out-dir", ctx.tmp / "run"])


def _splits_is_a_file(ctx):
    data = ctx.data_dir()
    (data / "splits").write_text("in the way\n")
    return ["split", "--data-dir", data, "--split", "random"], [data / "splits"]


case("random split cannot be written", "dataset", "--split random:", "--split DIR")(
    _splits_is_a_file)


def _one_list_missing(ctx):
    data = ctx.data_dir()
    (data / "val_list.txt").unlink()
    return ["check", "--data-dir", data]


case("own split with a list missing", "dataset", "val_list.txt: not found, while",
     "needs all three lists")(_one_list_missing)
case("label table cut short", "stats", "csv:3: an empty entry in Finding Labels", "truncated")(
    lambda ctx: _with_table(ctx, "Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass,1\n"
                            "00000002_000.png,,2\n"))
case("prepare an absurd size", "dataset", "--size 100000: larger than 8192")(
    lambda ctx: (["prepare", "--data-dir", ctx.data_dir(), "--size", "100000"], [ctx.tmp / "data"]))


def _store_damage(edit):
    def build(ctx):
        from store import prepare_store
        data = ctx.data_dir()
        prepare_store(data, (64,), workers=1, progress=False)
        edit(data / "store" / "64")
        return [*TINY[2:], "--data-dir", data, "--resize", "64", "--out-dir", ctx.tmp / "run"]
    return build


case("store names.txt not UTF-8", "main", "store/64/: damaged store", "prepare")(
    _store_damage(lambda d: (d / "names.txt").write_bytes(b"\xff\xfe garbage\n")))
case("store meta.json with a bad field", "main", "meta.json: damaged store metadata")(
    _store_damage(lambda d: (d / "meta.json").write_text(json.dumps(
        {**json.loads((d / "meta.json").read_text()), "skipped": 5}))))


def _images_is_a_file(ctx):
    data = ctx.data_dir()
    shutil.rmtree(data / "images")
    (data / "images").write_text("not a directory\n")
    return ["check", "--data-dir", data]


case("images is a file", "dataset", "images/: no images (PNG, JPEG or DICOM)")(_images_is_a_file)


def _out_dir_file(ctx):
    (ctx.tmp / "file").write_text("precious\n")
    return [*TINY, "--out-dir", ctx.tmp / "file"], [ctx.tmp / "file"]


def _out_dir_under_file(ctx):
    (ctx.tmp / "file").write_text("precious\n")
    return [*TINY, "--out-dir", ctx.tmp / "file" / "run"], [ctx.tmp / "file"]


case("out-dir is a file", "main", "--out-dir", "exists and is not a directory")(_out_dir_file)
case("out-dir under a file", "main", "--out-dir", "not a writable directory")(_out_dir_under_file)


# ---- checkpoints and weights ---------------------------------------------------------------

def _resume_with(*flags):
    def build(ctx):
        run = ctx.run_copy()
        return [*TINY, "--epochs", "5", "--out-dir", run, *flags], [run]
    return build


case("resume adding --freeze-backbone", "main", "last.pt: trained without --freeze-backbone",
     "--weights")(_resume_with("--freeze-backbone"))
case("resume adding fp16", "main", "last.pt: trained without --amp --amp-dtype fp16")(
    _resume_with("--amp", "--amp-dtype", "fp16"))


def _old_checkpoint(ctx):
    run = ctx.run_copy()
    ckpt = torch.load(run / "last.pt")
    del ckpt["epoch_images"]
    torch.save(ckpt, run / "last.pt")
    return [*TINY, "--epochs", "5", "--out-dir", run], [run]


case("resume an old-format checkpoint", "main", "written by an older main.py")(_old_checkpoint)
case("resume with another seed", "main", "last.pt: trained with --seed 0, not 5")(
    _resume_with("--seed", "5"))
case("resume with another train size", "main", "trained with --train-size 64, not 56")(
    _resume_with("--train-size", "56"))


def _resume_another_split(ctx):
    run = ctx.run_copy()
    return [*TINY, "--epochs", "5", "--out-dir", run, "--limit", "40"], [run]


case("resume on another list", "main", "last.pt: trained on another train list")(
    _resume_another_split)


def _garbage_checkpoint(ctx):
    (ctx.tmp / "noise.pt").write_bytes(bytes(range(256)) * 40)
    return [*TINY, "--weights", ctx.tmp / "noise.pt", "--out-dir", ctx.tmp / "run"]


case("random bytes as weights", "main", "noise.pt: corrupt or not a weights file (not a PyTorch "
     "file)")(_garbage_checkpoint)


def _nan_checkpoint(ctx):
    state = torch.load(ctx.work / "run" / "best.pt")["model"]
    state["classifier.bias"][3] = float("nan")
    torch.save(state, ctx.tmp / "nan.pt")
    image = REPO / "sample" / "images" / "00000284_000.png"
    return ["--mode", "torch", "--checkpoint", ctx.tmp / "nan.pt", "--image", image,
            "--model-dir", ctx.tmp / "none", "--resize", "64", "--crop-size", "56"]


case("checkpoint with NaN weights", "infer", "nan.pt: classifier.bias holds non-finite values")(
    _nan_checkpoint)


def _pickled_module(ctx):
    torch.save(torch.nn.Linear(2, 2), ctx.tmp / "module.pt")
    return [*TINY, "--weights", ctx.tmp / "module.pt", "--out-dir", ctx.tmp / "run"]


case("weights file holding a pickled module", "main", "module.pt: refused", "objects other than "
     "tensors (torch.nn.modules.linear.Linear)", "could run code")(_pickled_module)


def _empty_weights(ctx):
    (ctx.tmp / "empty.pt").write_bytes(b"")
    return [*TINY, "--weights", ctx.tmp / "empty.pt", "--out-dir", ctx.tmp / "run"]


case("empty weights file", "main", "empty.pt: corrupt or not a weights file")(_empty_weights)


# ---- exported models -------------------------------------------------------------------------

def _models(edit, *extra):
    def build(ctx):
        models = ctx.models_copy()
        edit(models)
        return ctx.infer(models, "--mode", "int8", *extra), [models]
    return build


def _truncate_xml(models):
    xml = models / "chexnet_int8.xml"
    xml.write_text(xml.read_text()[:500])


def _int8_xml_fp32_bin(models):
    shutil.copy(models / "chexnet_fp32.bin", models / "chexnet_int8.bin")


def _garbage_without_manifest(models):
    meta = json.loads((models / "chexnet.json").read_text())
    del meta["files"]  # as an export from before manifests
    (models / "chexnet.json").write_text(json.dumps(meta))
    (models / "chexnet_int8.xml").write_text("<net>not a model")


def _export_bad_args(ctx):
    ckpt = torch.load(ctx.work / "run" / "best.pt")
    ckpt["args"]["crop_size"] = "abc"
    torch.save(ckpt, ctx.tmp / "badargs.pt")
    return ["--export", "--checkpoint", ctx.tmp / "badargs.pt", "--model-dir", ctx.tmp / "m"]


case("checkpoint with a bad setting", "infer", "badargs.pt: its crop_size is 'abc'")(_export_bad_args)


def _corrupt_metadata(models):
    (models / "chexnet.json").write_text('{"checkpoint": ')


case("truncated model xml", "infer", "chexnet_int8.xml: does not belong to the export",
     "infer.sh")(_models(_truncate_xml))
case("int8 xml with fp32 bin", "infer", "chexnet_int8.bin: does not belong to the export")(
    _models(_int8_xml_fp32_bin))
case("model without a manifest", "infer", "chexnet.json: no manifest of the model files")(
    _models(_garbage_without_manifest))


def _garbage_rehashed(models):
    from backends import file_digest
    (models / "chexnet_int8.xml").write_text("<net>not a model")
    meta = json.loads((models / "chexnet.json").read_text())
    meta["files"]["chexnet_int8.xml"] = file_digest(models / "chexnet_int8.xml")
    (models / "chexnet.json").write_text(json.dumps(meta))


def _zero_weights(models):
    from backends import file_digest
    size = (models / "chexnet_int8.bin").stat().st_size
    (models / "chexnet_int8.bin").write_bytes(bytes(size))
    meta = json.loads((models / "chexnet.json").read_text())
    meta["files"]["chexnet_int8.bin"] = file_digest(models / "chexnet_int8.bin")
    (models / "chexnet.json").write_text(json.dumps(meta))


def _not_ir(models):
    from backends import file_digest
    (models / "chexnet_int8.xml").write_text("name: a yaml file, not a model\n")
    meta = json.loads((models / "chexnet.json").read_text())
    meta["files"]["chexnet_int8.xml"] = file_digest(models / "chexnet_int8.xml")
    (models / "chexnet.json").write_text(json.dumps(meta))


def _metadata_field(key, value):
    def edit(models):
        meta = json.loads((models / "chexnet.json").read_text())
        meta[key] = value
        (models / "chexnet.json").write_text(json.dumps(meta))
    return edit


case("garbage model xml", "infer", "chexnet_int8.xml: cannot read the model")(
    _models(_garbage_rehashed))
case("not an IR xml", "infer", "chexnet_int8.xml: not an OpenVINO model")(_models(_not_ir))
case("model of zeros", "infer", "chexnet_int8")(_models(_zero_weights))
case("chexnet.json resize as text", "infer", "chexnet.json: its resize is '64'")(
    _models(_metadata_field("resize", "64")))
case("chexnet.json files as a list", "infer", "chexnet.json: damaged model metadata")(
    _models(_metadata_field("files", [])))
case("model dir is a file", "infer", "--model-dir", "README.md: not a directory")(
    lambda ctx: ["--model-dir", REPO / "README.md", "--data-dir", ctx.nih])
case("corrupt chexnet.json", "infer", "chexnet.json: damaged model metadata")(
    _models(_corrupt_metadata))


def _out_csv(where):
    def build(ctx):
        models = ctx.models_copy()
        (ctx.tmp / "file").write_text("precious\n")
        out = ctx.tmp / "file" / "p.csv" if where == "under a file" else ctx.tmp
        return ctx.infer(models, "--mode", "int8", "--out-csv", out), [models, ctx.tmp / "file"]
    return build


case("out-csv is a directory", "infer", "--out-csv", "is a directory")(_out_csv("directory"))
case("out-csv under a file", "infer", "--out-csv", "file: exists and is not a directory")(_out_csv("under a file"))


# ---- the runner ----------------------------------------------------------------------------

def snapshot(paths):
    state = {}
    for root in paths:
        root = Path(root)
        files = [root] if not root.is_dir() else sorted(
            p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
        for p in files:
            state[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    return state


@pytest.mark.integration
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, nih_dir, small_model, nih_images, capsys):
    module, fragments, build = CASES[name]
    ctx = Context(tmp_path, nih_dir, small_model, nih_images)
    built = build(ctx)
    argv, protected = built if isinstance(built, tuple) else (built, [])
    before = snapshot(protected)
    proc = run_main(capsys, *argv, module=module)
    assert_clean_error(proc, *fragments)
    assert snapshot(protected) == before, "files changed"
    if module == "dataset" and "prepare" in argv:
        assert not list((tmp_path / "data").glob("store/*"))


@pytest.mark.integration
def test_stats_on_names_that_are_not_nih(tmp_path, capsys):
    lists = {s: read_list(REPO / "sample" / f"{s}_list.txt") for s in ("train", "val", "test")}
    for s, (names, labels) in lists.items():
        write_list(tmp_path / f"{s}_list.txt", [f"img{s}{i}.png" for i in range(len(names))], labels)
    proc = run_main(capsys, "--split", tmp_path, module="stats")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].split() == ["patients", "n/a", "n/a", "n/a"]


@pytest.mark.integration
def test_infer_sh_without_a_checkpoint(tmp_path):
    import os
    proc = subprocess.run(["bash", "infer.sh", tmp_path / "missing.pt"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "VENV": sys.prefix})
    assert_clean_error(proc, "missing.pt: checkpoint not found")
