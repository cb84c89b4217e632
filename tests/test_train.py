"""train.py end to end on tiny configs: both methods, resume, atomic checkpoints, DDP with 2 CPU
processes, and the one-line errors of bad input."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import train

ROOT = Path(__file__).resolve().parents[1]
# Small models: MVAS with few windows, a small voxel; 64x64 images, 4 + 2 + 2 synthetic samples.
TINY_MODEL = {"mvad": {"n_win": (2, 2, 2), "blocks": (1, 1, 1)},
              "idif": {"voxel_size": (2, 4, 4), "fusion_blocks": 1},
              "patchcore": {"backbone": "resnet18", "width": 64}}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny synthetic zipper in the Real-IAD layout, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("synthetic")
    data.synthesize(out, "zipper", n_train=4, n_test_normal=2, n_test_defect=2, resolution=64, seed=0)
    return out


def tiny(method: str, synthetic: Path, out: Path, **changes) -> train.TrainConfig:
    cfg = train.TrainConfig(method=method, category="zipper", data_root=str(synthetic), out=str(out),
                            epochs=1, batch_size=2, image_size=64, weights="none", device="cpu",
                            model=TINY_MODEL[method])
    return dataclasses.replace(cfg, **changes)


@pytest.mark.parametrize("method", ["mvad", "idif"])
def test_tiny_run_trains_checkpoints_and_evaluates(method, synthetic, tmp_path):
    metrics = train.main(tiny(method, synthetic, tmp_path))
    for level, keys in (("sample", ("auroc", "ap", "f1_max")), ("image", ("auroc", "ap", "f1_max")),
                        ("pixel", ("auroc", "ap", "f1_max", "aupro"))):
        for key in keys:
            assert 0.0 <= metrics[level][key] <= 1.0, (level, key)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["method"] == method and state["epoch"] == 1
    assert state["train"]["data_root"] == str(synthetic)
    assert state["config"]["image_size"] == 64
    assert set(json.loads((tmp_path / "metrics.json").read_text())) >= {"sample", "image", "pixel"}
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == 1 and history[0]["loss"] > 0
    parts = {"distill", "ib", "kl", "sigma"} if method == "idif" else set()  # IDIF logs its loss parts
    assert parts <= set(history[0]) and all(history[0][p] > 0 for p in parts)
    assert (tmp_path / "roc.png").is_file() and list(tmp_path.glob("example_*.png"))


def test_patchcore_fits_a_memory_bank_without_epochs_and_resumes_without_refitting(synthetic, tmp_path,
                                                                                   capsys, monkeypatch):
    metrics = train.main(tiny("patchcore", synthetic, tmp_path))
    printed = capsys.readouterr().out
    assert "training-free" in printed and "memory bank: 125 of 1280 training patches in 5 bank(s)" in printed
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["method"] == "patchcore" and "optimizer" not in state
    assert state["model"]["memory_bank"].shape == (5, 25, 64)  # per camera: 10% of 4 samples x 8 x 8 patches
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[0]["bank_size"] == 125 and history[0]["seconds"] > 0
    assert 0.0 <= metrics["sample"]["auroc"] <= 1.0 and 0.0 <= metrics["pixel"]["aupro"] <= 1.0
    assert (tmp_path / "metrics.md").is_file() and (tmp_path / "roc.png").is_file()

    def no_refit(*args, **kwargs):
        raise AssertionError("--resume refitted the memory bank")

    monkeypatch.setattr("patchcore.PatchCore.fit", no_refit)
    again = train.main(dataclasses.replace(tiny("patchcore", synthetic, tmp_path), resume=True))
    assert again["sample"] == metrics["sample"] and again["pixel"] == metrics["pixel"]
    parsed = train.parse_args(["--method", "patchcore", "--set", "per_camera=false", "--set", "coreset_fraction=0.01"])
    assert parsed.model == {"per_camera": False, "coreset_fraction": 0.01}


class Interrupted(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(synthetic, tmp_path, monkeypatch):
    straight = tiny("idif", synthetic, tmp_path / "straight", epochs=2, evaluate=False)
    train.main(straight)

    # The same run, killed right after the first epoch's checkpoint, then resumed.
    broken = dataclasses.replace(straight, out=str(tmp_path / "broken"))
    save = train.save_atomically

    def save_then_die(state, path):
        save(state, path)
        raise Interrupted

    monkeypatch.setattr(train, "save_atomically", save_then_die)
    with pytest.raises(Interrupted):
        train.main(broken)
    monkeypatch.setattr(train, "save_atomically", save)
    assert torch.load(tmp_path / "broken" / "last.pt", weights_only=True)["epoch"] == 1
    train.main(dataclasses.replace(broken, resume=True))

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "broken" / "last.pt", weights_only=True)
    assert b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=0, msg=name)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_a_crash_while_saving_keeps_the_previous_checkpoint(synthetic, tmp_path, monkeypatch):
    cfg = tiny("mvad", synthetic, tmp_path, epochs=2, evaluate=False)
    real_save = torch.save
    calls = []

    def half_written(obj, f):
        calls.append(1)
        if len(calls) == 2:  # the second epoch's save dies after writing a few bytes
            f.write(b"PK\x03\x04 half a checkpoint")
            raise Interrupted
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(Interrupted):
        train.main(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1


def test_the_last_partial_batch_is_dropped(synthetic, tmp_path, monkeypatch, capsys):
    """As the official loader (drop_last=True): 4 samples in batches of 3 make one step per epoch;
    with fewer samples than a batch, the batch shrinks to them and the run says so in one line."""
    steps = []
    step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda net, opt, batch, *a: steps.append(len(batch["images"]))
                        or step(net, opt, batch, *a))
    train.main(tiny("mvad", synthetic, tmp_path / "three", batch_size=3, evaluate=False))
    assert steps == [3]
    steps.clear()
    train.main(tiny("mvad", synthetic, tmp_path / "eight", batch_size=8, evaluate=False))
    assert steps == [4]
    assert "only 4 training samples, fewer than --batch-size 8: training with batch 4" in capsys.readouterr().out
    assert torch.load(tmp_path / "eight" / "last.pt", weights_only=True)["train"]["batch_size"] == 4
    with pytest.raises(data.UserError, match=r"^4 training samples cannot be shared by 6 processes"):
        train.fit_batch(tiny("mvad", synthetic, tmp_path, batch_size=8), 4, 6, print)


def test_runs_off_the_papers_settings_say_so_in_one_line():
    state = {"method": "idif", "train": {"category": "zipper", "image_size": 128, "batch_size": 4},
             "epoch": 15, "random_encoder": True}
    note = train.protocol_note(state, Path("/data/Real-IAD"), view_norm=True)
    assert note == ("Not the papers' settings: image size 128 (papers: 256); batch 4 (papers: 8); epochs 15 "
                    "(papers: 100); view-norm on (papers: off); random-init encoder calibrated on the training "
                    "images (papers: ImageNet). The papers' protocol: python train.py --method idif --category "
                    "zipper --data-root /data/Real-IAD --image-size 256 --batch-size 8 --epochs 100 "
                    "--no-view-norm --weights imagenet")
    papers = {"method": "mvad", "train": {"category": "all", **train.PROFILES["gpu"]}, "epoch": 100}
    assert train.protocol_note(papers, Path("/data/Real-IAD"), view_norm=False) is None
    synthetic = train.protocol_note(papers, data.SYNTHETIC_CACHE / "zipper-40-30-30-256px-seed0-v3", False)
    assert synthetic.endswith("built-in synthetic data (papers: Real-IAD). The papers' protocol: python train.py "
                              "--method mvad --category all --data-root /path/to/Real-IAD --image-size 256 "
                              "--batch-size 8 --epochs 100 --no-view-norm --weights imagenet")


def test_set_parses_config_fields():
    cfg = train.parse_args(["--method", "mvad", "--set", "n_win=8,4,2", "--set", "topk=2",
                            "--set", "dropout=0.2"])
    assert cfg.model == {"n_win": (8, 4, 2), "topk": 2, "dropout": 0.2}
    assert cfg.epochs is None and cfg.image_size is None  # filled from the profile later


def test_cpu_profile_is_used_without_a_gpu():
    cfg = train.resolve(train.TrainConfig(method="mvad", device="cpu"))
    assert (cfg.image_size, cfg.batch_size, cfg.epochs, cfg.view_norm) == tuple(
        train.PROFILES["cpu"][k] for k in ("image_size", "batch_size", "epochs", "view_norm"))
    assert cfg.out == "runs/mvad_zipper"


def test_flags_override_the_profile():
    cfg = train.resolve(train.parse_args(["--device", "cpu", "--no-view-norm", "--epochs", "3"]))
    assert cfg.view_norm is False and cfg.epochs == 3
    assert train.resolve(train.parse_args(["--device", "cpu"])).view_norm is train.PROFILES["cpu"]["view_norm"]


def run_cli(*args, cwd=ROOT, env=None, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("args, message", [
    (["--method", "padim"], "invalid choice: 'padim'"),
    (["--category", "spoon", "--data-root", "{synthetic}"], "unknown category 'spoon'"),
    (["--data-root", "{tmp}/nowhere"], "--data-root {tmp}/nowhere: no such folder"),
    (["--data-root", "{synthetic}", "--out", "/proc/forbidden"], "--out /proc/forbidden: cannot write"),
    (["--data-root", "{synthetic}", "--out", "{tmp}/fresh", "--resume"], "--resume: no checkpoint at"),
    (["--method", "mvad", "--set", "wings=2"], "--set wings=2: expected NAME=VALUE"),
    (["--method", "mvad", "--set", "topk=many"], "--set topk=many: 'many' is not a valid int"),
])
def test_bad_input_gives_one_line_and_exit_2(args, message, synthetic, tmp_path):
    fill = {"synthetic": str(synthetic), "tmp": str(tmp_path)}
    result = run_cli("train.py", *[a.format(**fill) for a in args], "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert message.format(**fill) in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_image_names_the_file(synthetic, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synthetic, broken)
    bad = sorted(broken.rglob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    result = run_cli("train.py", "--data-root", str(broken), "--out", str(tmp_path / "run"),
                     "--image-size", "64", "--epochs", "1", "--weights", "none", "--device", "cpu",
                     "--method", "mvad", "--set", "n_win=2,2,2")
    assert result.returncode == 2, result.stderr
    assert bad.name in result.stderr and "Traceback" not in result.stderr


def test_ddp_with_two_cpu_processes(synthetic, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                     "--method", "mvad", "--data-root", str(synthetic), "--out", str(tmp_path),
                     "--image-size", "64", "--epochs", "1", "--batch-size", "2", "--weights", "none",
                     "--device", "cpu", "--set", "n_win=2,2,2", "--set", "blocks=1,1,1",
                     env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 1/1") == 1  # rank 0 alone logs
    assert "2 process(es)" in result.stdout
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["sample"]["auroc"] is not None
