"""train.py end to end on tiny configs: both methods, the encoder's calibration, the optimiser
recipe, resume, atomic checkpoints and a full disk, DDP with 2 CPU processes (and the GPUs'
SyncBatchNorm conversion), and the one-line errors of bad input."""
import ast
import dataclasses
import errno
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
from synthetic import SYNTHETIC_CACHE, synthesize

ROOT = Path(__file__).resolve().parents[1]
# Small models: MVAS with few windows, a small voxel, one narrow transformer layer each, narrow heads;
# 64x64 images, 4 + 2 + 2 synthetic samples.
TINY_MODEL = {"mvad": {"n_win": (2, 2, 2), "blocks": (1, 1, 1)},
              "idif": {"voxel_size": (2, 4, 4), "fusion_blocks": 1},
              "patchcore": {"backbone": "resnet18", "width": 64},
              "uniad": {"hidden_dim": 32, "num_heads": 4, "encoder_layers": 1, "decoder_layers": 1, "ffn_dim": 64,
                        "neighbor_size": 3},
              "simplenet": {"backbone": "resnet18", "width": 64, "hidden": 32}}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny synthetic zipper in the Real-IAD layout, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("synthetic")
    synthesize(out, "zipper", n_train=4, n_test_normal=2, n_test_defect=2, resolution=64, seed=0)
    return out


def tiny(method: str, synthetic: Path, out: Path, **changes) -> train.TrainConfig:
    cfg = train.TrainConfig(method=method, category="zipper", data_root=str(synthetic), out=str(out),
                            epochs=1, batch_size=2, image_size=64, weights="none", device="cpu",
                            model=TINY_MODEL[method])
    return dataclasses.replace(cfg, **changes)


@pytest.mark.parametrize("method, cpu, precision", [("mvad", {"avx2": True}, "fp32"),
                                                    ("idif", {"amx_bf16": True}, "bf16")])
def test_tiny_run_trains_checkpoints_and_evaluates(method, cpu, precision, synthetic, tmp_path, monkeypatch, capsys):
    """Also --precision auto on a CPU without and with bf16 instructions (mocked): the start-up line
    names the choice, history.json and metrics.json record it."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: cpu)
    metrics = train.main(tiny(method, synthetic, tmp_path))
    assert f"precision {precision} (auto: " in capsys.readouterr().out.splitlines()[0]
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
    assert history[0]["precision"] == metrics["settings"]["precision"] == precision
    parts = {"distill", "ib", "kl", "sigma"} if method == "idif" else set()  # IDIF logs its loss parts
    assert parts <= set(history[0]) and all(history[0][p] > 0 for p in parts)
    assert (tmp_path / "roc.png").is_file() and list(tmp_path.glob("example_*.png"))
    # without ImageNet weights the frozen encoder (MVAD) or teacher (IDIF) was calibrated before
    # training, saved so, and eval.load_model rebuilds it calibrated
    prefix = "encoder." if method == "mvad" else "teacher."
    assert state["random_encoder"] and bool(state["model"][prefix + "bn_ready"])
    mean, var = state["model"][prefix + "bn1.running_mean"], state["model"][prefix + "bn1.running_var"]
    assert mean.abs().min() > 1e-6 and (var - 1).abs().min() > 1e-6  # no channel left at 0 / 1
    model, _ = load_model(str(tmp_path / "last.pt"))
    encoder = model.encoder if method == "mvad" else model.teacher
    assert not encoder.needs_calibration
    assert torch.equal(encoder.bn1.running_var, var)
    assert torch.equal(encoder.layer3[1].bn2.running_mean, state["model"][prefix + "layer3.1.bn2.running_mean"])
    assert "random-init encoder calibrated on the training images" in (tmp_path / "metrics.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs these on one)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", list(TINY_MODEL))
def test_tiny_run_on_cuda(method, precision, synthetic, tmp_path):
    """Where a GPU is present: each method trains an epoch (or fits) and evaluates on it, in float32 and
    under bf16 autocast; metrics.json records the device and the precision, and every metric is defined."""
    metrics = train.main(tiny(method, synthetic, tmp_path, device="cuda", precision=precision))
    assert metrics["settings"]["device"].startswith("cuda") and metrics["settings"]["precision"] == precision
    for level in ("sample", "image", "pixel"):
        assert 0.0 <= metrics[level]["auroc"] <= 1.0, level
    assert torch.load(tmp_path / "last.pt", weights_only=True)["method"] == method


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


def assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical weights, optimizer moments and losses."""
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=0, msg=name)
    moments_a, moments_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert moments_a.keys() == moments_b.keys()
    for index in moments_a:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments_a[index][key], moments_b[index][key], rtol=0, atol=0)
    assert a["scheduler"] == b["scheduler"]
    assert [(h["loss"], h["lr"]) for h in a["history"]] == [(h["loss"], h["lr"]) for h in b["history"]]


