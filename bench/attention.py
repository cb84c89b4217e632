"""MVAS against dense cross-attention: time, peak memory and FLOPs of one attention call.

    python bench/attention.py [--quick] [--device cpu|cuda] [--out bench/results] [--max-dense-gib 8]

A call is one query view (batch 1) against the V - 1 = 4 other views of a 5-view sample, as in one
MVAS block (mvad.MultiViewFusion runs the 5 query views of a sample as one batch of such calls):
`mvad.mvas_attention(query, others, n_win, topk)` against `mvad.full_cross_attention(query, others)`,
8 heads, float32, no gradients. FLOPs are the exact counts of `mvad.mvas_flops` and
`mvad.cross_attention_flops` (matrix products only, as FlopCounterMode counts them).

Tables:
1. feature side 16, 32, 64, 128 x channels 64, 128, 256, top-K 4. Windows per side: the official
   n_win of the scales with that side at 256 px input (16: 6, 32: 9, 64: 14); for 128 (a 512 px
   input; the papers are silent) we keep scale 0's windows of 5 x 5 tokens, n_win 28. Dense attention
   holds its (heads x hw x 4hw) float32 matrix twice (logits and softmax); a case that would need more
   than --max-dense-gib is skipped.
2. the papers' ablation axes at scale 0 (64 x 64, C = 64): windows per side at K = 4 (Fig. 4), top-K
   at 8 windows per side (Fig. 5). mvad.window_partition zero-pads the side to a multiple of n_win,
   as the official code: 64 -> 70 for the official 14, windows of 5 x 5 tokens, of which the last row
   and column (27 of 196 windows) hold padding only; padded tokens are attended like the others.
Check (the one pass/fail of the benchmarks): at the official scale 0 (64 x 64, C = 64, n_win 14,
K = 4, 4 other views) MVAS must take at most a tenth of dense attention's CPU time; exit status 1
otherwise. On CUDA the ratio is printed, not checked.
Every case runs in a process of its own on the CPU (bench/common.py), so its peak memory is its own.
"""
import sys
from functools import partial

import torch

import common  # before the project's modules: it puts the repository root on sys.path
import mvad

OTHER_VIEWS = 4  # V - 1 key/value views of a 5-view Real-IAD sample
TOPK, HEADS = 4, 8  # the official top-K and MVAS heads
N_WIN = {16: 6, 32: 9, 64: 14, 128: 28}  # windows per side for each feature side (see the docstring)
SCALE_0 = dict(size=64, channels=64, n_win=14, topk=4)  # the official scale 0 at 256 px input
SPEEDUP_NEEDED = 10.0


def dense_bytes(size: int) -> int:
    """Memory of dense attention's logits and softmax: 2 x heads x hw x (V-1) hw float32."""
    return 2 * HEADS * size**2 * OTHER_VIEWS * size**2 * 4


def attention_case(device, method: str, size: int, channels: int, n_win: int, topk: int, repeats: int) -> dict:
    """Median seconds and peak bytes of one attention call on random features (one process per case)."""
    torch.manual_seed(0)
    query = torch.randn(1, size, size, channels, device=device)  # (N=1, H, W, C)
    others = torch.randn(1, OTHER_VIEWS, size, size, channels, device=device)  # (1, V-1, H, W, C)
    if method == "mvas":
        call = partial(mvad.mvas_attention, query, others, n_win, topk, HEADS)
    else:
        call = partial(mvad.full_cross_attention, query, others, HEADS)
    with torch.no_grad():
        seconds, peak = common.time_and_memory(call, device, repeats)
    return {"seconds": seconds, "peak_bytes": peak}


def measure(args, method: str, size: int, channels: int, n_win: int, topk: int) -> dict:
    """One case: its settings, exact FLOPs, and time and memory unless dense would not fit."""
    if method == "mvas":
        flops = mvad.mvas_flops(size, size, channels, OTHER_VIEWS, n_win, topk)
    else:
        flops = mvad.cross_attention_flops(size, size, channels, OTHER_VIEWS)
    result = {"method": method, "size": size, "channels": channels, "n_win": n_win, "topk": topk, "flops": flops}
    if method == "dense" and dense_bytes(size) > args.max_dense_gib * common.GIB:
        return {**result, "skipped": f"skipped (needs {dense_bytes(size) / common.GIB:.1f} GiB)"}
    result.update(common.run_isolated(attention_case, args.device, method=method, size=size, channels=channels,
                                      n_win=n_win, topk=topk, repeats=args.repeats))
    return result


