"""The precision a run trains in: one decision from what the hardware has (its facts passed in
as values), the probing apart from it, the fast path shown to train and evaluate as fp32 does,
and a resumed run keeping the precision its checkpoint was trained in."""
import csv
import json

import numpy as np
import pytest
import torch

import main  # noqa: F401  imported while collecting: its first import starts a process
import runtime
from conftest import TINY, assert_clean_error, run_main
from metrics import mean_auc, roc_aucs
from runtime import Hardware, Precision, decide_precision

FP32 = Precision()
BF16_NHWC = Precision(amp=True, amp_dtype="bf16", channels_last=True)
FP16_NHWC = Precision(amp=True, amp_dtype="fp16", channels_last=True)

XEON_AMX = Hardware("cpu", "Intel Xeon (Sapphire Rapids)", amx=True, avx512_bf16=True)
ZEN4 = Hardware("cpu", "AMD EPYC 9654", avx512_bf16=True)
ZEN3 = Hardware("cpu", "AMD EPYC 7763")
H100 = Hardware("cuda", "NVIDIA H100", cuda_bf16=True, cuda_capability=(9, 0))
A100 = Hardware("cuda", "NVIDIA A100", cuda_bf16=True, cuda_capability=(8, 0))
T4 = Hardware("cuda", "Tesla T4", cuda_capability=(7, 5))
V100 = Hardware("cuda", "Tesla V100", cuda_capability=(7, 0))
P100 = Hardware("cuda", "Tesla P100", cuda_capability=(6, 0))
GAUDI = Hardware("hpu", "Gaudi 2")


# ---------------------------------------------------------------------------------------------
# The decision, over the hardware cases

@pytest.mark.parametrize("hw, default, why", [
    (XEON_AMX, BF16_NHWC, "has AMX: native bf16"),
    (ZEN4, BF16_NHWC, "has AVX512-BF16: native bf16"),
    (ZEN3, FP32, "no native bf16 (neither AMX nor AVX512-BF16)"),
    (H100, BF16_NHWC, "compute capability 9.0) has native bf16"),
    (A100, BF16_NHWC, "compute capability 8.0) has native bf16"),
    (T4, FP16_NHWC, "fp16 tensor cores but no bf16: fp16 with a gradient scaler"),
    (V100, FP16_NHWC, "compute capability 7.0) has fp16 tensor cores"),
    (P100, Precision(amp_dtype="fp16"), "no tensor cores: fp32"),
    (GAUDI, FP32, "Gaudi: fp32 unless --amp (bf16)"),
], ids=lambda v: v.name if isinstance(v, Hardware) else None)
def test_the_default_is_the_fastest_native_path(hw, default, why):
    decision = decide_precision(hw)
    assert decision.precision == default
    assert decision.reason.startswith("the default: ") and why in decision.reason
    assert hw.name in decision.reason or hw.device == "hpu"
    assert decision.defaulted == ["amp", "amp_dtype", "channels_last"]
    assert decision.precision.uses_scaler == (default == FP16_NHWC)  # fp16: a gradient scaler


def test_flags_win_over_the_default_each_on_its_own():
    # --no-amp alone: channels_last stays the hardware's default (it is faster alone too)
    d = decide_precision(ZEN4, amp=False)
    assert d.precision == Precision(channels_last=True) and d.defaulted == ["amp_dtype",
                                                                            "channels_last"]
    assert d.reason.startswith("as the flags say; the default would be bf16 autocast + "
                               "channels_last: this CPU (AMD EPYC 9654) has AVX512-BF16")
    assert decide_precision(ZEN4, amp=False, channels_last=False).precision == FP32
    assert decide_precision(H100, channels_last=False).precision == Precision(amp=True)
    # forcing the fast path where it is not the default (the correctness test below does)
    d = decide_precision(ZEN3, amp=True, channels_last=True, amp_dtype="bf16")
    assert d.precision == BF16_NHWC and "the default would be fp32" in d.reason
    assert decide_precision(ZEN3, amp=True).precision == Precision(amp=True)  # bf16 on a CPU
    assert decide_precision(GAUDI, amp=True).precision == Precision(amp=True)  # bf16 on Gaudi
    # --amp where nothing is native on a GPU means fp16, which every CUDA GPU runs
    assert decide_precision(P100, amp=True).precision == Precision(amp=True, amp_dtype="fp16")
    # --amp-dtype names the dtype; autocast stays on by default only where it is native
    assert decide_precision(H100, amp_dtype="fp16").precision == FP16_NHWC
    assert decide_precision(ZEN4, amp_dtype="fp16").precision == Precision(
        amp_dtype="fp16", channels_last=True)
    assert decide_precision(T4, amp_dtype="bf16").precision == Precision(channels_last=True)
    # flags equal to the default are the default
    assert decide_precision(ZEN3, amp=False, channels_last=False).reason.startswith("the default")
    assert str(BF16_NHWC) == "bf16 autocast + channels_last" and str(FP32) == "fp32"


