"""A Real-IAD-shaped dry run without the dataset: train.py and eval.py on several processes over all 30
category names of the synthetic data, each phase timed and each process's peak memory measured.

    python bench/dryrun.py [--quick] [--processes 2] [--method mvad] [--category all] [--epochs 1]

1. Data: `synthetic.synthetic_root(category, ...)`, the generator behind `python synthetic.py`, for all 30
   category names at reduced size (default: 4 training, 2 normal and 2 defective test samples each,
   stored at 128 px; --quick: 2 categories). Timed; cached like train.py's synthetic data.
2. N processes (--processes), started as `torchrun --nproc_per_node=N` starts them (its environment
   variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; gloo on CPUs), each with
   cores / N torch threads. Each process:
   a. load: reads its share of one training epoch (the global batch split as train.py splits it,
      through the same DistributedSampler) and its shard of the test split (`runtime.shard`) through a
      DataLoader, without the model: the cost of reading and decoding the images;
   b. runs `train.main` (the command `torchrun ... train.py --category all ...`), which trains and then
      evaluates every process's shard. Timed inside: the random-init encoder's calibration (rank 0),
      the training steps (`train.train_step`: forward, backward, AdamW), the evaluation
      (`eval.main`, called by train.py) and in it the anomaly maps (the model's forward) and the
      pixel metrics (`PixelMetrics.update`). "Other" is the rest of training: the loader's reading,
      set-up, checkpoints.
   Memory: the peak resident size (VmHWM) of each process during its training and, reset in between
   through /proc/self/clear_refs, during its evaluation.
3. Activation memory of one training step at the papers' 256 px, per sample: the peak memory of a
   step with 1 and with 2 samples in a fresh child process (`common.time_and_memory`), on the CPU;
   a GPU holds the same tensors (its allocator and kernels' workspaces differ): an estimate.
   Measured first, before the processes of 2. (--no-step-memory skips it).

Prints the per-process tables, rank 0's metrics and per-sample costs; writes bench/results/dryrun.json.
"""
import dataclasses
import json
import os
import socket
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import common  # before the project's modules: it puts the repository root on sys.path
import data
import eval as evaluation
import runtime
import synthetic
import train

MIB = 2.0**20


def peak_mib(reset: bool = False) -> float:
    """This process's peak resident size (VmHWM) in MiB; with `reset`, then set back to the current size."""
    peak = common._status_kib("VmHWM") / 1024
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return peak


def timed(function, clock: dict, name: str):
    """`function`, adding the seconds of every call to clock[name]."""
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            clock[name] += time.perf_counter() - started
    return wrapper


def load_seconds(cfg: train.TrainConfig, rank: int, world: int) -> dict:
    """Seconds to read this process's share of one training epoch and its shard of the test split."""
    train_set = train.training_set(cfg, Path(cfg.data_root))
    test_set = data.RealIAD(cfg.data_root, cfg.category, "test", image_size=cfg.image_size)
    shares = {"train": train.training_loader(cfg, train_set, rank, world, torch.device("cpu")),  # as train.py reads
              "test": DataLoader(Subset(test_set, runtime.shard(len(test_set), rank, world)), batch_size=8)}
    seconds, samples = {}, {}
    for split, loader in shares.items():
        started, samples[split] = time.perf_counter(), 0
        for batch in loader:
            samples[split] += len(batch["images"])
        seconds[split] = time.perf_counter() - started
    return {"load_train_s": seconds["train"], "load_train_samples": samples["train"],
            "load_test_s": seconds["test"], "load_test_samples": samples["test"]}


def instrument(clock: dict, memory: dict) -> None:
    """Wraps the functions of train.py and eval.py whose time each phase is made of (see the docstring)."""
    train.train_step = timed(train.train_step, clock, "steps")
    train.calibrate_frozen_encoders = timed(train.calibrate_frozen_encoders, clock, "calibration")
    evaluation.PixelMetrics.update = timed(evaluation.PixelMetrics.update, clock, "pixel_metrics")
    load_model = evaluation.load_model

    def load_timed_model(path):
        model, checkpoint = load_model(path)
        model.anomaly_map = timed(model.anomaly_map, clock, "anomaly_maps")
        return model, checkpoint

    evaluation.load_model = load_timed_model
    evaluate_run = train.evaluate_run

    def evaluate_measured(cfg):
        memory["train_peak_mib"] = peak_mib(reset=True)
        started = time.perf_counter()
        metrics = evaluate_run(cfg)
        clock["evaluation"] = time.perf_counter() - started
        memory["eval_peak_mib"] = peak_mib()
        return metrics

    train.evaluate_run = evaluate_measured


