"""Data: synthetic generation time and Real-IAD loading throughput over the synthetic zipper.

    python bench/data.py [--quick] [--device cpu|cuda] [--out bench/results]

1. `synthetic.synthesize` writes the default synthetic split (40 train, 30 normal and 30 defective test
   samples; --quick: 4, 2, 2) of `zipper` into a temporary folder, at 128 and 256 px: seconds per
   split (median of 3 runs after a warm-up; --quick: one run) and per sample. It renders on one thread.
2. `data.RealIAD(root, "zipper", "train", image_size)` over the cached synthetic zipper
   (`synthetic.synthetic_root("zipper")`: 40 training samples of 5 views, stored at 256 px), read through a
   DataLoader (batch 4, train.py's CPU batch) with 0 and 2 worker processes, at 128 and 256 px, plain
   (MVAD) and wrapped in `data.PseudoAnomalies` (IDIF's input). One epoch = the whole train split
   (--quick: its first 4 samples), workers started afresh each epoch as in train.py; median of 3
   epochs after a warm-up epoch (--quick: one epoch, no warm-up). On CUDA every batch is also copied to
   the GPU (pinned memory, as train.py). Throughput in samples/s and images/s (5 images per sample).
"""
import tempfile

from torch.utils.data import DataLoader, Subset

import common  # before the project's modules: it puts the repository root on sys.path
import data
import synthetic

BATCH = 4  # train.py's CPU batch size
VIEWS = len(data.CAMERAS)


def epoch_seconds(dataset, workers: int, device: str, repeats: int, warmup: int) -> float:
    """Median seconds to read the whole dataset once through a fresh DataLoader."""
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, pin_memory=device == "cuda")

    def epoch():
        for batch in loader:
            for key in ("images", "corrupted"):
                if key in batch:
                    batch[key].to(device, non_blocking=True)

    return common.median_seconds(epoch, device, repeats, warmup)


def main() -> None:
    args = common.parse(common.arguments(__doc__))
    repeats, warmup = (1, 0) if args.quick else (3, 1)
    split = (4, 2, 2) if args.quick else (40, 30, 30)  # train, normal test, defective test samples

    # 1. synthetic generation
    synthesis = []
    for resolution in (128, 256):
        with tempfile.TemporaryDirectory() as folder:
            seconds = common.median_seconds(lambda: synthetic.synthesize(folder, "zipper", *split, resolution=resolution),
                                            "cpu", repeats, warmup)
        synthesis.append({"resolution": resolution, "samples": sum(split), "seconds": seconds})
    common.print_table(f"synthetic.synthesize: zipper, {split[0]} train + {split[1]} normal + {split[2]} defective "
                       f"test samples (5 views each), one thread, median of {repeats}",
                       ["resolution", "samples", "seconds", "s/sample"],
                       [[f"{r['resolution']} px", r["samples"], f"{r['seconds']:.2f}",
                         f"{r['seconds'] / r['samples']:.3f}"] for r in synthesis])

    # 2. loading throughput
    root = synthetic.synthetic_root("zipper")
    loading = []
    for image_size in (128, 256):
        plain = data.RealIAD(root, "zipper", "train", image_size=image_size)
        if args.quick:
            plain = Subset(plain, range(4))
        for name, dataset in (("RealIAD", plain), ("+ PseudoAnomalies", data.PseudoAnomalies(plain, seed=0))):
            for workers in (0, 2):
                seconds = epoch_seconds(dataset, workers, args.device, repeats, warmup)
                loading.append({"dataset": name, "image_size": image_size, "workers": workers,
                                "samples": len(dataset), "seconds": seconds, "samples_per_s": len(dataset) / seconds,
                                "images_per_s": VIEWS * len(dataset) / seconds})
    common.print_table(f"data.RealIAD through a DataLoader (batch {BATCH}), synthetic zipper train split, "
                       f"{args.device}, median of {repeats} epochs",
                       ["dataset", "image", "workers", "samples", "s/epoch", "samples/s", "images/s"],
                       [[r["dataset"], f"{r['image_size']} px", r["workers"], r["samples"], f"{r['seconds']:.2f}",
                         f"{r['samples_per_s']:.1f}", f"{r['images_per_s']:.1f}"] for r in loading])
    print("workers start afresh every epoch (train.py's DataLoader is not persistent): their start-up is included")
    common.write_json("data", args, {"synthesis": synthesis, "loading": loading, "root": str(root)})


if __name__ == "__main__":
    main()
