"""Train MVAD, IDIF, UniAD or SimpleNet, or fit PatchCore, on Real-IAD (or the built-in synthetic data), then evaluate.

    python train.py --method idif --category zipper             # offline: synthetic data, CPU or GPU
    python train.py --method patchcore --category zipper        # the single-view baseline: no epochs
    python train.py --method mvad --category all --data-root /data/Real-IAD
    torchrun --nproc_per_node=4 train.py --method mvad --category all --data-root /data/Real-IAD
    python train.py --method uniad --category zipper,audiojack,toy  # the deck's comparators; one model, 3 classes
    python train.py --method idif --category zipper --resume    # continue runs/idif_zipper/last.pt
    python train.py --method mvad --set topk=8 --set n_win=8,8,8  # any MVADConfig / IDIFConfig field

One loop serves every trained method: a batch is (B, V, 3, H, W), the last partial one dropped as in
the official code (`fit_batch`); the losses of MVAD, UniAD and SimpleNet need only the clean views,
IDIF's also the pseudo-anomalous ones (data.PseudoAnomalies). The optimiser recipe is in each method's
config (the fields of mvad.TrainingRecipe: base_lr, weight_decay, clip, lr_decay_at; SimpleNet's two
parts train at their own rates, its `parameter_groups`). PatchCore (patchcore.py) is training-free: one
pass over the training images fills its memory bank, saved in last.pt. After the last epoch (or the
fit) the run is evaluated by eval.py's `main` (metrics.json, metrics.md and pictures in --out); a run
whose settings are not the papers' says so in one line (eval.protocol_note).

Profiles: with a GPU the defaults are the papers' settings (256x256, batch 8 samples, 100 epochs);
on a CPU a small profile (`PROFILES["cpu"]`: 128x128, batch 4, 15 epochs, per-camera score
normalisation; MVAD and SimpleNet at 96x96, `CPU_METHOD_PROFILES`) keeps the default command within
about five minutes on a 2-core machine (timed in the README's "What to expect"). Every default can
be overridden by its flag.

Reproducibility: the model is initialised from --seed, and the sampler order, the pseudo-anomalies
and every random draw inside the model (dropout, DropPath, view dropout, the bottleneck's noise) are
seeded from (seed, epoch, rank), so a resumed run ends in the same state as an uninterrupted one.
Multi-GPU: under torchrun every process trains on its share of each batch (--batch-size is the
global batch, as the official code's 8 samples, split evenly over the processes) through PyTorch's
DistributedDataParallel (nccl on GPUs, gloo on CPUs), with the trainable BatchNorm layers
synchronised on GPUs (`data_parallel`); rank 0 alone logs and checkpoints, and every process
evaluates its shard of the test split (eval.py). Several machines: README, "Several GPUs and machines".
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
import synthetic
from eval import PAPER_SETTINGS, EvalConfig, category_list, protocol_note
from eval import main as evaluate_run
from mvad import FrozenEncoder, TrainingRecipe, read_torch_file
from runtime import (METHODS, PRECISIONS, autocast, compile_model, distributed_context, distributed_run, place,
                     resolve_device, resolve_precision, setup_process)

# The defaults that depend on the hardware: "gpu" is the papers' setting (MVAD's official
# configs/mvad/mvad_realiad.py; the IDIF paper's 256 px, batch 8); "cpu" trains and evaluates the
# synthetic default within about five minutes on 2 cores.
# view_norm: z-score each camera's image scores with training-split statistics before the max over
# views (eval.py). Off in the papers' setting; on in the CPU profile, where the short
# training leaves one camera's scores far above the others' and the max would hide side-view defects.
PROFILES = {
    "gpu": dict(PAPER_SETTINGS),  # image_size=256, batch_size=8, epochs=100, view_norm=False
    "cpu": dict(image_size=128, batch_size=4, epochs=15, view_norm=True),
}
# An MVAD step costs about twice an IDIF step at 128 px (bench/train.py), which put MVAD's default
# command over five minutes on the slower 2-core machine: on a CPU MVAD trains and evaluates at 96 px,
# which on the synthetic data scored no lower than 128 px (README, "Performance"). SimpleNet's adaptor
# and discriminator see every patch at width 1536, which costs it more than an MVAD step: 96 px too.
CPU_METHOD_PROFILES = {"mvad": dict(image_size=96), "simplenet": dict(image_size=96)}


def profile_for(device: torch.device, method: str | None = None) -> dict:
    """The defaults of a run on this device: the papers' on a GPU, the CPU profile otherwise (with
    `method`'s own values; None: what every method shares)."""
    if device.type == "cuda":
        return PROFILES["gpu"]
    return {**PROFILES["cpu"], **CPU_METHOD_PROFILES.get(method, {})}