def process(rank: int, world: int, port: int, cfg: train.TrainConfig, threads: int, out: Path) -> None:
    """One process of the dry run (torch.multiprocessing.spawn's entry); writes <out>/rank<r>.json."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    result = load_seconds(cfg, rank, world)
    clock, memory = defaultdict(float), {}
    instrument(clock, memory)
    peak_mib(reset=True)
    started = time.perf_counter()
    metrics = train.main(cfg)
    total = time.perf_counter() - started
    training = total - clock["evaluation"]
    result.update(memory, rank=rank, threads=threads, train_s=training, calibration_s=clock["calibration"],
                  steps_s=clock["steps"], other_train_s=training - clock["steps"] - clock["calibration"],
                  eval_s=clock["evaluation"], anomaly_maps_s=clock["anomaly_maps"],
                  pixel_metrics_s=clock["pixel_metrics"], metrics={k: metrics[k] for k in ("sample", "image", "pixel")}
                  if metrics else None)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def step_memory(device, method: str, samples: int) -> dict:
    """Peak memory (and time) of one training step with `samples` samples at 256 px, in this process."""
    cfg = train.TrainConfig(method=method, image_size=256, batch_size=samples, weights="none", device="cpu")
    images = torch.randn(samples, len(data.CAMERAS), 3, 256, 256)
    batch = {"images": images, "corrupted": images + 0.1 * torch.randn_like(images)}
    _, model, optimizer = train.build_model(cfg, len(data.CAMERAS), torch.device(device))
    model.train()
    seconds, peak = common.time_and_memory(
        lambda: train.train_step(model, optimizer, batch, method, device, model.cfg.clip), device, repeats=1)
    return {"samples": samples, "step_s": seconds, "peak_mib": peak / MIB}


def main() -> None:
    p = common.arguments(__doc__)
    p.add_argument("--processes", type=int, default=2, help="processes (torchrun's --nproc_per_node)")
    p.add_argument("--method", default="mvad", choices=list(runtime.METHODS))
    p.add_argument("--category", default="all", help="synthetic categories: all, or a comma list")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--image-size", type=int, default=128, help="the model's input (train.py's CPU profile: 128)")
    p.add_argument("--batch-size", type=int, default=4, help="global batch (train.py's CPU profile: 4)")
    p.add_argument("--train", type=int, default=4, help="synthetic training samples per category")
    p.add_argument("--test", type=int, default=2, help="synthetic normal and defective test samples per category")
    p.add_argument("--resolution", type=int, default=128, help="synthetic images' stored side in pixels")
    p.add_argument("--no-step-memory", action="store_true", help="skip the 256 px step's memory (part 3)")
    args = common.parse(p)
    # first, while this process runs no thread: a child forked later, after the processes below,
    # can hang on a lock that a thread of this process held at the fork
    memory = [] if args.no_step_memory else [common.run_isolated(step_memory, "cpu", method=args.method, samples=n)
                                             for n in (1, 2)]
    categories = ["audiojack", "zipper"] if args.quick else (data.CATEGORIES if args.category == "all"
                                                             else args.category.split(","))
    started = time.perf_counter()
    root = synthetic.synthetic_root(list(categories), n_train=args.train, n_test_normal=args.test,
                                    n_test_defect=args.test, resolution=args.resolution)
    generation = time.perf_counter() - started
    print(f"synthetic data: {len(categories)} categories x ({args.train} training, {args.test} + {args.test} test) "
          f"samples at {args.resolution} px in {root}: {generation:.1f} s (0 when cached)")
    threads = max(1, (os.cpu_count() or 1) // args.processes)
    with tempfile.TemporaryDirectory() as folder:
        cfg = train.TrainConfig(method=args.method, category="all", data_root=str(root),  # all in the root
                                out=str(Path(folder) / "run"), epochs=args.epochs, batch_size=args.batch_size,
                                image_size=args.image_size, weights="none", device="cpu")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        started = time.perf_counter()
        torch.multiprocessing.spawn(process, args=(args.processes, port, cfg, threads, Path(folder)),
                                    nprocs=args.processes)
        wall = time.perf_counter() - started
        ranks = [json.loads((Path(folder) / f"rank{r}.json").read_text()) for r in range(args.processes)]
    report(ranks, wall, args)
    if memory:
        print(f"\none training step at 256 px ({args.method}, CPU): 1 sample {memory[0]['peak_mib']:.0f} MiB, "
              f"2 samples {memory[1]['peak_mib']:.0f} MiB: {memory[1]['peak_mib'] - memory[0]['peak_mib']:.0f} "
              "MiB per sample")
    common.write_json("dryrun", args, {"categories": len(categories), "generation_s": generation, "wall_s": wall,
                                       "processes": ranks, "step_memory_256px": memory,
                                       "train_samples": len(categories) * args.train,
                                       "test_samples": len(categories) * 2 * args.test,
                                       "settings": dataclasses.asdict(cfg)})


def report(ranks: list[dict], wall: float, args) -> None:
    """Prints the phases of every process, rank 0's metrics and the per-sample costs."""
    columns = ["load_train_s", "load_test_s", "train_s", "calibration_s", "steps_s", "other_train_s", "eval_s",
               "anomaly_maps_s", "pixel_metrics_s", "train_peak_mib", "eval_peak_mib"]
    common.print_table(f"{args.processes} process(es), {ranks[0]['threads']} thread(s) each; wall {wall:.1f} s",
                       ["rank"] + [c.removesuffix("_s").removesuffix("_mib") for c in columns],
                       [[r["rank"]] + [f"{r[c]:.1f}" if c.endswith("_s") else f"{r[c]:.0f}" for c in columns]
                        for r in ranks])
    metrics = ranks[0]["metrics"]
    print("\nrank 0's metrics (%): " + "; ".join(
        f"{level} " + " / ".join(f"{k} {100 * v:.1f}" for k, v in values.items()) for level, values in metrics.items()))
    r = ranks[0]
    print(f"rank 0, ms per sample of its share: load train {1000 * r['load_train_s'] / r['load_train_samples']:.1f}, "
          f"load test {1000 * r['load_test_s'] / r['load_test_samples']:.1f}, "
          f"train step {1000 * r['steps_s'] / (r['load_train_samples'] * args.epochs):.1f}, "
          f"evaluation {1000 * r['eval_s'] / r['load_test_samples']:.1f}")


if __name__ == "__main__":
    main()
