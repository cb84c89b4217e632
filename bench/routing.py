"""Routing quality: does MVAS choose the windows of the other views that see the same surface?

    python bench/routing.py --runs runs/mvad_zipper [RUN ...] [--untrained] [--split test] [--quick]

The built-in synthetic data keeps the geometry behind every view (synthetic.sample_geometry), so for
each MVAS window of one view it is known which windows of the other views see the same object surface,
and how much of it (synthetic.window_overlaps): its geometric counterparts. For each model and each
MVAS block, over the query windows of a split that have a counterpart:
- recall@k: how often a best counterpart (largest overlap) is among the k chosen windows; chance:
  the same for k windows drawn at random from the M candidates, 1 - C(M - t, k) / C(M, k) for t
  best counterparts (ties);
- precision: the share of the k chosen windows that overlap the query window at all; chance: the
  share of the M candidates that do;
- concentration: how many distinct windows (camera, window) are ever chosen, of the V a^2 there
  are, and the share of all choices that go to the 4 most chosen.
Models: the trained runs given (their checkpoints, whatever their routing) and, with --untrained,
MVAD as train.py starts it (the first run's config, or the default at the profile's MVAD image size;
its frozen encoder with ImageNet weights when the file is there, else calibrated on the training
split, as train.py does): its first block at each scale routes on the encoder's features alone.
Writes bench/results/routing.json and routing.md (committed: the README's "What the geometry shows").
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import common  # before the project's modules: it puts the repository root on sys.path
import data
import eval as evaluation
import mvad
import runtime
import synthetic
import train

TOP = 4  # concentration: the share of the choices that go to the TOP most chosen windows
QUICK_MODEL = {"backbone": "resnet18", "n_win": (2, 2, 2), "blocks": (1, 1, 1), "image_size": 64}  # --quick
QUICK_SPLIT = {"n_train": 4, "n_test_normal": 2, "n_test_defect": 2}  # --quick: the synthetic split's sizes


def routing_quality(index: torch.Tensor, overlap: torch.Tensor) -> dict:
    """Recall@k and precision of window choices against the geometric counterparts, with their chance levels.

    Args:
        index: (N, Q, k) the chosen candidates of each query window (`mvad.mvas_routing`).
        overlap: (N, Q, M) the geometric overlap of each query window with each candidate window
            (synthetic.candidate_overlaps, the rows of the query windows).
    Returns:
        {"queries": query windows with a counterpart, "recall", "recall_chance", "precision",
        "precision_chance"}, the rates as means over those query windows.
    """
    M, k = overlap.shape[-1], index.shape[-1]
    best = overlap.amax(dim=-1)  # (N, Q)
    counted = best > 0  # (N, Q) query windows with a counterpart
    chosen = overlap.gather(-1, index)  # (N, Q, k) the chosen windows' overlaps
    ties = (overlap == best[..., None]).sum(-1)[counted].float()  # (n,) best counterparts per query window
    steps = torch.arange(k)
    miss = ((M - ties[:, None] - steps).clamp(min=0) / (M - steps)).prod(-1)  # (n,) k random draws miss them all
    return {"queries": int(counted.sum()),
            "recall": (chosen == best[..., None]).any(-1)[counted].float().mean().item(),
            "recall_chance": (1 - miss).mean().item(),
            "precision": (chosen > 0).float().mean(-1)[counted].mean().item(),
            "precision_chance": (overlap > 0).float().mean(-1)[counted].mean().item()}


def chosen_windows(index: torch.Tensor, views: int, windows: int) -> torch.Tensor:
    """Which window of which camera each choice is: camera * A + window.

    Args:
        index: (N, Q, k) candidates of the query views, N = B*V sample-major (query view = row % V);
            candidate m is window m % A of the (m // A)-th of the other views (mvad.MultiViewFusion).
        views: V; windows: A = a*a.
    Returns:
        (N, Q, k) long in [0, V*A).
    """
    query_view = (torch.arange(index.shape[0]) % views)[:, None, None]  # (N, 1, 1)
    other = index // windows  # (N, Q, k) the rank of the chosen camera among the other views
    return (other + (other >= query_view)) * windows + index % windows


def concentration(ids: torch.Tensor, total: int) -> dict:
    """{"distinct": windows ever chosen, "of": total windows, "top_share": share of the choices that
    go to the TOP most chosen}. ids: any shape, values in [0, total)."""
    counts = torch.bincount(ids.flatten(), minlength=total)
    return {"distinct": int((counts > 0).sum()), "of": total,
            "top_share": (counts.topk(TOP).values.sum() / counts.sum()).item()}


def record_routing(model: mvad.MVAD) -> tuple[list, list]:
    """Forward pre-hooks that record, for every MVAS block, the windows it chooses: the block's own
    routing (`mvad.mvas_routing`) on the block's inputs. Returns (the list each forward appends one
    (N, Q, k) index per block to, in model order; the hook handles)."""
    records, handles = [], []

    def hook(block, args):
        x, pos, table, pooled, candidates, present, overlap = (*args, None, None)[:7]
        q = mvad.window_partition(x + pos, block.n_win, image_only=True).mean(dim=2)  # (N, Q, C)
        records.append(mvad.mvas_routing(q, pooled[candidates], block.topk, present, block.routing, overlap)[1])

    for fusion in model.fusion:
        handles += [block.register_forward_pre_hook(hook) for block in fusion.blocks]
    return records, handles


def measure(model: mvad.MVAD, dataset, batch_size: int, device) -> list[dict]:
    """Routing quality of every MVAS block of `model` over `dataset` (a synthetic.WithOverlaps split).
    Returns one row per block: scale, block, n_win, k, candidates M and the figures of
    `routing_quality` and `concentration`."""
    cfg = model.cfg
    blocks = [(s, b) for s, fusion in enumerate(model.fusion) for b in range(len(fusion.blocks))]
    indices, overlaps = [[] for _ in blocks], [[] for _ in blocks]
    records, handles = record_routing(model)
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=batch_size):
            records.clear()
            images, extra = batch["images"].to(device), synthetic.routing_inputs(batch, device)
            model.features(images, overlaps=extra["overlaps"] if cfg.routing == "oracle" else None)
            B, V = images.shape[:2]
            for n, (s, _) in enumerate(blocks):
                size = cfg.image_size // model.encoder.strides[s]
                rows = mvad.image_windows(size, size, cfg.n_win[s])  # the query windows the block computes
                indices[n].append(records[n].cpu())
                overlaps[n].append(batch["overlaps"][s].flatten(0, 1)[:, rows])  # (B*V, Q, M)
    for handle in handles:
        handle.remove()
    rows = []
    for n, (s, b) in enumerate(blocks):
        index, overlap = torch.cat(indices[n]), torch.cat(overlaps[n])
        A = cfg.n_win[s] ** 2
        rows.append({"scale": s, "block": b, "n_win": cfg.n_win[s], "k": index.shape[-1], "candidates": overlap.shape[-1],
                     **routing_quality(index, overlap), **concentration(chosen_windows(index, V, A), V * A)})
    return rows


def untrained_model(config: dict, root: Path, category: str, device) -> mvad.MVAD:
    """MVAD as train.py starts it (seed 42) from `config` (an MVADConfig as a dict; routing "dot", the
    encoder's weights "auto"), its encoder calibrated on the training split when it is random-init."""
    torch.manual_seed(train.TrainConfig.seed)
    model = runtime.place(mvad.MVAD(mvad.MVADConfig(**{**config, "weights": "auto", "routing": "dot"})), device)
    split = data.RealIAD(root, [category], "train", image_size=model.cfg.image_size)
    train.calibrate_frozen_encoders(model, split, device, print)
    return model.eval()


def run_labels(folders: list[Path]) -> list[str]:
    """A label per run folder: its name, or parent/name for all of them where two share a name (the study's
    runs are runs/ablations/<category>/<variant>/seed<seed>: "mvad/seed42", "mvad-cosine/seed42")."""
    names = [folder.name for folder in folders]
    if len(set(names)) == len(names):
        return names
    return [f"{folder.parent.name}/{folder.name}" for folder in folders]


def models(args) -> list[tuple[str, mvad.MVAD, Path, str]]:
    """(label, model in eval mode, data root, category) for every --runs folder, then --untrained."""
    out = []
    paths = [run / "last.pt" if run.is_dir() else run for run in args.runs]
    for run, path, label in zip(args.runs, paths, run_labels([path.parent for path in paths])):
        model, checkpoint = evaluation.load_model(str(path))
        if checkpoint["method"] != "mvad" or model.fusion is None:
            raise data.UserError(f"--runs {run}: not an MVAD run with MVAS blocks ({checkpoint['method']})")
        settings = checkpoint["train"]
        out.append((label, runtime.place(model, args.device).eval(), Path(settings["data_root"]),
                    settings["category"]))
    if args.untrained and out:  # the first run's config and data
        config, root, category = dataclasses.asdict(out[0][1].cfg), out[0][2], out[0][3]
    elif args.untrained:  # the default command's model and data (--quick: tiny ones)
        size = train.profile_for(torch.device(args.device), "mvad")["image_size"]
        config = dataclasses.asdict(mvad.MVADConfig(**{"image_size": size, **(QUICK_MODEL if args.quick else {})}))
        root, category = synthetic.synthetic_root(args.category, **(QUICK_SPLIT if args.quick else {})), args.category
    if args.untrained:
        out.append(("untrained", untrained_model(config, root, category, args.device), root, category))
    return out


def markdown(results: dict) -> str:
    """One table per model: a row per MVAS block."""
    lines = ["# Routing quality", "", "Per MVAS block, over the query windows of the split that have a "
             "geometric counterpart: recall@k (chance), precision (chance), in percent; windows ever chosen "
             f"of all; the share of the choices that go to the {TOP} most chosen.", ""]
    for label, entry in results.items():
        lines += [f"## {label} ({entry['category']}, {entry['split']} split, routing {entry['routing']})", "",
                  "| scale | block | a | k | candidates | query windows | recall@k (chance) | precision (chance) "
                  f"| windows chosen | top-{TOP} share |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['scale']} | {r['block']} | {r['n_win']} | {r['k']} | {r['candidates']} | {r['queries']} | "
                  f"{100 * r['recall']:.1f} ({100 * r['recall_chance']:.1f}) | {100 * r['precision']:.1f} "
                  f"({100 * r['precision_chance']:.1f}) | {r['distinct']} of {r['of']} | {100 * r['top_share']:.0f}% |"
                  for r in entry["rows"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = common.arguments(__doc__)
    p.add_argument("--runs", type=Path, nargs="*", default=[], help="MVAD run folders (or their last.pt)")
    p.add_argument("--untrained", action="store_true", help="also MVAD as training starts it")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--category", default="zipper", help="the synthetic category of --untrained without --runs")
    p.add_argument("--batch-size", type=int, default=4)
    args = common.parse(p, argv)
    if not args.runs and not args.untrained:
        raise data.UserError("nothing to measure: give --runs RUN ... and/or --untrained")
    results = {}
    for label, model, root, category in models(args):
        split = data.RealIAD(root, [category], args.split, image_size=model.cfg.image_size)
        sizes = [model.cfg.image_size // s for s in model.encoder.strides]
        rows = measure(model, synthetic.WithOverlaps(split, root, sizes, model.cfg.n_win), args.batch_size, args.device)
        results[label] = {"category": category, "split": args.split, "routing": model.cfg.routing,
                          "image_size": model.cfg.image_size, "rows": rows}
        common.print_table(f"{label}: routing {model.cfg.routing}, {category} {args.split} split",
                           ["scale/block", "recall@k", "chance", "precision", "chance", "chosen", f"top-{TOP}"],
                           [[f"{r['scale']}/{r['block']}", f"{100 * r['recall']:.1f}", f"{100 * r['recall_chance']:.1f}",
                             f"{100 * r['precision']:.1f}", f"{100 * r['precision_chance']:.1f}",
                             f"{r['distinct']}/{r['of']}", f"{100 * r['top_share']:.0f}%"] for r in rows])
    name = "routing_quick" if args.quick else "routing"
    common.write_json(name, args, results)
    (args.out / f"{name}.md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    sys.exit(data.run_cli(main))