@dataclass
class TrainConfig:
    method: str = "idif"  # mvad | idif | patchcore | uniad | simplenet
    category: str = "zipper"  # a Real-IAD category, a comma list, or "all" (multi-class)
    data_root: str | None = None  # Real-IAD folder; None: $REALIAD_ROOT or ./data/realiad, else synthetic
    out: str | None = None  # run folder; None: runs/<method>_<category>
    epochs: int | None = None  # None: the profile's (paper: 100); PatchCore has none
    batch_size: int | None = None  # samples of V views per step, over all processes (paper: 8)
    image_size: int | None = None  # input side in pixels; None: the profile's (paper: 256)
    lr: float | None = None  # None: the method config's base_lr x images per step / 16
    weights: str = "auto"  # frozen encoder: auto | imagenet | none | PATH (mvad.FrozenEncoder)
    device: str | None = None  # None: cuda if available, else cpu
    seed: int = 42  # the official MVAD seed
    workers: int = 0  # DataLoader worker processes
    threads: int | None = None  # torch CPU threads; None: torch's default (the cores)
    compile: bool = False  # torch.compile the model (on a GPU with CUDA graphs: mode reduce-overhead)
    precision: str = "auto"  # auto | fp32 | bf16: bf16 autocast of the forward passes (training and evaluation);
    # auto: bf16 where the device computes it natively (runtime.resolve_precision)
    resume: bool = False  # continue from <out>/last.pt with the run's stored settings
    evaluate: bool = True  # evaluate the last checkpoint on the test split after training
    export_adeval: str | None = None  # the evaluation also writes ADEval's input here (eval.py --export-adeval)
    view_norm: bool | None = None  # per-camera score normalisation in the evaluation; None: the profile's
    model: dict = field(default_factory=dict)  # overrides of MVADConfig / IDIFConfig fields
    synthetic_train: int = 40  # synthetic data only: normal training samples per category
    synthetic_test: int = 30  # synthetic data only: normal and defective test samples (each)


# ----------------------------------------------------------------------------- set-up helpers


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Checks the flags and fills the hardware-dependent defaults from the profile."""
    if cfg.method not in METHODS:
        raise data.UserError(f"--method {cfg.method!r} is unknown; choose one of: {', '.join(METHODS)}")
    device = resolve_device(cfg.device)
    profile = profile_for(device, cfg.method)
    filled = {k: v if getattr(cfg, k) is None else getattr(cfg, k) for k, v in profile.items()}
    for name in ("epochs", "batch_size", "image_size"):
        if filled[name] < 1:
            raise data.UserError(f"--{name.replace('_', '-')} {filled[name]}: must be at least 1")
    if cfg.precision not in PRECISIONS:
        raise data.UserError(f"--precision {cfg.precision!r}: choose one of {', '.join(PRECISIONS)}")
    out = cfg.out or f"runs/{cfg.method}_{cfg.category.replace(',', '+')}"
    return dataclasses.replace(cfg, device=str(device), out=out, **filled)


def model_config(cfg: TrainConfig, num_views: int):
    """The method's config dataclass: its defaults, the run's image size and weights, --set fields."""
    config_class = METHODS[cfg.method][0]
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(cfg.model) - names)
    if unknown:
        raise data.UserError(f"--set {unknown[0]}: not a field of {config_class.__name__}; "
                             f"valid: {', '.join(sorted(names))}")
    values = dict(cfg.model, image_size=cfg.image_size, weights=cfg.weights)
    if "num_views" in names:
        values["num_views"] = num_views
    return config_class(**values)


def parse_field(config_class, assignment: str) -> tuple[str, object]:
    """Parses one `--set NAME=VALUE` into the type of that config field (ints, floats, strings,
    true/false, comma lists for tuples)."""
    name, sep, text = assignment.partition("=")
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    if not sep or name not in defaults:
        raise data.UserError(f"--set {assignment}: expected NAME=VALUE with NAME one of "
                             f"{', '.join(defaults)} ({config_class.__name__})")
    default = defaults[name]
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError
            return name, text.lower() == "true"
        if isinstance(default, tuple):
            return name, tuple(type(default[0])(t) for t in text.split(","))
        return name, type(default)(text)
    except ValueError:
        raise data.UserError(f"--set {assignment}: {text!r} is not a valid {type(default).__name__} "
                             f"(default {default!r})") from None


def data_root_for(cfg: TrainConfig, log) -> Path:
    """Real-IAD when there is one, else the built-in synthetic dataset (said in one line)."""
    root = data.find_real_iad(cfg.data_root)
    if root is not None:
        return root
    categories = cfg.category.split(",")
    root = synthetic.synthetic_root(categories, n_train=cfg.synthetic_train,
                                    n_test_normal=cfg.synthetic_test, n_test_defect=cfg.synthetic_test)
    log(f"Real-IAD not found (no --data-root, $REALIAD_ROOT or ./data/realiad): using the built-in "
        f"synthetic multi-view dataset, {cfg.category}, at {root}")
    return root


def check_writable(out: Path) -> None:
    """Fails early, naming the flag, when the run folder cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise data.UserError(f"--out {out}: cannot write there ({e.strerror}); choose a writable folder")