def test_the_facts_are_probed_apart_from_the_decision(monkeypatch):
    """probe_hardware reads the CPU from PyTorch, or from /proc/cpuinfo's flags where this
    PyTorch cannot say; main.py decides from what it returns."""
    hw = runtime.probe_hardware("cpu")
    assert hw.device == "cpu" and hw.name == runtime.cpu_name()
    assert (hw.amx, hw.avx512_bf16) == (runtime.cpu_has_amx(), runtime.cpu_has_avx512_bf16())
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert runtime.probe_hardware("cpu").avx512_bf16 and not runtime.probe_hardware("cpu").amx
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"amx_tile", "amx_bf16", "avx512_bf16"})
    assert decide_precision(runtime.probe_hardware("cpu")).precision == BF16_NHWC
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    assert decide_precision(runtime.probe_hardware("cpu")).precision == FP32
    assert runtime.probe_hardware("hpu") == Hardware("hpu")


def test_the_command_line_leaves_the_precision_to_the_decision():
    args = main.get_args(["--device", "cpu"])
    assert (args.amp, args.amp_dtype, args.channels_last) == (None, None, None)
    args = main.get_args(["--amp", "--channels-last", "--amp-dtype", "bf16"])
    assert (args.amp, args.amp_dtype, args.channels_last) == (True, "bf16", True)
    args = main.get_args(["--no-amp", "--no-channels-last"])
    assert (args.amp, args.channels_last) == (False, False)


def test_the_benchmarks_mark_the_default_and_measure_it_against_fp32(monkeypatch):
    """benchmarks/training.py's table marks the default's row; benchmarks/gpu.py's notes give
    the default against fp32, with a row of its own where it is none of the table's."""
    import sys
    from conftest import REPO
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu
    import training
    rows = [(f"train, {k}", 64, rate, 1.0) for k, rate in zip(gpu.TRAIN, (100, 150, 230, None))]
    device = type("Device", (), {"type": "cuda"})()
    for hw, label, picks, gain in ((H100, "bf16 + channels_last", 2, "2.30x"),
                                   (ZEN3, "fp32", 0, None),
                                   (T4, "fp16 autocast + channels_last", 4, "1.80x")):
        monkeypatch.setattr(training, "probe_hardware", lambda device_type, hw=hw: hw)
        assert training.default_variant("cuda")[0] == label
        monkeypatch.setattr(gpu, "train_row", lambda *a: (128, 180.0, 2.0))
        out, note = gpu.default_row(device, list(rows), [64], 1, 32)
        assert note.startswith(f"main.py's default here: {out[picks][0][len('train, '):]} (")
        if gain:
            assert f"{gain} fp32's images/s" in note
        else:
            assert "fp32 itself, nothing to gain" in note
        assert len(out) == len(rows) + (picks == len(gpu.TRAIN))
    sys.modules.pop("gpu"), sys.modules.pop("training")


# ---------------------------------------------------------------------------------------------
# The fast path trains and evaluates as fp32 does

