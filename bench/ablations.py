"""Ablations: each component switched off, the single-view baseline, the missing-view curve, over seeds.

    python bench/ablations.py [--variants mvad,rd,...] [--seeds 3] [--categories zipper,toy]
                              [--data-root DIR] [--epochs N] [--draws 3] [--device cpu|cuda] [--quick]

For every category, variant and seed (42, 43, ...; 42 is train.py's default): `train.main` with the
current profile (train.py's CPU or GPU profile; --epochs replaces its epochs), then `eval.main` (the
run's metrics.json, metrics.md and pictures, as after `python train.py`), then the missing-view curve:
`eval.evaluate` with K = 1..V-1 views removed at random from every test sample (eval.py's
--drop-views), --draws draws each (draw seeds 0, 1, ...: the same draws for every run).

Writes bench/results/ablations.json (every run's figures, the settings, the machine) and
bench/results/ablations.md: per category and variant the mean and standard deviation over seeds of
sample AUROC and AP, image AUROC, pixel AUROC and AU-PRO, training time (train.main's wall time:
set-up, encoder calibration, the epochs or PatchCore's fit) and parameters; the missing-view curve
(sample AUROC at K = 0..V-1, mean over draws, then over seeds) with the positive samples left at each
K. These two files are committed (.gitignore lets them through); --quick writes ablations_quick.*.

Resumes: a (category, variant, seed) already in the JSON is not run again; a run folder
(runs/ablations/<category>/<variant>/seed<seed>) holding a checkpoint of an interrupted call continues
from it (train.py --resume). The JSON's settings (profile, data, draws) must match the call's:
another profile needs another --out. Progress: one line per finished run; each run's own output goes
to log.txt in its folder.

Variants: the "RD" column of the papers' tables (MVAD without MVAS) and IDIF's ablation rows (per-view
ensemble: no consistency bottleneck and no fusion; +IVC: no bottleneck; full IDIF) are switches of the
methods' configs (`mvas`, `bottleneck`, `fusion`, `view_dropout`).
--quick: 64 px, 1 epoch, a tiny synthetic split (4 training samples, 2 + 2 test), tiny models, 1 draw.
"""
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import common  # before the project's modules: it puts the repository root on sys.path
import data
import eval as evaluation
import runtime
import train

# name -> (row label, method, config fields set)
VARIANTS = {
    "mvad": ("MVAD", "mvad", {}),
    "rd": ("RD (MVAD without MVAS)", "mvad", {"mvas": False}),
    "idif-ensemble": ("IDIF per-view ensemble (no CB, no fusion)", "idif", {"bottleneck": False, "fusion": False}),
    "idif-ivc": ("IDIF +IVC (no CB)", "idif", {"bottleneck": False}),
    "idif": ("IDIF (+IVC +CB)", "idif", {}),
    "idif-no-dropout": ("IDIF without view dropout", "idif", {"view_dropout": 0.0}),
    "patchcore": ("PatchCore", "patchcore", {}),
}
FIRST_SEED = 42  # train.py's default
QUICK = dict(image_size=64, batch_size=2, epochs=1, synthetic_train=4, synthetic_test=2, weights="none")
QUICK_MODEL = {"mvad": {"backbone": "resnet18", "n_win": (2, 2, 2), "blocks": (1, 1, 1)},
               "idif": {"voxel_size": (2, 4, 4), "fusion_blocks": 1},
               "patchcore": {"backbone": "resnet18", "width": 64}}
METRICS = {"sample_auroc": ("sample", "auroc"), "sample_ap": ("sample", "ap"), "image_auroc": ("image", "auroc"),
           "pixel_auroc": ("pixel", "auroc"), "pixel_aupro": ("pixel", "aupro")}


# ----------------------------------------------------------------------------- set-up


def check_variants(names: list[str]) -> None:
    """Fails before any training when a variant is unknown or sets a field its config lacks."""
    for name in names:
        if name not in VARIANTS:
            raise data.UserError(f"--variants {name}: unknown; choose from {', '.join(VARIANTS)}")
        _, method, fields = VARIANTS[name]
        config_class = runtime.METHODS[method][0]
        missing = sorted(set(fields) - {f.name for f in dataclasses.fields(config_class)})
        if missing:
            raise data.UserError(f"--variants {name}: {config_class.__name__} has no field {', '.join(missing)} "
                                 "in this version; leave the variant out with --variants")


