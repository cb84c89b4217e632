"""bench/ablations.py in quick mode: every variant's entry and table row are written, a second call
trains nothing again, the missing-view curves use the same draws for every variant, and the verdict
rule on hand-made numbers."""
import json

import pytest

import data
import synthetic

VARIANTS = "mvad-oracle,rd,idif,patchcore"


def test_quick_runs_then_curves_on_paired_draws_and_a_second_call_skips_them(tmp_path, capsys, monkeypatch,
                                                                              bench_script):
    ablations = bench_script("ablations")
    root = synthetic.synthesize(tmp_path / "data", "zipper", n_train=4, n_test_normal=2, n_test_defect=2,
                                resolution=64, seed=0)
    argv = ["--quick", "--seeds", "1", "--categories", "zipper", "--variants", VARIANTS, "--data-root", str(root),
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    results = ablations.main(argv)
    assert set(results["runs"]) == {f"zipper/{v}/42" for v in VARIANTS.split(",")}
    for key, run in results["runs"].items():
        assert 0.0 <= run["sample_auroc"] <= 1.0 and 0.0 <= run["pixel_aupro"] <= 1.0, key
        assert run["train_seconds"] > 0 and run["trainable_parameters"] <= run["parameters"], key
        assert run["positives"] == 2 and "missing_views" not in run, key
    runs = results["runs"]
    assert runs["zipper/patchcore/42"]["trainable_parameters"] == 0 and runs["zipper/patchcore/42"]["losses"] == {}
    assert {"loss", "distill", "ib"} <= set(runs["zipper/idif/42"]["losses"])  # the last epoch's, from history.json
    assert runs["zipper/rd/42"]["parameters"] < runs["zipper/mvad-oracle/42"]["parameters"]
    assert f"{len(runs)} runs to do, 0 done" in capsys.readouterr().out

    draws = {}  # variant -> the (K, seed) of every evaluation and camera statistics, in order
    evaluate, statistics = ablations.evaluation.evaluate, ablations.evaluation.camera_statistics

    def recorded(function, name):
        def call(model, dataset, device, **kwargs):
            draws.setdefault(type(model).__name__ + str(getattr(model, "cfg", "")), []).append(
                (name, kwargs.get("drop_views"), kwargs.get("seed")))
            return function(model, dataset, device, **kwargs)
        return call

    monkeypatch.setattr(ablations.evaluation, "evaluate", recorded(evaluate, "evaluate"))
    monkeypatch.setattr(ablations.evaluation, "camera_statistics", recorded(statistics, "statistics"))
    results = ablations.main(argv + ["--curves"])
    assert len(draws) == len(runs) and len({tuple(d) for d in draws.values()}) == 1  # the same draws for all
    assert [d for d in next(iter(draws.values())) if d[0] == "evaluate"] == [("evaluate", k, 0) for k in (1, 2, 3, 4)]
    for key, run in results["runs"].items():
        assert sorted(run["missing_views"]) == ["1", "2", "3", "4"], key
        left = [run["missing_views"][k][0]["positives"] for k in ("1", "2", "3", "4")]
        assert all(a >= b for a, b in zip([2] + left, left)), key
        assert all(run["missing_views"][k][0]["positives_all_views"] == 2 for k in ("1", "2", "3", "4")), key

    saved = json.loads((tmp_path / "out" / "ablations_quick.json").read_text())
    assert saved["results"]["runs"] == json.loads(json.dumps(results["runs"]))
    table = (tmp_path / "out" / "ablations_quick.md").read_text()
    assert all(f"| {ablations.VARIANTS[v][0]} | 1 |" in table for v in VARIANTS.split(","))
    assert "labelled by all the sample's views" in table and "## Verdicts" in table

    def no_training(cfg):
        raise AssertionError(f"{cfg.out} was trained again")

    monkeypatch.setattr(ablations.train, "main", no_training)
    capsys.readouterr()
    assert ablations.main(argv)["runs"] == saved["results"]["runs"]
    assert f"0 runs to do, {len(runs)} done" in capsys.readouterr().out
    longer = ablations.parse_args(argv[:-4] + ["--out", str(tmp_path / "out"), "--epochs", "2"])  # no --runs
    assert longer.json == tmp_path / "out" / "ablations_quick_e2.json"
    assert longer.runs.name == "ablations_quick_e2"  # another schedule: a study of its own
    saved["results"]["settings"]["view_norm"] = not saved["results"]["settings"]["view_norm"]
    (tmp_path / "out" / "ablations_quick.json").write_text(json.dumps(saved))
    with pytest.raises(data.UserError, match="was made with other settings"):
        ablations.main(argv)
    with pytest.raises(data.UserError, match="--variants spade: unknown"):
        ablations.main(argv + ["--variants", "mvad,spade"])


def test_paired_differences_pair_the_seeds_both_variants_ran(bench_script):
    runner = bench_script("ablations")
    runs = {f"{v}/{seed}": {"category": "zipper", "variant": v, "seed": seed, "sample_auroc": score}
            for v, scores in {"mvad": {42: 0.90, 43: 0.80, 44: 0.70}, "rd": {42: 0.85, 44: 0.72}}.items()
            for seed, score in scores.items()}
    runs["other"] = {"category": "audiojack", "variant": "rd", "seed": 43, "sample_auroc": 0.1}
    differences = runner.paired_differences(runs, "zipper", "mvad", "rd", "sample_auroc")
    assert differences.keys() == {42, 44}  # seed 43 has no zipper RD run
    assert differences[42] == pytest.approx(0.05) and differences[44] == pytest.approx(-0.02)
    # a curve's point: a seed's mean over its draws, for the seeds whose runs both have curves
    runs["mvad/42"]["missing_views"] = {"3": [{"sample_auroc_all_views": x} for x in (0.80, 0.90)]}
    runs["rd/42"]["missing_views"] = {"3": [{"sample_auroc_all_views": x} for x in (0.70, None)]}
    runs["mvad/44"]["missing_views"] = {"3": [{"sample_auroc_all_views": 0.5}]}  # rd/44 has no curves
    differences = runner.paired_differences(runs, "zipper", "mvad", "rd", ("sample_auroc_all_views", 3))
    assert differences.keys() == {42} and differences[42] == pytest.approx(0.85 - 0.70)


def test_verdict_is_undecided_when_the_gap_is_within_the_two_spreads(bench_script):
    verdict = bench_script("ablations").verdict
    assert verdict((0.90, 0.02, 3), (0.80, 0.03, 3)) == "supported"  # 10 points apart, spreads 5 together
    assert verdict((0.80, 0.03, 3), (0.90, 0.02, 3)) == "contradicted"
    assert verdict((0.90, 0.05, 3), (0.85, 0.01, 3)) == "undecided"  # 5 points apart, spreads 6 together
    assert verdict((0.90, 0.0, 1), (0.50, 0.0, 3)) == "undecided"  # one seed decides nothing
    assert verdict((float("nan"), 0.0, 3), (0.5, 0.0, 3)) == "undecided"