@pytest.mark.parametrize("stopped_after, drops_at", [(2, 8), (5, 4)])
def test_an_extended_run_drops_its_rate_once_where_its_new_length_says(stopped_after, drops_at):
    """A 5-epoch run (milestone 4) extended to 10 epochs (milestone 8): stopped before its drop, it drops
    at 8 as a 10-epoch run would; stopped after it, the rate stays dropped and does not drop again."""
    def scheduler(milestone):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [milestone], gamma=0.1)

    short = scheduler(4)
    for _ in range(stopped_after):
        short.optimizer.step()
        short.step()
    extended = scheduler(8)  # then the checkpoint's states, in resume_or_calibrate's order
    extended.optimizer.load_state_dict(short.optimizer.state_dict())
    train.restore_schedule(extended, short.state_dict(), stopped_after)
    rates = {}
    for epoch in range(stopped_after, 10):
        rates[epoch] = extended.get_last_lr()[0]
        extended.optimizer.step()
        extended.step()
    assert all(rate == pytest.approx(1.0 if epoch < drops_at else 0.1) for epoch, rate in rates.items()), rates


# One method per worker setting, to keep the suite short: IDIF (whose pseudo-anomalies are drawn in
# the workers) killed after its first epoch and resumed with 2 workers; MVAD finished after one
# epoch and extended with --epochs 2. Both against the same run done in one go with 0 workers.
# (Both schedules decay at epoch 1 (80% of 1 or 2 epochs): a run extended past its decay keeps the
# stored milestone, so it cannot equal a longer run in general; see restore_schedule.) UniAD killed;
# SimpleNet, whose rate never drops (lr_decay_at 1), extended.
@pytest.mark.parametrize("method, workers, how", [("idif", 2, "killed"), ("mvad", 0, "extended"),
                                                  ("uniad", 0, "killed"), ("simplenet", 0, "extended")])
def test_resume_equals_an_uninterrupted_run(method, workers, how, synthetic, tmp_path, monkeypatch, capsys):
    straight = tiny(method, synthetic, tmp_path / "straight", epochs=2, evaluate=False)
    train.main(straight)
    resumed = dataclasses.replace(straight, out=str(tmp_path / "resumed"), workers=workers)
    if how == "killed":
        save = train.save_atomically

        def save_then_die(state, path):
            save(state, path)
            raise Interrupted

        monkeypatch.setattr(train, "save_atomically", save_then_die)
        with pytest.raises(Interrupted):
            train.main(resumed)
        monkeypatch.setattr(train, "save_atomically", save)
    else:
        train.main(dataclasses.replace(resumed, epochs=1))  # a finished run of one epoch
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 1
    capsys.readouterr()
    train.main(dataclasses.replace(resumed, resume=True, epochs=2 if how == "extended" else None))
    assert f"Resuming {tmp_path / 'resumed' / 'last.pt'} after epoch 1 of 2" in capsys.readouterr().out

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert b["epoch"] == 2 and b["train"]["epochs"] == 2
    assert_same_state(a, b)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(synthetic, tmp_path, monkeypatch, capsys):
    """A save killed halfway leaves its temporary file behind and last.pt as it was; the next run
    says which epoch it found there and finishes the run, replacing the leftover."""
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
    assert (tmp_path / "last.pt.tmp").read_bytes() == b"PK\x03\x04 half a checkpoint"
    capsys.readouterr()
    train.main(dataclasses.replace(cfg, resume=True))
    assert f"Resuming {tmp_path / 'last.pt'} after epoch 1 of 2" in capsys.readouterr().out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    assert not (tmp_path / "last.pt.tmp").exists()