# Stated tolerances for the tiny configuration (random initial weights, 56x56 crops, 4 Adam
# steps of 8 images, 32 val images). The two runs start from the same weights and see the same
# batches; what differs is bf16's rounding (8 bits of mantissa, products summed in fp32).
# - One model evaluated both ways (`infer.py --mode torch`, ten crops): bf16's rounding alone.
#   Observed here: probabilities within 0.0014 (mean 0.0003), mean AUC within 0.0015; on an
#   AMX Xeon, full-size images, 0.0015 (docs/benchmarks.md).
# - Two models trained both ways: Adam's first steps move every weight by about lr whatever
#   the gradient's size, so a gradient whose sign bf16 flips moves its weight the other way;
#   the trained models differ more than the arithmetic does. Observed here: train and val loss
#   within 0.004, val probabilities within 0.033 (mean 0.006), val mean AUC within 0.02 after
#   one epoch (0.04 after two). The AUC of a model this young is a coarse instrument: 32
#   images give a class 0 to 4 positives, so one swapped pair of near-tied scores moves its AUC
#   by up to 1/(1 x 31) = 0.03.
LOSS_TOL = 0.01  # train and val loss of the two trained models, absolute
TRAINED_PROB_TOL = (0.05, 0.01)  # their val probabilities: largest and mean difference
TRAINED_AUC_TOL = 0.05  # their val mean AUC
EVAL_PROB_TOL = (0.005, 0.001)  # one model evaluated both ways: largest and mean difference
EVAL_AUC_TOL = 0.01  # its mean AUC both ways