def training_free(method: str) -> bool:
    """True for PatchCore, whose config has no optimiser recipe: one pass over the training images fills its
    memory bank."""
    return not issubclass(METHODS[method][0], TrainingRecipe)


def build_optimizer(model: torch.nn.Module, model_cfg, lr: float) -> torch.optim.AdamW:
    """AdamW with the config's weight decay on weight matrices and kernels only, not on biases and norms;
    a model whose parts train at their own rates and decays names its groups itself (SimpleNet's
    `parameter_groups(lr)`: the adaptor and the discriminator, as its official two optimisers)."""
    if hasattr(model, "parameter_groups"):
        return torch.optim.AdamW(model.parameter_groups(lr), lr=lr, betas=(0.9, 0.999))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": model_cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def training_set(cfg: TrainConfig, root: Path):
    """The training split of the run's categories; for IDIF wrapped in its pseudo-anomalies."""
    train_set = data.RealIAD(root, category_list(cfg.category), "train", image_size=cfg.image_size)
    return data.PseudoAnomalies(train_set, seed=cfg.seed) if cfg.method == "idif" else train_set


def build_model(cfg: TrainConfig, views: int, device) -> tuple:
    """(the method's config, the model seeded from --seed and placed on `device`, its AdamW; None for
    a training-free method)."""
    torch.manual_seed(cfg.seed)  # the model's initial weights
    model_cfg = model_config(cfg, views)
    model = place(METHODS[cfg.method][1](model_cfg), device)
    if training_free(cfg.method):
        return model_cfg, model, None
    lr = cfg.lr or model_cfg.base_lr * cfg.batch_size * views / 16  # ADer's rule: base rate x images / 16
    return model_cfg, model, build_optimizer(model, model_cfg, lr)


def train_step(net: torch.nn.Module, optimizer, batch: dict, method: str, device, clip: float,
               precision: str = "fp32") -> dict[str, float]:
    """One optimisation step (net: the model, or its DDP or torch.compile wrapper), the gradient norm
    clipped at `clip`; returns the loss and the parts the model reports (IDIF: L_Distill, L_IB, KL,
    mean Sigma) as floats. precision "bf16": the forward pass under bf16 autocast (no loss scaling
    needed for bf16)."""
    with autocast(device, precision):
        parts = training_loss(net, batch, method, device)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    optimizer.step()
    return dict(zip(parts, torch.stack([v.detach() for v in parts.values()]).tolist()))  # one sync


