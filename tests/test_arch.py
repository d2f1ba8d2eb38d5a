"""--arch densenetblur121d: timm's anti-aliased DenseNet-121d (BlurPool, deep stem) through the
same pipeline as torchvision's DenseNet-121: ImageNet weights by timm's own loader (offline: a
local file), training, resume, OpenVINO FP32/INT8 export and class activation maps."""
import pytest
import torch

from conftest import TINY, assert_clean_error, run_main


timm = pytest.importorskip("timm")


@pytest.mark.integration
def test_densenetblur121d_trains_resumes_exports_and_maps(tmp_path, capsys, monkeypatch,
                                                         nih_dir):
    from safetensors.torch import save_file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the Hub's cache is all there is
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    args = [*TINY, "--arch", "densenetblur121d", "--limit", "16"]
    offline = run_main(capsys, *[a for a in args if a not in ("--pretrained", "none")],
                       "--epochs", "1", "--out-dir", tmp_path / "offline")
    assert_clean_error(offline, "ImageNet weights of densenetblur121d", "Hugging Face Hub",
                       "timm/densenetblur121d", "--weights PATH", "--pretrained none")
    assert not (tmp_path / "offline" / "last.pt").exists()

    # The Hub's model.safetensors as an offline user copies it: timm's ImageNet model
    torch.manual_seed(0)
    imagenet = timm.create_model("densenetblur121d", pretrained=False)
    save_file(imagenet.state_dict(), tmp_path / "model.safetensors")
    resnet = timm.create_model("resnet18", pretrained=False)
    save_file(resnet.state_dict(), tmp_path / "resnet.safetensors")
    wrong = run_main(capsys, *args, "--weights", tmp_path / "resnet.safetensors", "--epochs", "1",
                     "--out-dir", tmp_path / "wrong")
    assert_clean_error(wrong, "resnet.safetensors: not ImageNet weights of densenetblur121d")

    run = tmp_path / "run"
    first = run_main(capsys, *args, "--weights", tmp_path / "model.safetensors", "--epochs", "1",
                     "--out-dir", run)
    assert first.returncode == 0, first.stderr
    assert "densenetblur121d" in first.stdout
    resumed = run_main(capsys, *args, "--weights", tmp_path / "model.safetensors",
                       "--epochs", "2", "--out-dir", run)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["args"]["arch"] == "densenetblur121d"
    assert all(k.startswith(("features.", "classifier.")) for k in state["model"])

    export = run_main(capsys, "--export", "--checkpoint", run / "best.pt", "--model-dir",
                      tmp_path / "models", "--data-dir", nih_dir, "--calibration-size", "8",
                      "--validation-size", "4", module="infer")
    assert export.returncode == 0, export.stdout + export.stderr
    image = nih_dir / "images" / "00000100_000.png"
    outputs = {}
    for mode in ("torch", "fp32", "int8"):
        proc = run_main(capsys, "--mode", mode, "--model-dir", tmp_path / "models",
                        "--checkpoint", run / "best.pt", "--image", image,
                        *(["--cam", tmp_path / "cams"] if mode == "int8" else []), module="infer")
        assert proc.returncode == 0, proc.stderr
        outputs[mode] = {ln.split()[0]: float(ln.split()[1])
                         for ln in proc.stdout.split(":\n")[1].splitlines()[:14]}
    assert max(abs(outputs["torch"][k] - outputs["fp32"][k]) for k in outputs["torch"]) < 1e-4
    assert sorted(p.name for p in (tmp_path / "cams").iterdir())  # heatmaps were written