def cells(r: dict) -> list[str]:
    """Time, memory, GFLOP/s of a case, or its reason for having none."""
    if "seconds" not in r:
        return [r.get("skipped") or r["error"], "", ""]
    return [f"{1e3 * r['seconds']:.2f}", f"{r['peak_bytes'] / common.MIB:.1f}",
            f"{r['flops'] / r['seconds'] / 1e9:.1f}"]


def main() -> int:
    p = common.arguments(__doc__)
    p.add_argument("--max-dense-gib", type=float, default=8.0,
                   help="skip dense cases whose logits + softmax would need more memory (GiB)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (median), after a warm-up")
    args = common.parse(p)
    sizes, channels = ((16, 32, 64), (64,)) if args.quick else ((16, 32, 64, 128), (64, 128, 256))
    n_wins, topks = ((8, 14), (1, 4)) if args.quick else ((4, 8, 14, 16, 32), (1, 2, 4, 8, 16))

    # 1. feature size x channels: MVAS against dense
    grid = []
    for size in sizes:
        for c in channels:
            grid.append({"mvas": measure(args, "mvas", size, c, N_WIN[size], TOPK),
                         "dense": measure(args, "dense", size, c, N_WIN[size], TOPK)})
    rows = []
    for case in grid:
        m, d = case["mvas"], case["dense"]
        speedup = f"{d['seconds'] / m['seconds']:.1f}x" if "seconds" in d and "seconds" in m else "-"
        rows.append([f"{m['size']}x{m['size']}", m["channels"], m["n_win"], *cells(m), *cells(d), speedup,
                     f"{m['flops'] / 1e6:,.1f}", f"{d['flops'] / 1e6:,.1f}", f"{d['flops'] / m['flops']:.0f}x"])
    common.print_table(
        f"MVAS (top-K {TOPK}) vs dense cross-attention: 1 query view x {OTHER_VIEWS} other views, {HEADS} heads, "
        f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats} calls after a warm-up",
        ["features", "C", "n_win", "MVAS ms", "MVAS MiB", "MVAS GFLOP/s", "dense ms", "dense MiB",
         "dense GFLOP/s", "speed-up", "MVAS MFLOP", "dense MFLOP", "FLOP ratio"], rows)

    # 2. the ablation axes at scale 0
    sweep = [{"axis": "n_win", **measure(args, "mvas", 64, 64, a, TOPK)} for a in n_wins]
    sweep += [{"axis": "top-K", **measure(args, "mvas", 64, 64, 8, k)} for k in topks]
    rows = []
    for r in sweep:
        side = -(-64 // r["n_win"])  # window side in tokens
        rows.append([r["axis"], r["n_win"], side * r["n_win"], side**2, r["n_win"] ** 2 - (-(-64 // side)) ** 2,
                     r["topk"], *cells(r), f"{r['flops'] / 1e6:,.1f}"])
    common.print_table(f"MVAS at scale 0 (64x64, C = 64): windows per side at K = {TOPK} (Fig. 4 axis), "
                       "top-K at 8 windows per side (Fig. 5 axis)",
                       ["axis", "n_win", "padded side", "tokens/window", "padding-only windows", "K", "ms", "MiB",
                        "GFLOP/s", "MFLOP"], rows)

    if args.device == "cpu":
        print("MiB on the CPU: the rise of the process's peak resident size in the first call; a few MiB of it "
              "are first-time code paths")

    # the check at the official scale 0
    official = next(case for case in grid if all(case["mvas"][k] == v for k, v in SCALE_0.items()))
    m, d = official["mvas"], official["dense"]
    ratio = d["seconds"] / m["seconds"] if "seconds" in d and "seconds" in m else None
    if ratio is None:
        verdict = "NOT CHECKED (a case was skipped or failed)"
    elif args.device != "cpu":
        verdict = "NOT CHECKED (the check is on CPU time)"
    else:
        verdict = "PASS" if ratio >= SPEEDUP_NEEDED else "FAIL"
    ratio_text = "-" if ratio is None else f"{ratio:.1f}x"
    print(f"\nofficial scale 0 (64x64, C = 64, n_win 14, K = 4, 4 other views): dense / MVAS time = {ratio_text} "
          f"(FLOPs: {d['flops'] / m['flops']:.0f}x); needs >= {SPEEDUP_NEEDED:.0f}x: {verdict}")
    common.write_json("attention", args, {"grid": grid, "sweep": sweep,
                                          "scale_0": {"speedup": ratio, "verdict": verdict}})
    return 1 if verdict == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