def save_atomically(state: dict, path: Path) -> None:
    """torch.save into a temporary file in the same folder, then rename over `path`: a run killed at
    any moment leaves either the previous checkpoint or the new one, never half a file. A write that
    fails (a full disk) removes the temporary file and ends in a one-line error naming the folder."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise data.UserError(f"{path.parent}: cannot save {path.name} ({e.strerror or e}); free space "
                             "there or choose another --out") from None


def load_checkpoint(path: Path, method: str | None = None) -> dict:
    """Reads a run's last.pt, with one-line errors for a corrupt file or another method's run."""
    state = read_torch_file(path, str(path), "checkpoint", "delete it, or start a new run without --resume")
    if method is not None and state.get("method") != method:
        raise data.UserError(f"{path} holds a {state.get('method')!r} run, not {method!r}; "
                             "use the same --method or another --out")
    return state


def calibrate_frozen_encoders(model: torch.nn.Module, dataset, device, log) -> None:
    """Re-estimates the BatchNorm statistics of random-init frozen encoders on the training images
    (an RD4AD-style prototype on 5-view synthetic data at 128 px: sample AUROC 0.78 uncalibrated vs
    0.98 calibrated)."""
    encoders = [m for m in model.modules() if isinstance(m, FrozenEncoder) and m.needs_calibration]
    if not encoders:
        return
    log(f"Calibrating the random-init encoder's BatchNorm statistics on {len(dataset)} training samples")
    loader = DataLoader(dataset, batch_size=8)
    for encoder in encoders:
        encoder.calibrate(batch["images"].flatten(0, 1).to(device) for batch in loader)


def synchronise_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Turns the trainable BatchNorm layers into SyncBatchNorm, which normalises over the global
    batch of all processes, as the official code does under DDP (`sync_BN` in lewandofskee/MVAD
    configs/__base__/cfg_common.py; it converts the whole model, but a frozen encoder, always in
    eval mode, uses its running statistics and has nothing to synchronise: its layers stay). The
    parameters and buffers are the same tensors under the same names, so the optimizer keeps them
    and a checkpoint loads into the plain model. Works in place; returns `module`."""
    if isinstance(module, FrozenEncoder):
        return module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        setattr(module, name, synchronise_batchnorm(child))
    return module


def trainable_batchnorms(model: torch.nn.Module) -> list:
    """The BatchNorm layers of `model` outside its frozen encoders."""
    frozen = {id(m) for encoder in model.modules() if isinstance(encoder, FrozenEncoder) for m in encoder.modules()}
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and id(m) not in frozen]