def _read_csv(path):
    rows = list(csv.reader(open(path)))
    return [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


@pytest.mark.integration
def test_the_fast_path_trains_and_evaluates_as_fp32_does(tmp_path, capsys):
    """bf16 autocast + channels_last, the default on every CPU with native bf16 and on GPUs,
    is forced here (on a CPU without native bf16 it is emulated: slower, the same rounding)
    and compared with fp32 from the same weights and batches: the losses, the val
    probabilities and the val mean AUC of the trained models agree within the tolerances
    above; and one checkpoint evaluated by `infer.py --mode torch` gives the same
    probabilities and AUC either way. 33 s on the 2-core AMD EPYC (bf16 emulated), most of
    it the bf16 ten-crop evaluation."""
    from labels import read_list
    common = [*TINY, "--limit", "32", "--epochs", "1", "--no-tensorboard"]
    runs = {}
    for name, flags in (("fp32", ["--no-amp", "--no-channels-last"]),
                        ("fast", ["--amp", "--amp-dtype", "bf16", "--channels-last"])):
        proc = run_main(capsys, *common, "--out-dir", tmp_path / name, *flags)
        assert proc.returncode == 0, proc.stderr
        precision = "fp32" if name == "fp32" else "bf16 autocast + channels_last"
        assert f"precision: {precision} (" in proc.stdout
        assert f"1 x cpu, {precision}:" in proc.stdout
        runs[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        ckpt = torch.load(tmp_path / name / "last.pt", weights_only=True)
        assert ckpt["args"]["precision"] == precision
    fp32, fast = runs["fp32"], runs["fast"]
    assert abs(fp32["train_loss"] - fast["train_loss"]) < LOSS_TOL, (fp32, fast)
    assert abs(fp32["val_loss"] - fast["val_loss"]) < LOSS_TOL, (fp32, fast)
    assert abs(fp32["val_mean_auc"] - fast["val_mean_auc"]) < TRAINED_AUC_TOL, (fp32, fast)

    # Evaluation: each trained model in fp32 (infer.py's default) on the val list; the fp32
    # model once more with --amp --channels-last.
    val_names, val_labels = read_list(TINY[1] / "val_list.txt")
    val_labels = val_labels[:32]
    probs = {}
    for name, model, flags in (("fp32", "fp32", []), ("fast", "fast", []),
                               ("fp32 in bf16", "fp32", ["--amp", "--channels-last"])):
        csv_path = tmp_path / f"{name.replace(' ', '_')}.csv"
        proc = run_main(capsys, "--mode", "torch", "--checkpoint", tmp_path / model / "last.pt",
                        "--data-dir", TINY[1], "--part", "val", "--limit", "32", "--workers",
                        "1", "--batch-size", "8", "--device", "cpu", "--out-csv", csv_path,
                        "--no-figures", "--no-subgroups", "--n-boot", "100", *flags,
                        module="infer")
        assert proc.returncode == 0, proc.stderr
        names, probs[name] = _read_csv(csv_path)
        assert names == val_names[:32]
    trained = np.abs(probs["fp32"] - probs["fast"])
    assert trained.max() < TRAINED_PROB_TOL[0] and trained.mean() < TRAINED_PROB_TOL[1], (
        trained.max(), trained.mean())
    evaluated = np.abs(probs["fp32"] - probs["fp32 in bf16"])
    assert evaluated.max() < EVAL_PROB_TOL[0] and evaluated.mean() < EVAL_PROB_TOL[1], (
        evaluated.max(), evaluated.mean())
    auc = {k: mean_auc(roc_aucs(val_labels, p)) for k, p in probs.items()}
    assert abs(auc["fp32"] - auc["fp32 in bf16"]) < EVAL_AUC_TOL, auc
    assert abs(auc["fp32"] - auc["fast"]) < TRAINED_AUC_TOL, auc


# ---------------------------------------------------------------------------------------------
# Resuming keeps the precision the run started in

@pytest.mark.integration
def test_a_resumed_run_keeps_its_precision_and_a_flag_wins_with_a_line(tmp_path, capsys,
                                                                       monkeypatch):
    """Started on a CPU with AVX512-BF16 (its default: bf16 + channels_last), resumed on one
    without (default fp32): it goes on in bf16 + channels_last and says so. A flag given on
    resume wins, with a line saying so; one that would add or drop fp16's gradient scaler is
    refused in one line (the scaler's state cannot be made up)."""
    out = tmp_path / "run"
    common = [*TINY, "--limit", "16", "--out-dir", out, "--no-tensorboard"]
    monkeypatch.setattr(main, "probe_hardware", lambda device: ZEN4)
    first = run_main(capsys, *common, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == ("precision: bf16 autocast + channels_last (the default: this CPU (AMD "
                        "EPYC 9654) has AVX512-BF16: native bf16)"), lines[:2]
    args = torch.load(out / "last.pt", weights_only=True)["args"]
    assert (args["amp"], args["amp_dtype"], args["channels_last"]) == (True, "bf16", True)
    assert args["precision"] == "bf16 autocast + channels_last"
    assert "AVX512-BF16" in args["precision_note"]
    assert args["precision_defaults"] == ["amp", "amp_dtype", "channels_last"]

    monkeypatch.setattr(main, "probe_hardware", lambda device: ZEN3)
    resumed = run_main(capsys, *common, "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert (f"note: {out / 'last.pt'} was trained in bf16 autocast + channels_last: resuming "
            "the same way, not in fp32 as this machine would (--no-amp, --no-channels-last "
            "changes it)") in resumed.stdout
    assert "precision: bf16 autocast + channels_last (as " in resumed.stdout
    assert "1 x cpu, bf16 autocast + channels_last:" in resumed.stdout
    args = torch.load(out / "last.pt", weights_only=True)["args"]
    assert (args["amp"], args["channels_last"]) == (True, True)
    assert args["precision_note"].startswith(f"as {out / 'last.pt'} was trained; this machine "
                                             "would choose fp32: the default: this CPU (AMD "
                                             "EPYC 7763) has no native bf16")

    flag = run_main(capsys, *common, "--epochs", "3", "--no-amp")
    assert flag.returncode == 0, flag.stderr
    assert (f"note: {out / 'last.pt'} was trained in bf16 autocast + channels_last; --no-amp "
            "given: resuming in fp32 + channels_last (the flag wins)") in flag.stdout
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and not ckpt["args"]["amp"] and ckpt["args"]["channels_last"]

    scaler = run_main(capsys, *common, "--epochs", "4", "--amp", "--amp-dtype", "fp16")
    assert_clean_error(scaler, "trained without --amp --amp-dtype fp16 (its gradient scaler)")
    assert "the flag wins" not in scaler.stdout


@pytest.mark.integration
def test_a_run_trained_in_fp32_resumes_in_fp32_on_a_fast_cpu(tmp_path, capsys, monkeypatch):
    """The other way: trained in fp32, resumed where the default is bf16 + channels_last."""
    out = tmp_path / "run"
    common = [*TINY, "--limit", "16", "--out-dir", out, "--no-tensorboard"]
    monkeypatch.setattr(main, "probe_hardware", lambda device: ZEN3)
    assert run_main(capsys, *common, "--epochs", "1").returncode == 0
    monkeypatch.setattr(main, "probe_hardware", lambda device: XEON_AMX)
    resumed = run_main(capsys, *common, "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert ("was trained in fp32: resuming the same way, not in bf16 autocast + channels_last "
            "as this machine would (--amp, --channels-last changes it)") in resumed.stdout
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and not ckpt["args"]["amp"] and not ckpt["args"]["channels_last"]
    again = run_main(capsys, *common, "--epochs", "3", "--channels-last")
    assert again.returncode == 0, again.stderr
    assert "--channels-last given: resuming in fp32 + channels_last (the flag wins)" in again.stdout
