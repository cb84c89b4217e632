"""Does `--precision auto` cost accuracy? Each method's default command in float32 and under auto, paired
seed by seed, on two synthetic categories.

    python bench/precision.py [--methods mvad,idif] [--categories zipper,audiojack] [--seeds 3]
                              [--data-root DIR] [--device cpu|cuda] [--threads N] [--quick]

Per (method, category, seed 42, 43, ...): train.py's default command (`train.main(TrainConfig(method,
category, seed))`: the profile's epochs, image size and batch, training then evaluation) twice,
`precision="fp32"` and then `precision="auto"`, one right after the other, so that the load of a shared
machine moves both alike. What auto chose is read from the run's metrics.json (train.py resolves it:
`runtime.resolve_precision`); where the device has no native bf16 auto is float32 and the two arms are
the same computation, which the table says. Per run: sample AUROC / AP, image AUROC, pixel AUROC /
AU-PRO and the wall time of train.main (training, the BatchNorm calibration and the evaluation).

Writes bench/results/precision.json (every run, the machine; resumes from it: a finished run is not
run again, an interrupted one restarts, its folder runs/precision/<method>/<category>/<precision>/
seed<seed> being replaced) and precision.md: per method, category and arm the mean ± standard
deviation over seeds, and auto - fp32 seed by seed. --quick: the tiny sizes of bench/ablations.py.
"""
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import common  # before the project's modules: it puts the repository root on sys.path
import ablations
import data
import train

ARMS = ("fp32", "auto")
FIGURES = {"sample_auroc": "sample AUROC", "sample_ap": "sample AP", "image_auroc": "image AUROC",
           "pixel_auroc": "pixel AUROC", "pixel_aupro": "AU-PRO", "seconds": "wall s"}  # ablations.METRICS, the time


def config(args, method: str, category: str, seed: int, precision: str) -> train.TrainConfig:
    """train.py's default command of one arm (--quick: ablations' tiny sizes and models)."""
    folder = args.runs / method / category / precision / f"seed{seed}"
    return train.TrainConfig(method=method, category=category, seed=seed, precision=precision, device=args.device,
                             threads=args.threads, data_root=args.data_root, out=str(folder),
                             **ablations.quick_sizes(args.quick, method))


def one_run(cfg: train.TrainConfig) -> dict:
    """Trains and evaluates from scratch; the figures, the precision that ran, the wall time."""
    shutil.rmtree(cfg.out, ignore_errors=True)  # an interrupted run restarts: its time must be whole
    with ablations.output_to(Path(cfg.out).with_suffix(".log")):
        started = time.perf_counter()
        metrics = train.main(cfg)
        seconds = time.perf_counter() - started
    return {**ablations.figures(metrics), "ran": metrics["settings"]["precision"], "seconds": seconds}


def key(method: str, category: str, seed: int, precision: str) -> str:
    return f"{method}/{category}/{seed}/{precision}"


def markdown(runs: dict, machine: dict) -> str:
    """precision.md: per method and category, each arm's mean ± std over seeds, and auto - fp32 by seed."""
    lines = ["# float32 against --precision auto", "",
             f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, torch {machine['torch']}, "
             f"{machine['torch_threads']} thread(s); each method's default command (train.py's profile), seeds "
             "as listed; mean ± standard deviation over seeds in percent; wall s: train.main's time "
             "(training, calibration, evaluation). auto ran: the precision auto chose here.", "",
             "| method | category | arm (ran) | seeds | " + " | ".join(FIGURES.values()) + " |",
             "|---|---|---|---|" + "---|" * len(FIGURES)]
    groups = dict.fromkeys((r["method"], r["category"]) for r in runs.values())
    for method, category in groups:
        for arm in ARMS:
            done = [r for r in runs.values() if (r["method"], r["category"], r["arm"]) == (method, category, arm)]
            if not done:
                continue
            ran = "/".join(sorted({r["ran"] for r in done}))
            stats = [ablations.cell(ablations.mean_std([r[k] for r in done]), 1.0 if k == "seconds" else 100.0,
                                    0 if k == "seconds" else 1) for k in FIGURES]
            lines.append(f"| {method} | {category} | {arm} ({ran}) | {', '.join(str(r['seed']) for r in done)} | "
                         + " | ".join(stats) + " |")
    lines += ["", "auto - fp32, seed by seed (percentage points; wall time as the ratio auto / fp32):", "",
              "| method | category | " + " | ".join(FIGURES.values()) + " |", "|---|---|" + "---|" * len(FIGURES)]
    for method, category in groups:
        pairs = paired(runs, method, category)
        if pairs:
            cells = [", ".join(f"{a['seconds'] / b['seconds']:.2f}x" if k == "seconds" else
                               "-" if a[k] is None or b[k] is None else f"{100 * (a[k] - b[k]):+.1f}"
                               for a, b in pairs) for k in FIGURES]
            lines.append(f"| {method} | {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired(runs: dict, method: str, category: str) -> list[tuple[dict, dict]]:
    """(auto run, fp32 run) of every seed that has both arms, in seed order."""
    seeds = sorted({r["seed"] for r in runs.values() if (r["method"], r["category"]) == (method, category)})
    return [(runs[key(method, category, s, "auto")], runs[key(method, category, s, "fp32")]) for s in seeds
            if key(method, category, s, "auto") in runs and key(method, category, s, "fp32") in runs]


def write(path: Path, runs: dict, machine: dict) -> None:
    """The JSON (atomically) and the markdown table beside it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"benchmark": "precision", "machine": machine, "runs": runs}, indent=1))
    os.replace(tmp, path)
    path.with_suffix(".md").write_text(markdown(runs, machine))


def main(argv=None) -> dict:
    p = common.arguments(__doc__)
    p.add_argument("--methods", default="mvad,idif", help="comma list of train.py methods")
    p.add_argument("--categories", default="zipper,audiojack", help="comma list of categories, each on its own")
    p.add_argument("--seeds", type=int, default=3, help=f"seeds per arm: {ablations.FIRST_SEED}, ...")
    p.add_argument("--data-root", default=None, help="Real-IAD folder; None: as train.py (else the synthetic data)")
    p.add_argument("--runs", type=Path, default=None, help="run folders (None: runs/precision, quick: "
                                                           "runs/precision_quick)")
    args = common.parse(p, argv)
    for method in args.methods.split(","):
        if method not in train.METHODS:
            raise data.UserError(f"--methods {method!r} is unknown; choose from: {', '.join(train.METHODS)}")
    name = "precision_quick" if args.quick else "precision"
    args.runs = args.runs or common.ROOT / "runs" / name
    path = args.out / f"{name}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
    machine = common.machine_info(args.device)
    todo = [(m, c, ablations.FIRST_SEED + i, arm) for i in range(args.seeds) for m in args.methods.split(",")
            for c in args.categories.split(",") for arm in ARMS]
    todo = [t for t in todo if key(*t) not in runs]
    print(f"{len(todo)} runs to do; writing {path}")
    for n, (method, category, seed, arm) in enumerate(todo, 1):
        run = one_run(config(args, method, category, seed, arm))
        runs[key(method, category, seed, arm)] = {"method": method, "category": category, "seed": seed, "arm": arm,
                                                  **run}
        write(path, runs, machine)
        print(f"[{n}/{len(todo)}] {method} {category} seed {seed} {arm} (ran {run['ran']}): sample AUROC "
              f"{ablations.percent(run['sample_auroc'])}, {run['seconds']:.0f} s")
    write(path, runs, machine)
    return runs


if __name__ == "__main__":
    sys.exit(data.run_cli(main))