def share_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Copies rank 0's running statistics of the trainable BatchNorm layers to the other processes
    (the official code's alternative to SyncBatchNorm, `dist_BN = "broadcast"`), so that every
    process ends the epoch with the same model. DDP already copies them before every step; without
    SyncBatchNorm the last step of the epoch leaves each process with its own share's update."""
    for layer in trainable_batchnorms(model):
        for statistic in layer.buffers():  # running mean, variance, number of batches
            dist.broadcast(statistic, src=0)


def data_parallel(model: torch.nn.Module, device: torch.device, world: int, log) -> DistributedDataParallel:
    """The model under DDP: on GPUs with its trainable BatchNorm layers synchronised; on CPUs
    (SyncBatchNorm runs on GPUs only) each process's layers see its share of the batch, said in one
    line, and `share_batchnorm_statistics` runs after every epoch."""
    if device.type == "cuda":
        log(f"SyncBatchNorm: the trainable BatchNorm layers normalise over the global batch of the {world} "
            "processes, as the official code; the frozen encoders stay as they are")
        return DistributedDataParallel(synchronise_batchnorm(model))
    log(f"CPU processes: no SyncBatchNorm (it needs GPUs), so each trainable BatchNorm normalises its process's "
        f"share of the batch, 1/{world} of it, and keeps rank 0's running statistics; on GPUs they normalise "
        "over the whole batch, as the official code")
    return DistributedDataParallel(model)


def training_loss(model, batch: dict, method: str, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch's {"loss": scalar loss} and the parts that a forward returning a dict reports (IDIF:
    L_Distill, L_IB, ...; SimpleNet: p_true, p_fake); IDIF's student also sees the pseudo-anomalous views."""
    images = batch["images"].to(device, non_blocking=True)  # (B, V, 3, H, W)
    if method == "idif":
        return model(images, batch["corrupted"].to(device, non_blocking=True))
    out = model(images, **synthetic.routing_inputs(batch, device))
    return out if isinstance(out, dict) else {"loss": out}


# ----------------------------------------------------------------------------- the run


def main(cfg: TrainConfig) -> dict:
    """Trains, checkpoints every epoch, evaluates; returns eval.py's metrics dict on rank 0 ({} on
    the other ranks and with evaluate=False)."""
    rank, world, local_rank = distributed_context()
    if cfg.resume:
        cfg = resumed_config(cfg)
    cfg = resolve(cfg)
    setup_process(cfg.threads)
    if cfg.batch_size % world:
        raise data.UserError(f"--batch-size {cfg.batch_size}: the global batch is split evenly over the {world} "
                             f"processes, so it must be a multiple of {world}")
    if rank == 0:
        check_writable(Path(cfg.out))
    with distributed_run(torch.device(cfg.device), world, local_rank) as device:
        return run(cfg, rank, world, device)


def resumed_config(cfg: TrainConfig) -> TrainConfig:
    """The stored run's settings, except what concerns only this process (device, workers, threads,
    compile, precision, whether to evaluate, how to score) and --epochs when given (to extend a run)."""
    path = Path(resolve(cfg).out) / "last.pt"
    if not path.is_file():
        raise data.UserError(f"--resume: no checkpoint at {path}; run without --resume to start a new "
                             "run, or pass the run's --out")
    stored = TrainConfig(**load_checkpoint(path, cfg.method)["train"])
    return dataclasses.replace(stored, resume=True, epochs=cfg.epochs or stored.epochs,
                               device=cfg.device, workers=cfg.workers, threads=cfg.threads, compile=cfg.compile,
                               precision=cfg.precision, evaluate=cfg.evaluate, export_adeval=cfg.export_adeval,
                               view_norm=stored.view_norm if cfg.view_norm is None else cfg.view_norm)


def fit_batch(cfg: TrainConfig, samples: int, world: int, log) -> TrainConfig:
    """The training loader drops the last partial batch, as the official code's (lewandofskee/MVAD
    data/__init__.py, `drop_last` True in configs/__base__/cfg_common.py); a split with fewer
    samples than a batch would then train on nothing, so the batch shrinks to the samples (a
    multiple of the processes), said in one line."""
    if samples >= cfg.batch_size:
        return cfg
    if samples < world:
        raise data.UserError(f"{samples} training samples cannot be shared by {world} processes; "
                             "start fewer processes")
    batch = samples - samples % world
    log(f"only {samples} training samples, fewer than --batch-size {cfg.batch_size}: training with batch {batch}")
    return dataclasses.replace(cfg, batch_size=batch)


def run(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> dict:
    """One process's run: the data, the model, the epochs (or PatchCore's fit), the evaluation.
    Returns eval.py's metrics dict on rank 0 ({} on the other ranks and with evaluate=False)."""
    log = print if rank == 0 else (lambda *args: None)
    cfg, train_set = prepare_data(cfg, world, device, log)
    model_cfg, model, optimizer = build_model(cfg, train_set[0]["images"].shape[0], device)
    train_set = synthetic.routed(train_set, Path(cfg.data_root), model)
    random_encoder = announce_protocol(cfg, model, log)
    if optimizer is None:  # training-free: rank 0 fits, then every process evaluates its shard
        if rank == 0:
            return fit_memory_bank(cfg, model, model_cfg, random_encoder, train_set, device, log)
        return evaluate_checkpoint(cfg, device)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [decay_milestone(model_cfg, cfg.epochs)], gamma=0.1)
    start, history = resume_or_calibrate(cfg, model, optimizer, scheduler, train_set, device, rank, log)
    net = training_net(cfg, model, device, world, log)
    loader = training_loader(cfg, train_set, rank, world, device)
    for epoch in range(start, cfg.epochs):
        history.append(train_epoch(cfg, net, model, optimizer, loader, epoch, rank, world, device, model_cfg.clip))
        scheduler.step()
        log(f"epoch {epoch + 1}/{cfg.epochs}  " + epoch_summary(history[-1]))
        if rank == 0:
            save_epoch(cfg, model_cfg, model, optimizer, scheduler, history, random_encoder)
    return evaluate_checkpoint(cfg, device)


def decay_milestone(model_cfg, epochs: int) -> int:
    """The epochs after which the rate drops x0.1: lr_decay_at of them (at least 1); with lr_decay_at 1
    never (SimpleNet's constant rate), not even in a run extended with --resume --epochs (restore_schedule)."""
    if model_cfg.lr_decay_at >= 1:
        return epochs + 1
    return max(1, int(model_cfg.lr_decay_at * epochs))


def prepare_data(cfg: TrainConfig, world: int, device: torch.device, log) -> tuple:
    """Says the run's settings in one line, finds the data (Real-IAD, else the synthetic set), reads the
    training split and fits the batch to it. Returns (the config with its data root and its precision
    resolved, "fp32" or "bf16"; the split)."""
    profile = "gpu (the papers' settings)" if device.type == "cuda" else "cpu (small and quick)"
    schedule = "training-free" if training_free(cfg.method) else f"{cfg.epochs} epochs"
    precision, why = resolve_precision(cfg.precision, device)
    log(f"{cfg.method} on {cfg.category}: {profile} profile: image {cfg.image_size}, batch "
        f"{cfg.batch_size}, {schedule}, view-norm {'on' if cfg.view_norm else 'off'}, device {device}, "
        f"{world} process(es), precision {precision} ({why})")
    root = data_root_for(cfg, log)
    cfg = dataclasses.replace(cfg, data_root=str(root), precision=precision)  # eval.py reads the same folder
    train_set = training_set(cfg, root)
    return fit_batch(cfg, len(train_set), world, log), train_set


def announce_protocol(cfg: TrainConfig, model: torch.nn.Module, log) -> bool:
    """Says in one line what in the run is not the papers' protocol (eval.protocol_note); returns
    whether a frozen encoder is random-init (recorded in the checkpoint)."""
    random_encoder = any(m.needs_calibration for m in model.modules() if isinstance(m, FrozenEncoder))
    note = protocol_note({"method": cfg.method, "train": dataclasses.asdict(cfg), "epoch": cfg.epochs,
                          "random_encoder": random_encoder}, Path(cfg.data_root), bool(cfg.view_norm))
    if note:
        log(note)
    return random_encoder


def resume_or_calibrate(cfg: TrainConfig, model, optimizer, scheduler, train_set, device, rank: int,
                        log) -> tuple[int, list]:
    """With --resume the state of <out>/last.pt: (epochs done, history). A new run: rank 0 calibrates
    random-init frozen encoders (DDP's constructor then copies the statistics to every rank): (0, [])."""
    if not cfg.resume:
        if rank == 0:
            calibrate_frozen_encoders(model, train_set, device, log)
        return 0, []
    path = Path(cfg.out) / "last.pt"
    state = load_checkpoint(path, cfg.method)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_schedule(scheduler, state["scheduler"], state["epoch"])
    log(f"Resuming {path} after epoch {state['epoch']} of {cfg.epochs}")
    return state["epoch"], state["history"]


def restore_schedule(scheduler, stored: dict, epochs_done: int) -> None:
    """Loads a stored MultiStepLR state. A run extended with `--resume --epochs N` whose rate has not
    dropped yet drops it where N puts it (the scheduler was built for N); one that has already
    dropped keeps the stored milestone, so it does not drop twice."""
    milestones = scheduler.milestones.copy()
    scheduler.load_state_dict(stored)
    if epochs_done < min(scheduler.milestones):
        scheduler.milestones = milestones


def training_net(cfg: TrainConfig, model: torch.nn.Module, device: torch.device, world: int, log):
    """What the steps call: the model, under DDP for several processes, compiled with --compile (the
    checkpoints keep the plain model's state dict)."""
    net = data_parallel(model, device, world, log) if world > 1 else model
    return compile_model(net, device) if cfg.compile else net


def training_loader(cfg: TrainConfig, train_set, rank: int, world: int, device: torch.device) -> DataLoader:
    """This process's share of every batch, in an order drawn per epoch from --seed, the last partial
    batch dropped (as the official loader)."""
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    return DataLoader(train_set, batch_size=cfg.batch_size // world, sampler=sampler, drop_last=True,
                      num_workers=cfg.workers, pin_memory=device.type == "cuda")


def train_epoch(cfg: TrainConfig, net, model, optimizer, loader: DataLoader, epoch: int, rank: int, world: int,
                device: torch.device, clip: float) -> dict:
    """One epoch, every random draw seeded from (seed, epoch, rank). Returns its history entry: the
    epoch, the mean loss and parts, seconds, samples/s, the learning rate and the precision it trained with."""
    loader.sampler.set_epoch(epoch)
    if cfg.method == "idif":
        loader.dataset.set_epoch(epoch)  # the pseudo-anomalies
    torch.manual_seed(cfg.seed + 1000 * (epoch + 1) + rank)  # dropout, DropPath, view dropout, noise
    model.train()
    started, sums = time.perf_counter(), {}
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0, leave=False)
    for batch in bar:
        parts = train_step(net, optimizer, batch, cfg.method, device, clip, cfg.precision)
        sums = {name: sums.get(name, 0.0) + value for name, value in parts.items()}
        bar.set_postfix(loss=f"{parts['loss']:.4f}")
    if world > 1 and device.type != "cuda":
        share_batchnorm_statistics(model)
    seconds = time.perf_counter() - started
    means = {name: total / len(loader) for name, total in sums.items()}  # loss and its parts
    return {"epoch": epoch + 1, **means, "seconds": seconds,
            "samples_per_s": len(loader) * cfg.batch_size / seconds,  # samples trained: full batches
            "lr": optimizer.param_groups[0]["lr"], "precision": cfg.precision}  # what this epoch trained with


