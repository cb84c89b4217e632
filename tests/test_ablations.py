"""bench/ablations.py in quick mode: every variant's entry and table row are written, and a second call
trains nothing again. Needs the IDIF switches `bottleneck` and `fusion` (IDIFConfig) for the IDIF rows."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

import data
import synthetic

ROOT = Path(__file__).resolve().parents[1]


def load_runner():
    """bench/ablations.py as a module; bench/ goes after the project root on sys.path, so that its
    `import common` works and `import data` / `import train` stay the project's."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.append(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "bench" / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_variant_and_a_second_call_skips_them(tmp_path, capsys, monkeypatch):
    ablations = load_runner()
    root = synthetic.synthesize(tmp_path / "data", "zipper", n_train=4, n_test_normal=2, n_test_defect=2,
                                resolution=64, seed=0)
    argv = ["--quick", "--seeds", "1", "--data-root", str(root), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out")]
    results = ablations.main(argv)
    assert set(results["runs"]) == {f"zipper/{v}/42" for v in ablations.VARIANTS}
    for key, run in results["runs"].items():
        assert 0.0 <= run["sample_auroc"] <= 1.0 and 0.0 <= run["pixel_aupro"] <= 1.0, key
        assert run["train_seconds"] > 0 and run["trainable_parameters"] <= run["parameters"], key
        assert sorted(run["missing_views"]) == ["1", "2", "3", "4"], key
        left = [run["missing_views"][k][0]["positives"] for k in ("1", "2", "3", "4")]
        assert run["positives"] == 2 and all(a >= b for a, b in zip([2] + left, left)), key
    runs = results["runs"]
    assert runs["zipper/patchcore/42"]["trainable_parameters"] == 0
    assert runs["zipper/rd/42"]["parameters"] < runs["zipper/mvad/42"]["parameters"]
    saved = json.loads((tmp_path / "out" / "ablations_quick.json").read_text())
    assert saved["results"]["runs"] == json.loads(json.dumps(results["runs"]))
    table = (tmp_path / "out" / "ablations_quick.md").read_text()
    assert all(f"| {label} | 1 |" in table for label, _, _ in ablations.VARIANTS.values())
    assert "| defective samples left | 2.0 |" in table
    assert f"{len(runs)} runs to do, 0 done" in capsys.readouterr().out

    def no_training(cfg):
        raise AssertionError(f"{cfg.out} was trained again")

    monkeypatch.setattr(ablations.train, "main", no_training)
    again = ablations.main(argv)
    assert again["runs"] == saved["results"]["runs"]
    assert f"0 runs to do, {len(runs)} done" in capsys.readouterr().out
    with pytest.raises(data.UserError, match="was made with other settings"):
        ablations.main(argv + ["--epochs", "2"])
    with pytest.raises(data.UserError, match="--variants spade: unknown"):
        ablations.main(argv + ["--variants", "mvad,spade"])