def base_config(args, method: str = "mvad", **changes) -> train.TrainConfig:
    """train.py's config of one run: the profile, --quick's sizes, --epochs, --data-root, --device; in
    float32 on every machine (train.py's auto would choose bf16 on some): the variants compare at one
    precision, and the committed tables were made in float32."""
    quick = {**QUICK, "model": dict(QUICK_MODEL[method])} if args.quick else {}
    cfg = train.TrainConfig(method=method, data_root=args.data_root, device=args.device, precision="fp32", **quick)
    if args.epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    if cfg.image_size is None:  # one size for every method, as the tables compare them (train.py's CPU
        # default for MVAD alone is 96 px: train.CPU_METHOD_PROFILES); the profile's shared size
        shared = train.profile_for(runtime.resolve_device(args.device))
        cfg = dataclasses.replace(cfg, image_size=shared["image_size"])
    return dataclasses.replace(cfg, **changes)


def settings_of(args) -> dict:
    """What the runs share; a JSON written with other settings is not resumed."""
    cfg = train.resolve(base_config(args))
    profile = "gpu" if cfg.device.startswith("cuda") else "cpu"
    return {"profile": profile, "image_size": cfg.image_size, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
            "view_norm": cfg.view_norm, "weights": cfg.weights, "device": cfg.device, "quick": args.quick,
            "data": args.data_root or f"built-in synthetic ({cfg.synthetic_train} training samples, "
                                      f"{cfg.synthetic_test} + {cfg.synthetic_test} test)", "draws": args.draws}


def load_results(path: Path, settings: dict) -> dict:
    """The JSON's results to resume from, or a fresh one."""
    if not path.is_file():
        return {"settings": settings, "runs": {}}
    results = json.loads(path.read_text())["results"]
    if results["settings"] != settings:
        raise data.UserError(f"{path} was made with other settings ({results['settings']}); pass another --out "
                             "or delete it to start again")
    return results


# ----------------------------------------------------------------------------- one run