def loss_parts(entry: dict) -> dict:
    """The mean loss and its parts of one history entry (train_epoch's; {} for a memory bank's fit,
    which has no loss)."""
    if "loss" not in entry:
        return {}
    return {k: v for k, v in entry.items() if k not in ("epoch", "seconds", "samples_per_s", "lr", "precision")}


def epoch_summary(entry: dict) -> str:
    """The epoch's line: the mean loss and its parts, seconds, samples/s."""
    return ("  ".join(f"{k} {v:.4f}" for k, v in loss_parts(entry).items())
            + f"  {entry['seconds']:.1f} s  {entry['samples_per_s']:.1f} samples/s")


def save_epoch(cfg: TrainConfig, model_cfg, model, optimizer, scheduler, history: list, random_encoder: bool) -> None:
    """last.pt (atomically: everything a resumed run needs) and history.json after an epoch."""
    out = Path(cfg.out)
    save_atomically({"method": cfg.method, "config": dataclasses.asdict(model_cfg),
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": history[-1]["epoch"], "seed": cfg.seed,
                     "history": history, "train": dataclasses.asdict(cfg),
                     "random_encoder": random_encoder}, out / "last.pt")
    (out / "history.json").write_text(json.dumps(history, indent=1))


def fit_memory_bank(cfg: TrainConfig, model, model_cfg, random_encoder: bool, train_set, device: torch.device,
                    log) -> dict:
    """A training-free run (PatchCore): one pass over the training images fills the memory bank,
    saved atomically in last.pt with the frozen encoder; then the same evaluation as a trained run.
    With --resume an existing bank is evaluated again, not refitted. random_encoder: the encoder
    is random-init (recorded in the checkpoint, as for a trained run)."""
    out, checkpoint_path = Path(cfg.out), Path(cfg.out) / "last.pt"
    if cfg.resume:
        model.load_state_dict(load_checkpoint(checkpoint_path, cfg.method)["model"])
        log(f"Resuming {checkpoint_path}: its memory bank is fitted already")
    else:
        calibrate_frozen_encoders(model, train_set, device, log)
        started = time.perf_counter()
        loader = DataLoader(train_set, batch_size=cfg.batch_size, num_workers=cfg.workers,
                            pin_memory=device.type == "cuda")
        batches = (batch["images"].to(device) for batch in tqdm(loader, desc="memory bank", leave=False))
        fit = model.fit(batches, seed=cfg.seed)
        fit["seconds"] = time.perf_counter() - started
        mib = model.memory_bank.numel() * model.memory_bank.element_size() / 2**20
        log(f"memory bank: {fit['bank_size']} of {fit['patches']} training patches in {fit['banks']} bank(s), "
            f"{mib:.0f} MiB, fitted in {fit['seconds']:.1f} s")
        save_atomically({"method": cfg.method, "config": dataclasses.asdict(model_cfg), "model": model.state_dict(),
                         "seed": cfg.seed, "history": [fit], "train": dataclasses.asdict(cfg),
                         "random_encoder": random_encoder}, checkpoint_path)
        (out / "history.json").write_text(json.dumps([fit], indent=1))
    return evaluate_checkpoint(cfg, device)


