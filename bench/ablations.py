"""Ablations and verdicts: every variant over seeds and categories, the missing-view curves, and which
of the papers' claims the figures support.

    python bench/ablations.py [--categories zipper,audiojack,zipper_consistency] [--variants mvad,rd,...]
                              [--seeds 3] [--curves] [--draws 5] [--data-root DIR] [--epochs N]
                              [--device cpu|cuda] [--quick]

Runs: for every category, variant and seed (42, 43, ...; 42 is train.py's default), `train.main` with
the current profile (train.py's CPU or GPU profile, every method at the profile's shared image size;
--epochs replaces its epochs), then `eval.main` (the run's metrics.json, metrics.md and pictures, as
after `python train.py`). Without --variants each category runs its row of PLAN, the study of the
README's Ablations section.

--curves: the missing-view curves of the finished runs of those categories and variants that lack
them: K = 1..V-1 views removed from every test sample, --draws draws per K (draw d removes the views
of `eval.drop_views_mask` with seed d: the same views for every variant and seed, so variants are
compared on paired draws), with view-norm's per-camera statistics recomputed on the training split
with K views removed by the same draw (`eval.camera_statistics`); per draw the sample AUROC with the
label over the views left and over all the sample's views, image AUROC, and the defective samples
left. Figures for a claim: `verdict` (the rule) and CLAIMS (the claims).

Writes bench/results/ablations.json (every run's figures, the settings, the machine) and
bench/results/ablations.md: per category and variant the mean and standard deviation over seeds of
sample AUROC and AP, image AUROC, pixel AUROC and AU-PRO, training time and parameters; the
missing-view curves; the verdict table. Both files are committed (.gitignore lets them through);
--quick writes ablations_quick.*.

Resumes: a (category, variant, seed) already in the JSON is not run again; a run folder
(runs/ablations/<category>/<variant>/seed<seed>) holding a checkpoint of an interrupted call continues
from it (train.py --resume); the checkpoints stay, for --curves. The JSON's settings (profile, data)
must match the call's: another profile needs another --out. Progress: one line per finished run; each
run's own output goes to log.txt in its folder.

Variants are switches of the methods' configs: the "RD" column of the papers' tables (MVAD without
MVAS), MVAS's routing (`routing`: the official dot product, the cosine, the oracle of the renderer's
geometry), MVAD's window count and top-K (the paper's Fig. 4 and 5), IDIF's ablation rows (per-view
ensemble: no consistency bottleneck and no fusion; +IVC: no bottleneck; full IDIF; no view dropout);
the deck's two comparators, UniAD and SimpleNet (uniad.py, simplenet.py).
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
import metrics
import runtime
import synthetic
import train

# name -> (row label, method, config fields set)
VARIANTS = {
    "mvad": ("MVAD", "mvad", {}),
    "mvad-cosine": ("MVAD, cosine routing", "mvad", {"routing": "cosine"}),
    "mvad-oracle": ("MVAD, oracle routing (the renderer's geometry)", "mvad", {"routing": "oracle"}),
    "mvad-a4": ("MVAD, a = 4 windows per side", "mvad", {"n_win": (4, 4, 4)}),
    "mvad-a8": ("MVAD, a = 8 windows per side", "mvad", {"n_win": (8, 8, 8)}),
    "mvad-k1": ("MVAD, top-1 window", "mvad", {"topk": 1}),
    "mvad-k8": ("MVAD, top-8 windows", "mvad", {"topk": 8}),
    "rd": ("RD (MVAD without MVAS)", "mvad", {"mvas": False}),
    "idif-ensemble": ("IDIF per-view ensemble (no CB, no fusion)", "idif", {"bottleneck": False, "fusion": False}),
    "idif-ivc": ("IDIF +IVC (no CB)", "idif", {"bottleneck": False}),
    "idif-ivc-residual": ("IDIF +IVC added to each view's f_s (no CB; ours)", "idif",
                          {"bottleneck": False, "fusion_residual": True}),
    "idif": ("IDIF (+IVC +CB)", "idif", {}),
    "idif-no-dropout": ("IDIF without view dropout", "idif", {"view_dropout": 0.0}),
    "patchcore": ("PatchCore", "patchcore", {}),
    "uniad": ("UniAD", "uniad", {}),
    "simplenet": ("SimpleNet", "simplenet", {}),
}
IDIF_ROWS = ["idif-ensemble", "idif-ivc", "idif", "idif-no-dropout"]
PLAN = {  # the study: category -> its variants (the oracle needs the synthetic data's geometry)
    "zipper": ["mvad", "rd", "mvad-oracle", "mvad-cosine", *IDIF_ROWS, "patchcore", "mvad-a4", "mvad-a8",
               "mvad-k1", "mvad-k8", "uniad", "simplenet", "idif-ivc-residual"],
    "audiojack": ["mvad", "rd", *IDIF_ROWS, "patchcore", "idif-ivc-residual"],
    "zipper_consistency": ["mvad", "mvad-oracle", "rd", "idif", "idif-ensemble", "patchcore", "idif-ivc",
                           "idif-ivc-residual"],
}
FIRST_SEED = 42  # train.py's default
QUICK = dict(image_size=64, batch_size=2, epochs=1, synthetic_train=4, synthetic_test=2, weights="none")
QUICK_MODEL = {"mvad": {"backbone": "resnet18", "n_win": (2, 2, 2), "blocks": (1, 1, 1)},
               "idif": {"voxel_size": (2, 4, 4), "fusion_blocks": 1},
               "patchcore": {"backbone": "resnet18", "width": 64},
               "uniad": {"hidden_dim": 32, "num_heads": 4, "encoder_layers": 1, "decoder_layers": 1, "ffn_dim": 64,
                         "neighbor_size": 3},
               "simplenet": {"backbone": "resnet18", "width": 64, "hidden": 32}}
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


def quick_sizes(quick: bool, method: str) -> dict:
    """train.TrainConfig's fields that --quick sets: the tiny sizes and `method`'s tiny model; {} without it."""
    return {**QUICK, "model": dict(QUICK_MODEL[method])} if quick else {}


def base_config(args, method: str = "mvad", **changes) -> train.TrainConfig:
    """train.py's config of one run: the profile, --quick's sizes, --epochs, --data-root, --device; in
    float32 on every machine (train.py's auto would choose bf16 on some): the variants compare at one
    precision, and the committed tables were made in float32."""
    cfg = train.TrainConfig(method=method, data_root=args.data_root, device=args.device, precision="fp32",
                            **quick_sizes(args.quick, method))
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
                                      f"{cfg.synthetic_test} + {cfg.synthetic_test} test)"}


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


def figures(metrics: dict) -> dict:
    """The table's metrics out of eval.py's dict (None where undefined)."""
    return {name: none_for_nan(metrics[level][key]) for name, (level, key) in METRICS.items()}


def none_for_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def run_folder(args, category: str, variant: str, seed: int) -> Path:
    return args.runs / category / variant / f"seed{seed}"


def one_run(args, settings: dict, variant: str, category: str, seed: int) -> dict:
    """Trains (or resumes) and evaluates one (variant, category, seed); the checkpoint stays."""
    _, method, fields = VARIANTS[variant]
    folder = run_folder(args, category, variant, seed)
    cfg = base_config(args, method, category=category, seed=seed, out=str(folder), evaluate=False)
    cfg = dataclasses.replace(cfg, model={**cfg.model, **fields})
    resumed = (folder / "last.pt").is_file()
    with output_to(folder / "log.txt"):
        started = time.perf_counter()
        train.main(dataclasses.replace(cfg, resume=resumed))
        trained = time.perf_counter()
        metrics = evaluation.main(evaluation.EvalConfig(checkpoint=str(folder / "last.pt"), device=settings["device"],
                                                        view_norm=settings["view_norm"], precision=cfg.precision,
                                                        num_figures=0 if args.quick else 4))
    model, _ = evaluation.load_model(str(folder / "last.pt"))
    return {"variant": variant, "method": method, "fields": fields, "category": category, "seed": seed,
            "resumed": resumed, **figures(metrics), "positives": metrics["settings"]["positive_samples"],
            "losses": last_losses(folder),
            "train_seconds": trained - started, "eval_seconds": time.perf_counter() - trained,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def last_losses(folder: Path) -> dict:
    """The last epoch's training loss and its parts (history.json; {} for PatchCore, which has none):
    how well the student fits the teacher on the training data when the schedule ends."""
    return train.loss_parts(json.loads((folder / "history.json").read_text())[-1])


# ----------------------------------------------------------------------------- missing views


def missing_view_curve(folder: Path, device: str, view_norm: bool, draws: int) -> dict:
    """Metrics with K = 1..V-1 views removed from every test sample, `draws` paired draws per K.

    Args:
        folder: a finished run's folder (its last.pt); view_norm: as its evaluation.
    Returns:
        {"K": [{"draw", "positives" (defective samples left), "positives_all_views", "sample_auroc" (label
        over the views left), "sample_auroc_all_views", "image_auroc"} per draw]}, K as a string (as JSON keeps it).
    """
    model, state = evaluation.load_model(str(folder / "last.pt"))
    model, run = runtime.place(model, device).eval(), state["train"]
    root, categories = Path(run["data_root"]), evaluation.category_list(run["category"])
    test_set = synthetic.routed(data.RealIAD(root, categories, "test", image_size=run["image_size"]), root, model)
    train_set = synthetic.routed(data.RealIAD(root, categories, "train", image_size=run["image_size"]), root, model)
    curve = {}
    for k in range(1, test_set[0]["images"].shape[0]):
        curve[str(k)] = []
        for draw in range(draws):
            stats = evaluation.camera_statistics(model, train_set, device, drop_views=k, seed=draw) if view_norm else None
            scored, collected = evaluation.evaluate(model, test_set, device, drop_views=k, seed=draw,
                                                    view_stats=stats, num_figures=0)
            all_views = [curves["sample_all_views"] for curves in collected["levels"].values()]
            curve[str(k)].append({
                "draw": draw, "positives": evaluation.positive_samples(collected),
                "positives_all_views": sum(int(labels.sum()) for _, labels in all_views),
                "sample_auroc": none_for_nan(scored["sample"]["auroc"]),
                "sample_auroc_all_views": none_for_nan(statistics.fmean(metrics.auroc(*level) for level in all_views)),
                "image_auroc": none_for_nan(scored["image"]["auroc"])})
    return curve


# ----------------------------------------------------------------------------- summary, verdicts, tables


def mean_std(values: list) -> tuple[float, float, int]:
    """(mean, sample standard deviation, n) of the defined values; std 0 for one value, NaN for none."""
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


CURVES = ("sample_auroc", "sample_auroc_all_views", "image_auroc")  # the missing-view curves


def summarize(runs: dict, category: str, variant: str) -> dict | None:
    """Mean and standard deviation over the seeds of one (category, variant); None without runs.
    The curves (CURVES, K = 0 being the run's own evaluation): each seed's mean over its draws,
    then mean and standard deviation over the seeds that have curves."""
    done = [r for r in runs.values() if r["category"] == category and r["variant"] == variant]
    if not done:
        return None
    summary = {key: mean_std([r[key] for r in done])
               for key in [*METRICS, "train_seconds", "parameters", "trainable_parameters"]}
    summary["seeds"] = sorted(r["seed"] for r in done)
    with_curves = [r for r in done if "missing_views" in r]
    summary["curves"] = {name: {0: mean_std([r["sample_auroc" if name != "image_auroc" else name]
                                             for r in with_curves])} for name in CURVES} if with_curves else {}
    summary["positives"] = {0: done[0]["positives"]}
    for k in with_curves[0]["missing_views"] if with_curves else []:
        for name in CURVES:
            per_seed = [mean_std([d[name] for d in r["missing_views"][k]])[0] for r in with_curves]
            summary["curves"][name][int(k)] = mean_std([none_for_nan(v) for v in per_seed])
        summary["positives"][int(k)] = statistics.fmean(d["positives"] for d in with_curves[0]["missing_views"][k])
    return summary


def verdict(a: tuple, b: tuple) -> str:
    """The verdict on a claim that variant a scores higher than variant b, from their (mean, std, n)
    over seeds: "undecided" when the difference is not larger than the two standard deviations
    together (or a variant has fewer than two seeds), else "supported" (a higher) or "contradicted"."""
    (mean_a, std_a, n_a), (mean_b, std_b, n_b) = a, b
    if min(n_a, n_b) < 2 or math.isnan(mean_a - mean_b) or abs(mean_a - mean_b) <= std_a + std_b:
        return "undecided"
    return "supported" if mean_a > mean_b else "contradicted"


def cell(stat: tuple, scale: float = 100.0, digits: int = 1) -> str:
    """"mean ± std" of a mean_std triple, scaled; the mean alone for one value; "-" for none."""
    mean, std, n = stat
    if n < 2:
        return "-" if n == 0 else f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"
# The papers' claims that the study can test: (claim, where the papers stand, category, variant a,
# variant b, figure: a metric at K = 0 or (curve, K)); each claims that a scores above b.
CLAIMS = [
    ("MVAS beats RD", "MVAD's tables: MVAD above RD", "zipper", "mvad", "rd", "sample_auroc"),
    ("MVAS beats RD", "MVAD's tables: MVAD above RD", "audiojack", "mvad", "rd", "sample_auroc"),
    ("MVAS with the right windows beats RD", "ours: the oracle bounds any routing", "zipper", "mvad-oracle", "rd",
     "sample_auroc"),
    ("The right windows beat MVAS's own choice", "ours", "zipper", "mvad-oracle", "mvad", "sample_auroc"),
    ("Routing without hub windows beats the official routing", "ours: the cosine", "zipper", "mvad-cosine", "mvad",
     "sample_auroc"),
    ("The official a (14, 9, 6) beats a = 4", "MVAD Fig. 4 (k = 4)", "zipper", "mvad", "mvad-a4", "sample_auroc"),
    ("The official a (14, 9, 6) beats a = 8", "MVAD Fig. 4 (k = 4)", "zipper", "mvad", "mvad-a8", "sample_auroc"),
    ("The official k = 4 beats k = 1", "MVAD Fig. 5", "zipper", "mvad", "mvad-k1", "sample_auroc"),
    ("The official k = 4 beats k = 8", "MVAD Fig. 5", "zipper", "mvad", "mvad-k8", "sample_auroc"),
    ("The voxel adds to the per-view ensemble", "IDIF ablation: 94.0 -> 96.1", "zipper", "idif-ivc", "idif-ensemble",
     "sample_auroc"),
    ("The voxel adds to the per-view ensemble", "IDIF ablation: 94.0 -> 96.1", "audiojack", "idif-ivc",
     "idif-ensemble", "sample_auroc"),
    ("Adding the voxel to each view's features beats replacing them", "ours: the re-projection as a bottleneck",
     "zipper", "idif-ivc-residual", "idif-ivc", "sample_auroc"),
    ("Adding the voxel to each view's features beats replacing them", "ours: the re-projection as a bottleneck",
     "audiojack", "idif-ivc-residual", "idif-ivc", "sample_auroc"),
    ("The voxel added to each view's features adds to the per-view ensemble", "ours", "zipper",
     "idif-ivc-residual", "idif-ensemble", "sample_auroc"),
    ("The voxel added to each view's features adds to the per-view ensemble", "ours", "audiojack",
     "idif-ivc-residual", "idif-ensemble", "sample_auroc"),
    ("The CB adds to the voxel", "IDIF ablation: 96.1 -> 97.0", "zipper", "idif", "idif-ivc", "sample_auroc"),
    ("The CB adds to the voxel", "IDIF ablation: 96.1 -> 97.0", "audiojack", "idif", "idif-ivc", "sample_auroc"),
    ("View dropout holds accuracy with 3 views missing", "IDIF: 95.1 with 3 missing", "zipper", "idif",
     "idif-no-dropout", ("sample_auroc_all_views", 3)),
    ("Multi-view beats the best single-view baseline", "IDIF's table: 97.0 against PatchCore 93.7", "zipper", "idif",
     "patchcore", "sample_auroc"),
    ("Multi-view beats the best single-view baseline", "IDIF's table: 97.0 against PatchCore 93.7", "audiojack",
     "idif", "patchcore", "sample_auroc"),
    ("Multi-view beats the best single-view baseline", "IDIF's table: PatchCore 93.7; MVAD 90.2", "zipper", "mvad",
     "patchcore", "sample_auroc"),
    ("Cross-view consistency is detected", "the seminar's first principle", "zipper_consistency", "mvad",
     "patchcore", "sample_auroc"),
    ("Cross-view consistency is detected", "the seminar's first principle", "zipper_consistency", "idif",
     "patchcore", "sample_auroc"),
    ("Cross-view consistency is detected", "the seminar's first principle", "zipper_consistency", "mvad-oracle",
     "patchcore", "sample_auroc"),
    ("IDIF's fusion sees what no single view shows", "ours: the same model without CB and fusion", "zipper_consistency",
     "idif", "idif-ensemble", "sample_auroc"),
    ("The voxel alone sees what no single view shows", "ours: without the CB", "zipper_consistency", "idif-ivc",
     "idif-ensemble", "sample_auroc"),
    ("The voxel added to each view's features still sees it", "ours", "zipper_consistency", "idif-ivc-residual",
     "idif-ensemble", "sample_auroc"),
]


def claim_figures(summaries: dict, category: str, variant: str, figure) -> tuple | None:
    """The (mean, std, n) over seeds that a claim compares: a metric, or a curve's point."""
    summary = summaries.get((category, variant))
    if summary is None:
        return None
    if isinstance(figure, str):
        return summary[figure]
    name, k = figure
    return summary["curves"].get(name, {}).get(k)


def paired_differences(runs: dict, category: str, a: str, b: str, figure) -> dict:
    """{seed: a - b} over the seeds both variants have the figure of: a metric (K = 0), or a curve's
    point (name, K), a seed's mean over its draws (the draws are the same for both variants).
    A seed fixes the random-init encoder, which moves every variant alike (the MVAD and RD runs of
    one seed share their teacher), so the per-seed differences show what the spreads over seeds hide.
    They are shown beside the verdict, which stays the unpaired rule of `verdict`."""
    def value(run):
        if isinstance(figure, str):
            return run[figure]
        name, k = figure
        return mean_std([d[name] for d in run["missing_views"][str(k)]])[0] if "missing_views" in run else None

    scores = {v: {r["seed"]: value(r) for r in runs.values() if r["category"] == category and r["variant"] == v}
              for v in (a, b)}
    scores = {v: {seed: x for seed, x in s.items() if x is not None} for v, s in scores.items()}
    return {seed: scores[a][seed] - scores[b][seed] for seed in sorted(scores[a].keys() & scores[b].keys())}


def verdicts(results: dict) -> list[dict]:
    """Every claim of CLAIMS whose two variants have runs: the figures, their difference, the per-seed
    differences and the verdict."""
    summaries = {(c, v): summarize(results["runs"], c, v) for c in categories_of(results) for v in VARIANTS}
    rows = []
    for claim, source, category, a, b, figure in CLAIMS:
        first, second = claim_figures(summaries, category, a, figure), claim_figures(summaries, category, b, figure)
        if first is None or second is None:
            continue
        rows.append({"claim": claim, "source": source, "category": category, "a": a, "b": b, "figure": figure,
                     "first": first, "second": second, "difference": first[0] - second[0],
                     "by_seed": paired_differences(results["runs"], category, a, b, figure),
                     "verdict": verdict(first, second)})
    return rows


def categories_of(results: dict) -> list[str]:
    """The categories of the runs, in the order they first ran."""
    return list(dict.fromkeys(r["category"] for r in results["runs"].values()))


def markdown(results: dict) -> str:
    """ablations.md: per category the metrics per variant and the missing-view curves; the verdicts;
    last, the time all runs took."""
    s, runs = results["settings"], results["runs"].values()
    lines = ["# Ablations", "", f"Profile {s['profile']}: {s['image_size']} px, batch {s['batch_size']}, "
             f"{s['epochs']} epochs, view-norm {'on' if s['view_norm'] else 'off'}, weights {s['weights']}, "
             f"device {s['device']}; data: {s['data']}. Mean ± standard deviation over the seeds, in percent; "
             "train s: train.main's wall time (the first run of a category also generates the synthetic data); "
             "parameters in millions (trainable in brackets).", ""]
    for category in categories_of(results):
        rows = {v: summarize(results["runs"], category, v) for v in VARIANTS}
        rows = {v: r for v, r in rows.items() if r is not None}
        lines += [f"## {category}", "", "| variant | seeds | sample AUROC | sample AP | image AUROC | pixel AUROC | "
                  "AU-PRO | train s | parameters, M |", "|---|---|---|---|---|---|---|---|---|"]
        for v, r in rows.items():
            lines.append(f"| {VARIANTS[v][0]} | {len(r['seeds'])} | " + " | ".join(cell(r[k]) for k in METRICS)
                         + f" | {cell(r['train_seconds'], 1, 0)} | {r['parameters'][0] / 1e6:.1f} "
                         f"({r['trainable_parameters'][0] / 1e6:.1f}) |")
        lines += curve_tables({v: r for v, r in rows.items() if r["curves"]})
    lines += verdict_table(verdicts(results))
    minutes = sum(r["train_seconds"] + r["eval_seconds"] + r.get("curve_seconds", 0) for r in runs) / 60
    lines.append(f"{len(runs)} runs took {minutes // 60:.0f} h {minutes % 60:.0f} min (training, evaluation "
                 "and the missing-view curves).")
    return "\n".join(lines) + "\n"


CURVE_TITLES = {"sample_auroc": "sample AUROC, labelled by the views left",
                "sample_auroc_all_views": "sample AUROC, labelled by all the sample's views",
                "image_auroc": "image AUROC (the views left)"}


def curve_tables(rows: dict) -> list[str]:
    """The missing-view curves of the variants that have them, one table per curve."""
    if not rows:
        return [""]
    K = sorted(next(iter(rows.values()))["curves"]["sample_auroc"])
    lines = [""]
    for name, title in CURVE_TITLES.items():
        lines += [f"Missing views, {title}, K views removed at random from every test sample (paired draws):", "",
                  "| variant | " + " | ".join(f"K = {k}" for k in K) + " |", "|---|" + "---|" * len(K)]
        lines += [f"| {VARIANTS[v][0]} | " + " | ".join(cell(r["curves"][name].get(k, (math.nan, math.nan, 0)))
                                                       for k in K) + " |" for v, r in rows.items()]
        lines.append("")
    positives = next(iter(rows.values()))["positives"]
    lines[-1:] = ["Defective samples left (labelled by the views left): "
                  + ", ".join(f"K = {k}: {positives[k]:.1f}" for k in K), ""]
    return lines


def verdict_table(rows: list[dict]) -> list[str]:
    """The verdicts, one row per claim and category."""
    if not rows:
        return []
    lines = ["## Verdicts", "", "A claim that variant a scores above variant b, decided by the rule of `verdict`: "
             "a difference smaller than the two standard deviations together is undecided. Beside it, a - b seed by "
             "seed (a seed fixes the random-init encoder that both variants share).", "",
             "| claim | the papers | category | figure | a | b | a - b | a - b by seed | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        figure = r["figure"] if isinstance(r["figure"], str) else f"{r['figure'][0]}, K = {r['figure'][1]}"
        by_seed = ", ".join(f"{100 * d:+.1f}" for d in r["by_seed"].values()) or "-"
        lines.append(f"| {r['claim']} | {r['source']} | {r['category']} | {figure} | {r['a']}: {cell(r['first'])} | "
                     f"{r['b']}: {cell(r['second'])} | {100 * r['difference']:+.1f} | {by_seed} | {r['verdict']} |")
    return lines + [""]


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
    p.add_argument("--variants", default=None, help="comma list of: " + ", ".join(VARIANTS)
                   + " (None: each category's row of PLAN)")
    p.add_argument("--seeds", type=int, default=3, help=f"seeds per variant: {FIRST_SEED}, {FIRST_SEED + 1}, ...")
    p.add_argument("--categories", default=",".join(PLAN), help="comma list of categories, each trained on its own")
    p.add_argument("--data-root", default=None, help="Real-IAD folder; None: as train.py (else the synthetic data)")
    p.add_argument("--epochs", type=int, default=None, help="None: the profile's epochs; N: a study of its own, "
                                                             "ablations_eN.json and runs/ablations_eN")
    p.add_argument("--curves", action="store_true", help="the missing-view curves of finished runs, instead of runs")
    p.add_argument("--draws", type=int, default=None, help="random draws per K of removed views (None: 5, quick: 1)")
    p.add_argument("--runs", type=Path, default=None, help="run folders (None: runs/<the JSON's name>: "
                                                           "runs/ablations, quick: runs/ablations_quick)")
    args = common.parse(p, argv)
    # another schedule is another study: its own JSON and run folders beside the default's
    name = ("ablations_quick" if args.quick else "ablations") + (f"_e{args.epochs}" if args.epochs else "")
    args.json = args.out / f"{name}.json"
    args.runs = args.runs or common.ROOT / "runs" / name
    args.draws = args.draws or (1 if args.quick else 5)
    if args.seeds < 1 or args.draws < 1:
        raise data.UserError(f"--seeds {args.seeds} and --draws {args.draws}: each must be at least 1")
    return args


def planned(args) -> list[tuple[str, str, int]]:
    """(category, variant, seed) of every run the call asks for, seeds outermost (a first seed of
    every variant before the second of any)."""
    categories = args.categories.split(",")
    variants = {c: args.variants.split(",") if args.variants else PLAN.get(c, list(VARIANTS)) for c in categories}
    check_variants(sorted({v for vs in variants.values() for v in vs}))
    return [(c, v, FIRST_SEED + i) for i in range(args.seeds) for c in categories for v in variants[c]]


def main(argv=None) -> dict:
    """Runs what is missing (or, with --curves, the curves that are), writes after every run; returns
    the results dict of the JSON."""
    args = parse_args(argv)
    wanted = planned(args)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = settings_of(args)
    results = load_results(args.json, settings)
    key = "{}/{}/{}".format
    if args.curves:
        todo = [w for w in wanted if key(*w) in results["runs"] and "missing_views" not in results["runs"][key(*w)]]
    else:
        todo = [w for w in wanted if key(*w) not in results["runs"]]
    print(f"{len(todo)} {'curves' if args.curves else 'runs'} to do, {len(wanted) - len(todo)} done or not "
          f"applicable; profile {settings['profile']}, {settings['epochs']} epochs; writing {args.json}")
    started = time.perf_counter()
    for n, (category, variant, seed) in enumerate(todo, 1):
        if args.curves:
            run, begun = results["runs"][key(category, variant, seed)], time.perf_counter()
            with output_to(run_folder(args, category, variant, seed) / "log.txt"):
                run["missing_views"] = missing_view_curve(run_folder(args, category, variant, seed), settings["device"],
                                                          settings["view_norm"], args.draws)
            run["curve_seconds"], line = time.perf_counter() - begun, "curves"
        else:
            run = results["runs"][key(category, variant, seed)] = one_run(args, settings, variant, category, seed)
            line = f"sample AUROC {percent(run['sample_auroc'])}, train {run['train_seconds']:.0f} s"
        write(results, args)
        print(f"[{n}/{len(todo)}] {category} {variant} seed {seed}: {line} "
              f"({(time.perf_counter() - started) / 60:.1f} min since the start)")
    write(results, args)
    print(f"wrote {args.json} and {args.json.with_suffix('.md').name}")
    return results


if __name__ == "__main__":
    sys.exit(data.run_cli(main))
