"""Shared test set-up: the project root on sys.path, a headless plotting backend, two CPU threads; the
fixtures that several test files use (a tiny synthetic zipper, a pasted-defect check, an offline hub,
a benchmark script as a module)."""
import importlib.util
import os
import sys
import urllib.error
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import synthetic  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
SIZE = 64  # the tiny zipper's image side


@pytest.fixture(scope="session")
def zipper(tmp_path_factory):
    """(training samples, normal test samples) of a tiny synthetic zipper, (4, 5, 3, 64, 64) and (2, 5, 3, 64, 64)."""
    root = synthetic.synthesize(tmp_path_factory.mktemp("zipper"), "zipper", n_train=4, n_test_normal=2,
                                n_test_defect=0, resolution=SIZE, seed=0)
    split = lambda name: torch.stack([s["images"] for s in data.RealIAD(root, "zipper", name, SIZE)])  # noqa: E731
    return split("train"), split("test")


@pytest.fixture(scope="session")
def pasted_defect_check():
    """check(anomaly_map, test, slack=4): a saturated magenta 12 x 12 square pasted into view 2 of the
    first normal test sample (rows 30-41, columns 26-37) scores above every normal test view, and its
    map peaks on the square, give or take `slack` pixels (a map's resolution: its grid cell)."""
    def check(anomaly_map, test: torch.Tensor, slack: int = 4) -> None:
        defective = test[:1].clone()
        patch = torch.zeros(3, 12, 12)
        patch[0], patch[1] = 2.5, -2.0  # ImageNet-normalised values
        defective[0, 2, :, 30:42, 26:38] = patch
        normal_scores = anomaly_map(test).amax(dim=(-2, -1))  # (2, V): every normal test view
        defect_map = anomaly_map(defective)[0, 2]  # (H, W)
        assert defect_map.max() > normal_scores.max()
        row, col = divmod(int(defect_map.argmax()), SIZE)
        assert 30 - slack <= row < 42 + slack and 26 - slack <= col < 38 + slack, (row, col)
    return check


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and no network: torchvision's download fails as it does offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="session")
def bench_script():
    """load(name): bench/<name>.py as a module of its own. bench/ goes after the project root on sys.path,
    so that the script's `import common` works and `import data` / `import train` stay the project's
    (bench/data.py and bench/train.py have the same names)."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.append(str(bench))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
