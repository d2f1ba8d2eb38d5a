"""What the class activation maps cost the exported models: the same DenseNet-121 exported
with probabilities only and with probabilities + maps (as infer.sh does), FP32 and INT8, timed
with OpenVINO's benchmark_app in alternating rounds, and their probabilities compared.

    python benchmarks/cam_cost.py [--rounds 2] [--seconds 12]
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from backends import openvino_core  # noqa: E402
from images import eval_input  # noqa: E402
from model import WithCAM, build_model, with_sigmoid  # noqa: E402


def benchmark_app(xml, seconds):
    cmd = [str(Path(sys.executable).parent / "benchmark_app"), "-m", str(xml), "-d", "CPU",
           "-hint", "throughput", "-shape", "[10,3,224,224]", "-t", str(seconds),
           "-infer_precision", "f32"]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    match = re.search(r"Throughput:\s+([\d.]+) FPS", out)
    return float(match.group(1)) if match else float("nan")


def main():
    import nncf
    import openvino as ov
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", default=str(REPO.parent / "shared/data/nih_sample/images"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=int, default=12)
    a = p.parse_args()
    torch.manual_seed(0)
    model = build_model(pretrained="none").eval()
    crops = [eval_input(path) for path in sorted(Path(a.images).glob("*.png"))[:20]]
    calibration = nncf.Dataset(crops)
    work = Path(tempfile.mkdtemp(prefix="chexnet-cam-cost-"))
    probs = {}
    for name, net in (("probabilities", with_sigmoid(model)), ("with maps", WithCAM(model))):
        converted = ov.convert_model(net, example_input=torch.zeros(1, 3, 224, 224),
                                     input=[(-1, 3, 224, 224)])
        ov.save_model(converted, work / f"{name}_fp32.xml", compress_to_fp16=False)
        ov.save_model(nncf.quantize(converted, calibration, subset_size=len(crops)),
                      work / f"{name}_int8.xml", compress_to_fp16=False)
        for precision in ("fp32", "int8"):
            compiled = openvino_core().compile_model(work / f"{name}_{precision}.xml", "CPU",
                                                     {"INFERENCE_PRECISION_HINT": "f32"})
            probs[name, precision] = np.concatenate([compiled(c)[0] for c in crops[:4]])
    times = {}
    for _ in range(a.rounds):
        for precision in ("fp32", "int8"):
            for name in ("probabilities", "with maps"):
                times.setdefault((name, precision), []).append(
                    benchmark_app(work / f"{name}_{precision}.xml", a.seconds))
    print(f"benchmark_app crops/s at [10,3,224,224], {a.rounds} alternating rounds")
    print(f"{'model':<26}{'crops/s (each round)':>30}{'probability change':>22}")
    for (name, precision), rates in times.items():
        change = np.abs(probs[name, precision] - probs["probabilities", precision]).max()
        print(f"{precision + ', ' + name:<26}{' '.join(f'{r:.1f}' for r in rates):>30}"
              f"{change:>22.2g}")


if __name__ == "__main__":
    main()
