"""bench/precision.py in quick mode: both arms of a seed run, the fp32 arm in float32 and the auto arm
in what runtime.resolve_precision chooses on this machine; a second call trains nothing; the table's
paired row on hand-made runs."""
import json

import torch

import runtime
import synthetic

def test_quick_pairs_fp32_with_auto_and_a_second_call_trains_nothing(tmp_path, capsys, monkeypatch, bench_script):
    bench = bench_script("precision")
    root = synthetic.synthesize(tmp_path / "data", "zipper", n_train=4, n_test_normal=2, n_test_defect=2,
                                resolution=64, seed=0)
    argv = ["--quick", "--methods", "idif", "--categories", "zipper", "--seeds", "1", "--data-root", str(root),
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--threads", "1"]
    runs = bench.main(argv)
    assert set(runs) == {"idif/zipper/42/fp32", "idif/zipper/42/auto"}
    assert runs["idif/zipper/42/fp32"]["ran"] == "fp32"
    assert runs["idif/zipper/42/auto"]["ran"] == runtime.resolve_precision("auto", torch.device("cpu"))[0]
    for run in runs.values():
        assert 0.0 <= run["sample_auroc"] <= 1.0 and run["seconds"] > 0
    saved = json.loads((tmp_path / "out" / "precision_quick.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(runs))
    assert "| idif | zipper | fp32 (fp32) | 42 |" in (tmp_path / "out" / "precision_quick.md").read_text()

    def no_training(cfg):
        raise AssertionError(f"{cfg.out} was trained again")

    monkeypatch.setattr(bench.train, "main", no_training)
    capsys.readouterr()
    assert bench.main(argv) == saved["runs"]
    assert "0 runs to do" in capsys.readouterr().out


def test_the_table_pairs_the_arms_seed_by_seed(bench_script):
    bench = bench_script("precision")
    figures = dict.fromkeys(bench.ablations.METRICS, 0.9)

    def run(seed, arm, auroc, seconds):
        return {"method": "mvad", "category": "zipper", "seed": seed, "arm": arm, "ran": "bf16" if arm == "auto"
                else "fp32", **figures, "sample_auroc": auroc, "seconds": seconds}

    runs = {bench.key("mvad", "zipper", s, arm): run(s, arm, a, t) for s, arm, a, t in
            [(42, "fp32", 0.90, 100.0), (42, "auto", 0.92, 60.0), (43, "fp32", 0.95, 110.0), (43, "auto", 0.94, 55.0),
             (44, "fp32", 0.91, 100.0)]}  # seed 44 has no auto arm: it is not paired
    assert [(a["seed"], b["seed"]) for a, b in bench.paired(runs, "mvad", "zipper")] == [(42, 42), (43, 43)]
    table = bench.markdown(runs, {"cpu": "test", "logical_cpus": 2, "torch": "x", "torch_threads": 1})
    assert "| mvad | zipper | fp32 (fp32) | 42, 43, 44 | 92.0 ± 2.6 |" in table
    assert "| mvad | zipper | auto (bf16) | 42, 43 | 93.0 ± 1.4 |" in table
    assert "| mvad | zipper | +2.0, -1.0 | +0.0, +0.0 |" in table and "| 0.60x, 0.50x |" in table
