"""Training throughput of MVAD and IDIF, where a step's time goes, and how close it runs to the machine's peak.

    python bench/train.py [--quick] [--device cpu|cuda] [--out bench/results]

Set-up as train.py builds it: `train.TrainConfig` (weights="none": no downloads; the random encoder is
not calibrated, which does not change the cost), `train.training_set`, `train.build_model` (model,
learning-rate rule, AdamW) and `train.train_step` (loss, backward, gradient clipping, AdamW), the
pieces train.py's loop is made of. Data: one batch of the synthetic zipper
train split (40 samples; IDIF's with pseudo-anomalies), loaded once and reused, so the figures are
compute only (bench/data.py measures loading). Sizes: 128 px (batch 4) and 256 px (batch 2) on a CPU,
batch 8 (the papers') on CUDA; --quick: 96 px (the smallest side MVAD's official windows fit), batch 2.

1. Throughput: median step time over 10 steps after 2 warm-up steps (--quick: 2 after 1); samples/s;
   seconds per epoch = steps per epoch x step time.
2. Where the time goes, over 3 further steps (--quick: 1) with hooks on the model's parts:
   forward: a forward pre-hook and a forward hook read the clock around each part (after
   torch.cuda.synchronize on CUDA). Backward: the hooks also pass each part's inputs and outputs
   through an identity autograd function that notes the time when the backward pass reaches it.
   The autograd engine runs the backward nodes of one device in decreasing creation order, the
   reverse of the forward, so the time between the note on a part's outputs and the note on its
   inputs is that part's backward. Forward and backward outside every part (losses, reshapes between
   parts) count as "other".
3. Efficiency: FLOPs of one forward + backward counted by torch.utils.flop_counter.FlopCounterMode
   (matrix products and convolutions; forward FLOPs per part from a forward-only count), divided by
   the median step time (which also holds the optimizer), against the machine's float32 peak,
   measured as the median rate of torch.mm on 4096 x 4096 matrices (--quick: 2048).
"""
import math
import time
from collections import defaultdict

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import common  # before the project's modules: it puts the repository root on sys.path
import mvad
import synthetic
import train

# The parts of each model: (name, bucket, submodules); a ModuleList stands for its members.
PARTS = {
    "mvad": [("frozen encoder", "teacher", ["encoder"]),
             ("MVAS blocks", "fusion", ["fusion"]),
             ("OCBE bottleneck", "fusion", ["bottleneck"]),
             ("decoder", "student", ["decoder"])],
    "idif": [("frozen teacher", "teacher", ["teacher"]),
             ("student encoder", "student", ["student"]),
             ("consistency bottleneck", "fusion", ["bottleneck"]),  # f_c = decode(c) is its L_IB mean too
             ("implicit voxel", "fusion", ["implicit_voxel"]),
             ("STN", "fusion", ["stn"]),
             ("view decoders", "student", ["decoders"])],
}
TRAIN_SAMPLES = 40  # the synthetic zipper train split


# ----------------------------------------------------------------------------- set-up and one step


def build(method: str, image_size: int, batch_size: int, device: str, layout: str = "train.py"):
    """Model, optimizer and one batch, as train.run builds them; layout "contiguous" keeps the default
    memory format where train.py would use channels-last (runtime.place), for the before/after."""
    cfg = train.resolve(train.TrainConfig(method=method, image_size=image_size, batch_size=batch_size,
                                          weights="none", device=device))
    dataset = train.training_set(cfg, synthetic.synthetic_root("zipper"))
    _, model, optimizer = train.build_model(cfg, dataset[0]["images"].shape[0], device)
    if layout == "contiguous":
        model.to(memory_format=torch.contiguous_format)
    batch = next(iter(DataLoader(dataset, batch_size=batch_size)))
    return model.train(), optimizer, batch


def step(model, optimizer, batch, method: str, device: str) -> None:
    """One training step of train.py's loop."""
    train.train_step(model, optimizer, batch, method, torch.device(device), model.cfg.clip)