@contextlib.contextmanager
def output_to(path: Path):
    """Sends what the run prints (progress bars, tables, warnings) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def missing_view_curve(model, run: dict, device: str, view_stats: dict | None, draws: int) -> dict:
    """Sample, image and pixel metrics with K = 1..V-1 random views removed, `draws` draws per K.

    Args:
        model: the run's model (eval.load_model); run: its checkpoint's "train" dict (train.py's config);
        view_stats: the per-camera statistics of its evaluation (eval.camera_statistics), None without view-norm.
    Returns:
        {"K": [{"draw", "positives" (defective samples left), "sample_auroc", ...} per draw]}, K as a
        string (as JSON keeps it).
    """
    model = runtime.place(model, device)
    test_set = data.RealIAD(run["data_root"], evaluation.category_list(run["category"]), "test",
                            image_size=run["image_size"])
    curve = {}
    for k in range(1, test_set[0]["images"].shape[0]):
        curve[str(k)] = []
        for draw in range(draws):
            metrics, collected = evaluation.evaluate(model, test_set, device, drop_views=k, seed=draw,
                                                     view_stats=view_stats, num_figures=0)
            curve[str(k)].append({"draw": draw, "positives": evaluation.positive_samples(collected),
                                  **figures(metrics)})
    return curve


def figures(metrics: dict) -> dict:
    """The table's metrics out of eval.py's dict (None where undefined)."""
    return {name: none_for_nan(metrics[level][key]) for name, (level, key) in METRICS.items()}


def none_for_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def one_run(args, settings: dict, variant: str, category: str, seed: int) -> dict:
    """Trains (or resumes), evaluates and draws the missing-view curve of one (variant, category, seed)."""
    _, method, fields = VARIANTS[variant]
    folder = args.runs / category / variant / f"seed{seed}"
    cfg = base_config(args, method, category=category, seed=seed, out=str(folder), evaluate=False)
    cfg = dataclasses.replace(cfg, model={**cfg.model, **fields})
    resumed = (folder / "last.pt").is_file()
    with output_to(folder / "log.txt"):
        started = time.perf_counter()
        train.main(dataclasses.replace(cfg, resume=resumed))
        trained = time.perf_counter()
        checkpoint = folder / "last.pt"
        metrics = evaluation.main(evaluation.EvalConfig(checkpoint=str(checkpoint), device=settings["device"],
                                                        view_norm=settings["view_norm"], precision=cfg.precision,
                                                        num_figures=0 if args.quick else 4))
        evaluated = time.perf_counter()
        model, state = evaluation.load_model(str(checkpoint))
        view_stats = ({c: torch.tensor(p["view_stats"]) for c, p in metrics["predict"].items()}
                      if settings["view_norm"] else None)  # the evaluation's own, not scored again
        curve = missing_view_curve(model, state["train"], settings["device"], view_stats, args.draws)
    return {"variant": variant, "method": method, "fields": fields, "category": category, "seed": seed,
            "resumed": resumed, **figures(metrics), "positives": metrics["settings"]["positive_samples"],
            "train_seconds": trained - started, "eval_seconds": evaluated - trained,
            "curve_seconds": time.perf_counter() - evaluated,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "missing_views": curve}


# ----------------------------------------------------------------------------- summary and table


def mean_std(values: list) -> tuple[float, float, int]:
    """(mean, sample standard deviation, n) of the defined values; std 0 for one value, NaN for none."""
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def summarize(runs: dict, category: str, variant: str) -> dict | None:
    """Mean and standard deviation over the seeds of one (category, variant); None without runs."""
    done = [r for r in runs.values() if r["category"] == category and r["variant"] == variant]
    if not done:
        return None
    summary = {key: mean_std([r[key] for r in done])
               for key in [*METRICS, "train_seconds", "parameters", "trainable_parameters"]}
    summary["seeds"] = sorted(r["seed"] for r in done)
    # K = 0 is the run's own evaluation; K >= 1: each seed's mean over the draws, then over the seeds
    summary["curve"] = {0: mean_std([r["sample_auroc"] for r in done])}
    summary["positives"] = {0: done[0]["positives"]}
    for k in done[0]["missing_views"]:
        per_seed = [mean_std([d["sample_auroc"] for d in r["missing_views"][k]])[0] for r in done]
        summary["curve"][int(k)] = mean_std([none_for_nan(v) for v in per_seed])
        summary["positives"][int(k)] = statistics.fmean(d["positives"] for d in done[0]["missing_views"][k])
    return summary


def cell(stat: tuple, scale: float = 100.0, digits: int = 1) -> str:
    """"mean ± std" of a mean_std triple, scaled; the mean alone for one value; "-" for none."""
    mean, std, n = stat
    if n < 2:
        return "-" if n == 0 else f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def markdown(results: dict) -> str:
    """The tables of ablations.md: per category in the JSON, the metrics per variant, then the
    missing-view curve; last, the time all runs took."""
    s, runs = results["settings"], results["runs"].values()
    categories = list(dict.fromkeys(r["category"] for r in runs))
    lines = ["# Ablations", "", f"Profile {s['profile']}: {s['image_size']} px, batch {s['batch_size']}, "
             f"{s['epochs']} epochs, view-norm {'on' if s['view_norm'] else 'off'}, weights {s['weights']}, "
             f"device {s['device']}; data: {s['data']}. Mean ± standard deviation over the seeds, in percent; "
             "train s: train.main's wall time (the first run of a category also generates the synthetic data); parameters in millions (trainable in brackets).", ""]
    for category in categories:
        rows = {v: summarize(results["runs"], category, v) for v in VARIANTS}
        rows = {v: r for v, r in rows.items() if r is not None}
        if not rows:
            continue
        lines += [f"## {category}", "", "| variant | seeds | sample AUROC | sample AP | image AUROC | pixel AUROC | "
                  "AU-PRO | train s | parameters, M |", "|---|---|---|---|---|---|---|---|---|"]
        for v, r in rows.items():
            lines.append(f"| {VARIANTS[v][0]} | {len(r['seeds'])} | " + " | ".join(cell(r[k]) for k in METRICS)
                         + f" | {cell(r['train_seconds'], 1, 0)} | {r['parameters'][0] / 1e6:.1f} "
                         f"({r['trainable_parameters'][0] / 1e6:.1f}) |")
        K = sorted(next(iter(rows.values()))["curve"])
        lines += ["", f"Missing views: sample AUROC with K views removed at random from every test sample "
                  f"({s['draws']} draw(s) per K).", "",
                  "| variant | " + " | ".join(f"K = {k}" for k in K) + " |", "|---|" + "---|" * len(K)]
        lines += [f"| {VARIANTS[v][0]} | " + " | ".join(cell(r["curve"][k]) for k in K) + " |" for v, r in rows.items()]
        positives = next(iter(rows.values()))["positives"]
        lines += ["| defective samples left | " + " | ".join(f"{positives[k]:.1f}" for k in K) + " |", ""]
    minutes = sum(r["train_seconds"] + r["eval_seconds"] + r["curve_seconds"] for r in runs) / 60
    lines.append(f"{len(runs)} runs took {minutes // 60:.0f} h {minutes % 60:.0f} min (training, evaluation "
                 "and the missing-view curves).")
    return "\n".join(lines) + "\n"


def write(results: dict, args) -> None:
    """The JSON (atomically: a killed call leaves the previous file) and the markdown table."""
    payload = {"benchmark": "ablations", "machine": common.machine_info(args.device), "results": results}
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, args.json)
    args.json.with_suffix(".md").write_text(markdown(results))


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = common.arguments(__doc__)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=3, help=f"seeds per variant: {FIRST_SEED}, {FIRST_SEED + 1}, ...")
    p.add_argument("--categories", default="zipper", help="comma list of categories, each trained on its own")
    p.add_argument("--data-root", default=None, help="Real-IAD folder; None: as train.py (else the synthetic data)")
    p.add_argument("--epochs", type=int, default=None, help="None: the profile's epochs")
    p.add_argument("--draws", type=int, default=None, help="random draws per K of removed views (None: 3, quick: 1)")
    p.add_argument("--runs", type=Path, default=None, help="run folders (None: runs/ablations, quick: "
                                                           "runs/ablations_quick)")
    args = common.parse(p, argv)
    name = "ablations_quick" if args.quick else "ablations"
    args.json = args.out / f"{name}.json"
    args.runs = args.runs or common.ROOT / "runs" / name
    args.draws = args.draws or (1 if args.quick else 3)
    if args.seeds < 1 or args.draws < 1:
        raise data.UserError(f"--seeds {args.seeds} and --draws {args.draws}: each must be at least 1")
    return args


def main(argv=None) -> dict:
    """Runs what is missing, writes after every run; returns the results dict of the JSON."""
    args = parse_args(argv)
    variants, categories = args.variants.split(","), args.categories.split(",")
    check_variants(variants)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = settings_of(args)
    results = load_results(args.json, settings)
    todo = [(c, v, FIRST_SEED + i) for c in categories for v in variants for i in range(args.seeds)
            if f"{c}/{v}/{FIRST_SEED + i}" not in results["runs"]]
    print(f"{len(todo)} runs to do, {len(categories) * len(variants) * args.seeds - len(todo)} done; "
          f"profile {settings['profile']}, {settings['epochs']} epochs; writing {args.json}")
    started = time.perf_counter()
    for n, (category, variant, seed) in enumerate(todo, 1):
        run = one_run(args, settings, variant, category, seed)
        results["runs"][f"{category}/{variant}/{seed}"] = run
        write(results, args)
        seconds = run["train_seconds"] + run["eval_seconds"] + run["curve_seconds"]
        print(f"[{n}/{len(todo)}] {category} {variant} seed {seed}: sample AUROC {percent(run['sample_auroc'])}, "
              f"train {run['train_seconds']:.0f} s, eval {run['eval_seconds']:.0f} s, missing views "
              f"{run['curve_seconds']:.0f} s: {seconds / 60:.1f} min ({(time.perf_counter() - started) / 60:.1f} "
              "min since the start)")
    write(results, args)
    print(f"wrote {args.json} and {args.json.with_suffix('.md').name}")
    return results


if __name__ == "__main__":
    sys.exit(data.run_cli(main))
