"""Checks on one device (a GPU: bench/gpu_check.sh runs it with --device cuda): for every method, a
training run of one epoch (PatchCore: its fit) and its evaluation in fp32 and in bf16, and what
--precision auto chooses there.

    python bench/device_check.py [--device cuda|cpu] [--quick] [--out bench/results]   (default: cuda)

Data: the built-in synthetic zipper, 8 training and 4 + 4 test samples at 128 px (--quick: 64 px),
in a temporary folder. Checks, each printed PASS or FAIL and written to <out>/device_check.json (exit
status 1 on any FAIL):
- auto: --precision auto chooses bf16 on a GPU that computes bf16 natively (compute capability 8.0
  on), fp32 on one that emulates it (runtime.resolve_precision), and says why;
- per method and precision: the run ends; history.json (trained methods) and metrics.json record
  the precision and the device; the losses are finite; every metric lies in [0, 1];
- per method under bf16: the anomaly maps (the pixel metrics' input) are float32 computed in float32
  (not bf16 values widened) and within 5% of their range of the fp32 maps (the same weights: the
  fp32 run's checkpoint, scored both ways); the training losses are float32.
These run on the CPU in the suite (tests/test_eval.py, tests/test_train.py); this script is what
checks them on CUDA, where the autocast op lists and kernels differ.
"""
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import common  # before the project's modules: it puts the repository root on sys.path
import data
import eval as evaluation
import runtime
import synthetic
import train

METHODS = ("mvad", "idif", "patchcore")
# Small models, as the suite's (tests/test_train.py): one MVAS block per scale, a small voxel, a narrow PatchCore.
SMALL = {"mvad": {"n_win": (4, 3, 2), "blocks": (1, 1, 1)}, "idif": {"voxel_size": (2, 4, 4), "fusion_blocks": 1},
         "patchcore": {"backbone": "resnet18", "width": 64}}
CHECKS = []  # (passed, what was checked), in order


def check(condition: bool, what: str) -> None:
    """Prints PASS or FAIL with what was checked, and keeps both for the JSON and the exit status."""
    print(f"{'PASS' if condition else 'FAIL'}  {what}", flush=True)
    CHECKS.append((bool(condition), what))


def run(method: str, precision: str, root: Path, out: Path, size: int, device: str) -> dict:
    """train.main for one epoch (or PatchCore's fit) and the evaluation; returns metrics.json."""
    cfg = train.TrainConfig(method=method, category="zipper", data_root=str(root), out=str(out), epochs=1,
                            batch_size=4, image_size=size, weights="none", device=device, precision=precision,
                            model=SMALL[method])
    train.main(cfg)
    return json.loads((out / "metrics.json").read_text())


def check_run(method: str, precision: str, metrics: dict, out: Path, device: str) -> None:
    """What every run must hold: its precision and device recorded, finite losses, metrics in [0, 1]."""
    name = f"{method} {precision}"
    settings = metrics["settings"]
    check(settings["precision"] == precision and settings["device"].startswith(device),
          f"{name}: metrics.json records precision {settings['precision']}, device {settings['device']}")
    if method != "patchcore":
        history = json.loads((out / "history.json").read_text())
        check(all(entry["precision"] == precision for entry in history)
              and all(math.isfinite(v) for entry in history for k, v in entry.items() if k != "precision"),
              f"{name}: history.json records {precision}, losses finite ({history[-1]['loss']:.4f})")
    values = [metrics[level][key] for level in ("sample", "image", "pixel") for key in metrics[level]]
    check(all(v is not None and 0.0 <= v <= 1.0 for v in values),
          f"{name}: every metric in [0, 1] (sample AUROC {metrics['sample']['auroc']}, pixel AUROC "
          f"{metrics['pixel']['auroc']})")


def check_bf16_maps(method: str, checkpoint: Path, root: Path, size: int, device: str) -> None:
    """The fp32 checkpoint's maps under bf16 autocast: float32 computed in float32, near the fp32 maps;
    its training loss under autocast: float32."""
    model, _ = evaluation.load_model(str(checkpoint))
    model = runtime.place(model, device)
    images = next(iter(DataLoader(data.RealIAD(root, ["zipper"], "test", image_size=size), batch_size=2)))["images"]
    images = images.to(device)  # (B, V, 3, H, W)
    with torch.inference_mode():
        fp32 = model.anomaly_map(images)  # (B, V, H, W)
        bf16 = runtime.accelerate(model.anomaly_map, device, False, "bf16")(images)
    widened = (bf16.bfloat16().float() == bf16).float().mean().item()  # bf16 values have 8 bits
    spread = (bf16 - fp32).abs().max().item() / (fp32.max() - fp32.min()).item()
    check(bf16.dtype == torch.float32 and widened < 0.1 and spread < 0.05,
          f"{method} bf16: maps {bf16.dtype}, {100 * widened:.0f}% of them bf16 values, largest difference to fp32 "
          f"{100 * spread:.2f}% of their range")
    if method == "patchcore":
        return
    with runtime.autocast(device, "bf16"):
        loss = model.train()(images) if method == "mvad" else model.train()(images, images)["loss"]
    check(loss.dtype == torch.float32 and torch.isfinite(loss).item(), f"{method} bf16: training loss {loss.dtype}")


def main() -> int:
    parser = common.arguments(__doc__)
    parser.set_defaults(device="cuda")
    args = common.parse(parser)
    device = str(runtime.resolve_device(args.device))
    size = 64 if args.quick else 128
    precision, why = runtime.resolve_precision("auto", device)
    if device.startswith("cuda"):
        native = torch.cuda.get_device_capability() >= (8, 0)
        check(precision == ("bf16" if native else "fp32"),
              f"auto on {torch.cuda.get_device_name()}: {precision} ({why})")
    else:
        print(f"auto on this CPU: {precision} ({why})")
    with tempfile.TemporaryDirectory() as folder:
        root = synthetic.synthesize(Path(folder) / "data", "zipper", n_train=8, n_test_normal=4, n_test_defect=4,
                                    resolution=size, seed=0)
        for method in METHODS:
            for precision in ("fp32", "bf16"):
                out = Path(folder) / f"{method}_{precision}"
                check_run(method, precision, run(method, precision, root, out, size, device), out, device)
            check_bf16_maps(method, Path(folder) / f"{method}_fp32" / "last.pt", root, size, device)
    failed = sum(not passed for passed, _ in CHECKS)
    common.write_json("device_check", args, [{"passed": passed, "check": what} for passed, what in CHECKS])
    print(f"{failed} of {len(CHECKS)} checks failed" if failed else f"all {len(CHECKS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