def part_modules(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the named submodules, members of a ModuleList each on their own."""
    found = []
    for name in names:
        module = model.get_submodule(name)
        found += ([(f"{name}.{i}", m) for i, m in enumerate(module)] if isinstance(module, nn.ModuleList)
                  else [(name, module)])
    return found


# ----------------------------------------------------------------------------- time per part


class _Note(torch.autograd.Function):
    """Identity; its backward notes (time, label) when the backward pass reaches it."""

    @staticmethod
    def forward(ctx, x, label, notes, device):
        ctx.label, ctx.notes, ctx.device = label, notes, device
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        common.synchronize(ctx.device)
        ctx.notes.append((time.perf_counter(), ctx.label))
        return grad, None, None, None


def _note_tensors(x, label, notes, device):
    """x with every tensor in it that requires grad passed through _Note (tensors, lists, tuples and
    named tuples such as idif.Latent)."""
    if isinstance(x, torch.Tensor):
        return _Note.apply(x, label, notes, device) if x.requires_grad else x
    if isinstance(x, (list, tuple)):
        items = [_note_tensors(y, label, notes, device) for y in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


class PartTimer:
    """Forward and backward seconds per part, by hooks (the module docstring says how)."""

    def __init__(self, model: nn.Module, parts, device: str):
        self.device, self.forward, self.backward = device, defaultdict(float), defaultdict(float)
        self.notes, self.started = [], []
        self.handles = []
        for name, _, submodules in parts:
            for _, module in part_modules(model, submodules):
                self.handles.append(module.register_forward_pre_hook(self._enter))
                self.handles.append(module.register_forward_hook(lambda m, i, out, name=name: self._exit(name, out)))

    def _enter(self, module, inputs):
        common.synchronize(self.device)
        self.started.append(time.perf_counter())
        return _note_tensors(inputs, "other", self.notes, self.device)  # its backward ends here

    def _exit(self, name, outputs):
        common.synchronize(self.device)
        self.forward[name] += time.perf_counter() - self.started.pop()
        return _note_tensors(outputs, name, self.notes, self.device)  # its backward starts here

    def step(self, model, optimizer, batch, method: str) -> None:
        """One training step with the total forward and backward time as part "total"."""
        device = torch.device(self.device)
        common.synchronize(device)
        start = time.perf_counter()
        loss = train.training_loss(model, batch, method, device)["loss"]
        common.synchronize(device)
        middle = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        self.notes.clear()
        loss.backward()
        common.synchronize(device)
        end = time.perf_counter()
        self.forward["total"] += middle - start
        self.backward["total"] += end - middle
        # each note starts a segment of its label, up to the next note; before the first: the loss
        for (t, label), t_next in zip([(middle, "other")] + self.notes, [t for t, _ in self.notes] + [end]):
            self.backward[label] += t_next - t
        torch.nn.utils.clip_grad_norm_(model.parameters(), model.cfg.clip)
        optimizer.step()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------------- FLOPs and peak


def count_flops(model, optimizer, batch, method: str, device: str) -> tuple[int, dict]:
    """(FLOPs of one forward + backward, forward FLOPs per qualified submodule name), the fused
    attention's CPU kernel included (mvad.CPU_ATTENTION_FLOPS, which FlopCounterMode lacks)."""
    with FlopCounterMode(display=False, custom_mapping=mvad.CPU_ATTENTION_FLOPS) as forward_only:
        train.training_loss(model, batch, method, torch.device(device))
    with FlopCounterMode(display=False, custom_mapping=mvad.CPU_ATTENTION_FLOPS) as both:
        train.training_loss(model, batch, method, torch.device(device))["loss"].backward()
    optimizer.zero_grad(set_to_none=True)
    prefix = type(model).__name__ + "."
    per_module = {k[len(prefix):]: sum(v.values()) for k, v in forward_only.get_flop_counts().items()
                  if k.startswith(prefix)}
    return both.get_total_flops(), per_module


def matmul_peak(device: str, n: int) -> float:
    """Median FLOP/s of torch.mm on n x n float32 matrices."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / common.median_seconds(lambda: torch.mm(a, b), device, repeats=5, warmup=1)


# ----------------------------------------------------------------------------- the benchmark


def benchmark(method: str, image_size: int, batch_size: int, args, steps: int, warmup: int, profiled: int) -> dict:
    """Throughput, FLOPs and time per part of one method at one size (the module docstring's 1-3)."""
    before = build(method, image_size, batch_size, args.device, layout="contiguous")
    contiguous_seconds = common.median_seconds(lambda: step(*before[:3], method, args.device),
                                               args.device, repeats=steps, warmup=warmup)
    del before
    model, optimizer, batch = build(method, image_size, batch_size, args.device)
    seconds = common.median_seconds(lambda: step(model, optimizer, batch, method, args.device),
                                    args.device, repeats=steps, warmup=warmup)
    flops, forward_flops = count_flops(model, optimizer, batch, method, args.device)
    timer = PartTimer(model, PARTS[method], args.device)
    for _ in range(profiled):
        timer.step(model, optimizer, batch, method)
    timer.remove()
    total = timer.forward["total"] + timer.backward["total"]
    parts = []
    for name, bucket, submodules in PARTS[method] + [("other", "other", [])]:
        if name == "other":
            fwd = timer.forward["total"] - sum(timer.forward[p] for p, _, _ in PARTS[method])
        else:
            fwd = timer.forward[name]
        part_flops = sum(forward_flops.get(q, 0) for q, _ in part_modules(model, submodules))
        parts.append({"part": name, "bucket": bucket, "forward_s": fwd / profiled,
                      "backward_s": timer.backward[name] / profiled, "share": (fwd + timer.backward[name]) / total,
                      "forward_flops": part_flops if name != "other" else None})
    return {"method": method, "image_size": image_size, "batch_size": batch_size, "step_s": seconds,
            "step_s_contiguous": contiguous_seconds,
            "samples_per_s": batch_size / seconds, "epoch_s": math.ceil(TRAIN_SAMPLES / batch_size) * seconds,
            "flops": flops, "flops_per_s": flops / seconds, "parts": parts,
            "forward_s": timer.forward["total"] / profiled, "backward_s": timer.backward["total"] / profiled}


def main() -> None:
    args = common.parse(common.arguments(__doc__))
    if args.quick:
        sizes, steps, warmup, profiled, mm_side = ((96, 2),), 2, 1, 1, 2048
    else:
        sizes = ((128, 8), (256, 8)) if args.device == "cuda" else ((128, 4), (256, 2))
        steps, warmup, profiled, mm_side = 10, 2, 3, 4096
    peak = matmul_peak(args.device, mm_side)
    print(f"float32 matmul peak ({mm_side}x{mm_side}, {args.device}, {torch.get_num_threads()} threads): "
          f"{peak / 1e9:,.1f} GFLOP/s")

    runs = [benchmark(method, size, batch, args, steps, warmup, profiled)
            for size, batch in sizes for method in ("mvad", "idif")]
    common.print_table(f"Training throughput, {args.device}, median of {steps} steps after {warmup} warm-up "
                       "(compute only: one batch reused)",
                       ["method", "image", "batch", "contiguous ms", "step ms", "samples/s",
                        f"s/epoch ({TRAIN_SAMPLES})", "GFLOP/step", "GFLOP/s", "of peak"],
                       [[r["method"], f"{r['image_size']} px", r["batch_size"],
                         f"{1e3 * r['step_s_contiguous']:.0f}", f"{1e3 * r['step_s']:.0f}",
                         f"{r['samples_per_s']:.2f}", f"{r['epoch_s']:.1f}", f"{r['flops'] / 1e9:.1f}",
                         f"{r['flops_per_s'] / 1e9:.1f}", f"{r['flops_per_s'] / peak:.0%}"] for r in runs])
    print("contiguous ms: the step in the default memory format; step ms: as train.py runs it (runtime.place: "
          "channels-last on a CPU). GFLOP/step: forward + backward as FlopCounterMode counts them; GFLOP/s: "
          "that over the whole step (optimizer included)")
    if args.device == "cuda":
        print(f"the peak is float32 torch.mm with TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}; "
              f"cuDNN convolutions may use TF32 (torch.backends.cudnn.allow_tf32 = {torch.backends.cudnn.allow_tf32})")

    for r in runs:
        common.print_table(
            f"{r['method']} at {r['image_size']} px, batch {r['batch_size']}: forward {1e3 * r['forward_s']:.0f} ms "
            f"+ backward {1e3 * r['backward_s']:.0f} ms per step (with hooks; mean of {profiled})",
            ["part", "bucket", "forward ms", "backward ms", "of fwd+bwd", "fwd GFLOP", "fwd GFLOP/s"],
            [[p["part"], p["bucket"], f"{1e3 * p['forward_s']:.1f}", f"{1e3 * p['backward_s']:.1f}",
              f"{p['share']:.0%}", "-" if p["forward_flops"] is None else f"{p['forward_flops'] / 1e9:.2f}",
              "-" if not p["forward_flops"] else f"{p['forward_flops'] / p['forward_s'] / 1e9:.1f}"]
             for p in r["parts"]])
        buckets = defaultdict(float)
        for p in r["parts"]:
            buckets[p["bucket"]] += p["share"]
        top = max(r["parts"], key=lambda p: p["share"])
        print("buckets: " + ", ".join(f"{b} {s:.0%}" for b, s in buckets.items())
              + f"; dominant: {max(buckets, key=buckets.get)} (largest part: {top['part']}, {top['share']:.0%})")
    common.write_json("train", args, {"matmul_peak_flops_per_s": peak, "matmul_side": mm_side, "runs": runs})


if __name__ == "__main__":
    main()