def evaluate_checkpoint(cfg: TrainConfig, device: torch.device) -> dict:
    """eval.py's main on the run's last.pt, with the run's device, workers and view-norm setting ({}
    with --no-eval). With several processes every process evaluates its shard of the test split
    (eval.py), once rank 0 has written the checkpoint."""
    if not cfg.evaluate:
        return {}
    if dist.is_initialized():
        dist.barrier()
    return evaluate_run(EvalConfig(checkpoint=str(Path(cfg.out) / "last.pt"), device=str(device), workers=cfg.workers,
                                   view_norm=cfg.view_norm, export_adeval=cfg.export_adeval, threads=cfg.threads,
                                   compile=cfg.compile, precision=cfg.precision))


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    fields = "; ".join(f"{c.__name__}: " + ", ".join(f.name for f in dataclasses.fields(c)
                                                        if f.name not in ("image_size", "weights", "num_views"))
                       for c, _ in METHODS.values())
    p = data.ArgumentParser(description=__doc__.split("\n")[0], epilog=f"--set fields: {fields}")
    p.add_argument("--method", default=d.method, choices=list(METHODS))
    p.add_argument("--category", default=d.category, help="a Real-IAD category, a comma list, or all")
    p.add_argument("--data-root", default=d.data_root,
                   help="Real-IAD folder (holding realiad_<res>/ and realiad_jsons/); without it "
                        "$REALIAD_ROOT, ./data/realiad, else the built-in synthetic dataset")
    p.add_argument("--out", default=d.out, help="run folder (None: runs/<method>_<category>)")
    for name, help_text in (("epochs", "epochs"), ("batch_size", "samples per step (all processes)"),
                            ("image_size", "input side in pixels")):
        own = "".join(f"; {method.upper()}: {values[name]}" for method, values in CPU_METHOD_PROFILES.items()
                      if name in values)
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"{help_text} (None: {PROFILES['gpu'][name]} on GPU, {PROFILES['cpu'][name]} on CPU{own})")
    p.add_argument("--lr", type=float, default=d.lr, help="None: the config's base_lr x images per step / 16")
    p.add_argument("--weights", default=d.weights, help="frozen encoder: auto, imagenet, none or a file")
    p.add_argument("--device", default=d.device, help="None: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads (default: torch's, the cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA graphs on a GPU)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="bf16: bf16 autocast in training and evaluation (fp32 weights and optimizer); auto: bf16 "
                        "where the device computes bf16 natively (AMX-BF16 or AVX512-BF16 CPU, Ampere+ GPU)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip the evaluation")
    p.add_argument("--export-adeval", default=d.export_adeval, metavar="FILE",
                   help="the evaluation also writes the test maps for Real-IAD's scorer ADEval (eval.py)")
    p.add_argument("--view-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="z-score each camera's image scores with training statistics before the max over "
                        "views (None: off on GPU, on on CPU)")
    p.add_argument("--set", dest="model", action="append", default=[], metavar="NAME=VALUE",
                   help="a field of the method's config, e.g. --set topk=8 --set n_win=8,8,8 (see below)")
    p.add_argument("--synthetic-train", type=int, default=d.synthetic_train,
                   help="synthetic data: normal training samples per category")
    p.add_argument("--synthetic-test", type=int, default=d.synthetic_test,
                   help="synthetic data: normal and defective test samples per category (each)")
    args = p.parse_args(argv)
    args.model = dict(parse_field(METHODS[args.method][0], a) for a in args.model)
    return TrainConfig(**vars(args))


def cli(argv=None) -> int:
    """The command line: bad input ends in one line `error: ...` on stderr and exit status 2."""
    return data.run_cli(lambda args: main(parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(cli())