def test_a_full_disk_gives_one_line_naming_the_folder(synthetic, tmp_path, monkeypatch):
    (tmp_path / "last.pt").write_bytes(b"the previous checkpoint")

    def no_space(obj, f):
        f.write(b"a few bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(data.UserError) as error:
        train.main(tiny("mvad", synthetic, tmp_path, evaluate=False))
    assert str(error.value) == (f"{tmp_path}: cannot save last.pt (No space left on device); free space there "
                                "or choose another --out")
    assert (tmp_path / "last.pt").read_bytes() == b"the previous checkpoint"
    assert not (tmp_path / "last.pt.tmp").exists()


def test_the_optimiser_recipe(synthetic, tmp_path, monkeypatch):
    """MVAD's official recipe, read back from a 5-epoch run: AdamW with weight decay on conv and
    linear weights only (not on biases and norms), lr = 0.005 x images per step / 16 (2 samples of
    5 views: 0.003125), x0.1 for the last 20% of the epochs; history.json logs the rate each epoch
    trained with."""
    used, trained = [], []
    step = train.train_step

    def spy(net, optimizer, batch, *args):
        used.extend(group["lr"] for group in optimizer.param_groups)
        trained.append((net, optimizer))
        return step(net, optimizer, batch, *args)

    monkeypatch.setattr(train, "train_step", spy)
    train.main(tiny("mvad", synthetic, tmp_path, epochs=5, evaluate=False))
    base = 0.005 * 2 * 5 / 16
    assert used == pytest.approx([base] * 16 + [base * 0.1] * 4)  # 2 steps per epoch, 2 groups
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["lr"] for h in history] == pytest.approx([base] * 4 + [base * 0.1])

    model, optimizer = trained[0]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]
    decayed, plain = ({id(p) for p in g["params"]} for g in optimizer.param_groups)
    norms = (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decayed | plain == trainable and not decayed & plain
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:  # the frozen encoder
                continue
            if name == "bias" or isinstance(module, norms):
                assert id(p) in plain, (type(module).__name__, name)
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                assert id(p) in decayed, (type(module).__name__, name)


def test_gradients_are_clipped_at_norm_5(synthetic, tmp_path):
    cfg = train.resolve(tiny("mvad", synthetic, tmp_path))
    _, model, optimizer = train.build_model(cfg, 5, torch.device("cpu"))
    images = torch.randn(2, 5, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def grad_norm():
        return torch.stack([p.grad.double().norm() for p in model.parameters() if p.grad is not None]).norm().item()

    torch.manual_seed(0)
    model(images).backward()
    raw = grad_norm()
    assert raw > 10  # clipping has something to do
    torch.manual_seed(0)
    train.train_step(model, optimizer, {"images": images}, "mvad", torch.device("cpu"), model.cfg.clip)
    assert grad_norm() == pytest.approx(5.0, rel=1e-4)  # the gradients the step used


def test_the_epoch_line_and_the_studys_losses_are_the_loss_and_its_parts():
    """train.loss_parts serves the epoch's summary line and bench/ablations.py's last_losses: the
    bookkeeping keys are left out, and a memory bank's fit (PatchCore) has no loss at all."""
    entry = {"epoch": 3, "loss": 0.5, "distill": 0.375, "ib": 0.125, "seconds": 2.0, "samples_per_s": 8.0,
             "lr": 1e-3, "precision": "bf16"}
    assert train.loss_parts(entry) == {"loss": 0.5, "distill": 0.375, "ib": 0.125}
    assert train.epoch_summary(entry) == "loss 0.5000  distill 0.3750  ib 0.1250  2.0 s  8.0 samples/s"
    assert train.loss_parts({"patches": 10, "bank_size": 4, "banks": 1, "seconds": 1.0}) == {}


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
    synthetic = train.protocol_note(papers, SYNTHETIC_CACHE / "zipper-40-30-30-256px-seed0-v3", False)
    assert synthetic.endswith("built-in synthetic data (papers: Real-IAD). The papers' protocol: python train.py "
                              "--method mvad --category all --data-root /path/to/Real-IAD --image-size 256 "
                              "--batch-size 8 --epochs 100 --no-view-norm --weights imagenet")



def test_the_synthetic_note_holds_when_the_cache_folder_is_a_link(tmp_path, monkeypatch):
    """data/ as a symbolic link to a disk elsewhere: the root resolves through it, so the cache must too."""
    import synthetic as synthetic_module
    (tmp_path / "disk" / "zipper-40-30-30-256px-seed0-v4").mkdir(parents=True)
    (tmp_path / "data").symlink_to(tmp_path / "disk")
    monkeypatch.setattr(synthetic_module, "SYNTHETIC_CACHE", tmp_path / "data")
    papers = {"method": "mvad", "train": {"category": "all", **train.PROFILES["gpu"]}, "epoch": 100}
    note = train.protocol_note(papers, tmp_path / "data" / "zipper-40-30-30-256px-seed0-v4", False)
    assert note is not None and "built-in synthetic data (papers: Real-IAD)" in note

def test_set_parses_config_fields():
    cfg = train.parse_args(["--method", "mvad", "--set", "n_win=8,4,2", "--set", "topk=2",
                            "--set", "dropout=0.2"])
    assert cfg.model == {"n_win": (8, 4, 2), "topk": 2, "dropout": 0.2}
    assert cfg.epochs is None and cfg.image_size is None  # filled from the profile later


def test_cpu_profile_is_used_without_a_gpu():
    cfg = train.resolve(train.TrainConfig(method="idif", device="cpu"))
    assert (cfg.image_size, cfg.batch_size, cfg.epochs, cfg.view_norm) == (128, 4, 15, True)
    assert cfg.out == "runs/idif_zipper"
    # MVAD's CPU profile differs in the image size only; a flag still wins over it
    cfg = train.resolve(train.TrainConfig(method="mvad", device="cpu"))
    assert (cfg.image_size, cfg.batch_size, cfg.epochs, cfg.view_norm) == (96, 4, 15, True)
    assert train.resolve(train.TrainConfig(method="mvad", device="cpu", image_size=128)).image_size == 128


def test_flags_override_the_profile():
    cfg = train.resolve(train.parse_args(["--device", "cpu", "--no-view-norm", "--epochs", "3"]))
    assert cfg.view_norm is False and cfg.epochs == 3
    assert train.resolve(train.parse_args(["--device", "cpu"])).view_norm is train.PROFILES["cpu"]["view_norm"]


def test_bf16_autocast_step_on_the_cpu(synthetic, tmp_path):
    cfg = train.resolve(tiny("mvad", synthetic, tmp_path))
    batch = next(iter(torch.utils.data.DataLoader(train.training_set(cfg, synthetic), batch_size=2)))
    losses = []
    for precision in ("fp32", "bf16"):
        _, model, optimizer = train.build_model(cfg, 5, torch.device("cpu"))
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        losses.append(train.train_step(model, optimizer, batch, "mvad", torch.device("cpu"), model.cfg.clip,
                                       precision)["loss"])
        after = [p for p in model.parameters() if p.requires_grad]
        assert all(torch.isfinite(p).all() for p in after) and any((a != b).any() for a, b in zip(after, before))
    assert losses[1] == pytest.approx(losses[0], rel=0.05)  # bf16 keeps 8 bits of mantissa


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
    (["--method", "mvad", "--data-root", "{synthetic}", "--image-size", "64", "--out", "{tmp}/run",
      "--set", "n_win=2,2,2", "--set", "topk=0"], "error: topk 0 must be at least 1"),  # MVADConfig's ValueError
    (["--threads", "0"], "--threads 0: must be at least 1"),
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


def test_train_takes_its_process_set_up_from_runtime_not_from_eval():
    """train.py asks eval.py only for the evaluation (its config, main, the papers' settings and the
    protocol note); device, threads, precision, compile and the process group come from runtime.py."""
    tree = ast.parse((ROOT / "train.py").read_text())
    from_eval = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "eval"
                 for alias in node.names}
    assert from_eval == {"PAPER_SETTINGS", "EvalConfig", "category_list", "protocol_note", "main"}
