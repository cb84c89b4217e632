"""train.py end to end on tiny configs: both methods, resume, atomic checkpoints, DDP with 2 CPU
processes (and the GPUs' SyncBatchNorm conversion), and the one-line errors of bad input."""
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import train
from eval import EvalConfig, load_model
from eval import main as evaluate_run
from mvad import FrozenEncoder

ROOT = Path(__file__).resolve().parents[1]
# Small models: MVAS with few windows, a small voxel; 64x64 images, 4 + 2 + 2 synthetic samples.
TINY_MODEL = {"mvad": {"n_win": (2, 2, 2), "blocks": (1, 1, 1)},
              "idif": {"voxel_size": (2, 4, 4), "fusion_blocks": 1}}


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
    assert (tmp_path / "roc.png").is_file() and list(tmp_path.glob("example_*.png"))


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
    (["--method", "patchcore"], "invalid choice: 'patchcore'"),
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_process(rank: int, world: int, port: int, argv: list, states: Path) -> None:
    """One process of a DDP run on CPU processes, started as torchrun starts one (its environment
    variables), running train.py's command line; it saves its model's state at the end of every
    epoch, after the BatchNorm statistics are shared."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the processes share the cores
    share = train.share_batchnorm_statistics

    def share_and_save(model):
        share(model)
        torch.save(model.state_dict(), states / f"rank{rank}.pt")

    train.share_batchnorm_statistics = share_and_save
    assert train.cli(argv) == 0


def test_ddp_with_two_cpu_processes(synthetic, tmp_path, capfd):
    """Two CPU processes (gloo): rank 0 alone logs and checkpoints, says once what differs from the
    GPUs' SyncBatchNorm, the ranks end the epoch with the same parameters and buffers (the
    checkpoint's), and the evaluation sharded over both gives the one-process metrics."""
    argv = ["--method", "mvad", "--data-root", str(synthetic), "--out", str(tmp_path), "--image-size", "64",
            "--epochs", "1", "--batch-size", "2", "--weights", "none", "--device", "cpu", "--set", "n_win=2,2,2",
            "--set", "blocks=1,1,1"]
    torch.multiprocessing.spawn(ddp_process, args=(2, free_port(), argv, tmp_path), nprocs=2)
    out = capfd.readouterr().out
    assert out.count("epoch 1/1") == 1  # rank 0 alone logs
    assert "2 process(es)" in out and out.count("CPU processes: no SyncBatchNorm") == 1
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert state["epoch"] == 1 and state["model"].keys() == ranks[0].keys() == ranks[1].keys()
    for name, value in state["model"].items():
        assert torch.equal(ranks[0][name], value) and torch.equal(ranks[1][name], value), name
    written = json.loads((tmp_path / "metrics.json").read_text())
    single = evaluate_run(EvalConfig(checkpoint=str(tmp_path / "last.pt"), device="cpu", view_norm=True,
                                     out=str(tmp_path / "one")))
    assert written["sample"]["auroc"] is not None
    assert [written[level] for level in ("sample", "image")] == [single[level] for level in ("sample", "image")]


def test_a_global_batch_that_the_processes_cannot_share_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert train.cli(["--batch-size", "3", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("error: --batch-size 3: the global batch is split evenly over the 2 processes, "
                                       "so it must be a multiple of 2\n")


@pytest.mark.parametrize("method", ["mvad", "idif"])
def test_synchronised_batchnorm_spares_the_frozen_encoders_and_keeps_the_checkpoint(method, tmp_path):
    """The GPUs' SyncBatchNorm conversion (its forward needs GPUs; the conversion runs anywhere): every
    trainable BatchNorm converted, the frozen encoders' left, the same tensors under the same names,
    and eval.py loads the checkpoint into the plain model."""
    cfg = tiny(method, tmp_path, tmp_path)
    model_cfg, model, optimizer = train.build_model(cfg, 5, torch.device("cpu"))
    before = dict(model.state_dict())
    trainable = len(train.trainable_batchnorms(model))
    assert train.synchronise_batchnorm(model) is model
    for module in model.modules():
        if isinstance(module, FrozenEncoder):
            assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())
            assert any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    synced = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert len(synced) == trainable > 0
    assert any(p is synced[0].weight for group in optimizer.param_groups for p in group["params"])
    state = model.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in before)
    torch.save({"method": method, "config": dataclasses.asdict(model_cfg), "model": state}, tmp_path / "last.pt")
    loaded, _ = load_model(str(tmp_path / "last.pt"))
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in loaded.modules())
    assert all(torch.equal(loaded.state_dict()[k], before[k]) for k in before)
