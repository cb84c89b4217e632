"""Multi-view data: the Real-IAD loader, and the pseudo-anomalies that IDIF's student learns from.

A *sample* is one physical object photographed by V = 5 cameras: C1 from the top, C2..C5 from the
sides. `RealIAD` reads whole samples of the Real-IAD release (Wang et al., CVPR 2024;
github.com/Tencent/AnomalyDetection_Real-IAD) as they lie on disk; `PseudoAnomalies` adds the
DRAEM/DeSTSeg pseudo-anomalies that IDIF's denoising student learns from. The built-in synthetic
stand-in for Real-IAD is `synthetic.py`. The scripts' command-line errors live here too (`UserError`,
`ArgumentParser`, `run_cli`).

Shapes: V views (5), H = W = image_size. Items: `images` (V, 3, H, W) ImageNet-normalised, `masks`
(V, 1, H, W) in {0, 1}, `view_labels` (V,) (from the masks), `view_classes` (V,) (from the JSON
classes), `label` (the sample's).

Where the dataset and the papers are silent, we chose:
- Samples: views grouped by the sample key in the file name (ADEval's regex: all before `_C<n>_`),
  ordered by camera; a sample that lacks one of C1..C5 is left out and counted in one warning.
- Folders: the smallest `realiad_<res>` >= image_size; the category may sit in one extra wrapping folder.
- Labels as the official MVAD code (lewandofskee/MVAD, data/ad_dataset.py, trainer/mvad_trainer.py):
  a sample is anomalous when any view's JSON class is not `meta.normal_class`, a view when its resized
  mask keeps a defect pixel (so a tiny defect can leave its view normal and its sample anomalous).
- Views of a defective sample without the defect: class "OK" and no mask, as the release; or a defect
  class without a mask; both get an empty mask.
- Images: shorter side resized (bilinear, antialiased), centre-cropped; masks `> 0` at their own
  resolution, resized the same way, `> 0.5` (the official code).
- Pseudo-anomalies: DRAEM's Perlin masks and beta blending, textures procedural, cut from another
  training image or read from a DTD folder; each view corrupted with probability 0.5 (DRAEM's rate),
  anywhere in the image (background included, as DRAEM).
"""
import argparse
import json
import math
import os
import re
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

CATEGORIES = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts",
    "pcb", "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator",
    "rolled_strip_base", "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy",
    "toy_brick", "transistor1", "u_block", "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick",
    "zipper",
)
CAMERAS = ("C1", "C2", "C3", "C4", "C5")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFECT_CODES = {
    "AK": "pit", "BX": "deformation", "CH": "abrasion", "HS": "scratch", "PS": "damage",
    "QS": "missing parts", "YW": "foreign objects", "ZW": "contamination",
}
ENTRY_KEYS = ("category", "anomaly_class", "image_path", "mask_path")
# ADEval's sample key: everything before `_C<n>_` (group 1), and the camera id (group 2).
SAMPLE_KEY = re.compile(r"([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_(C[0-9])_")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class UserError(Exception):
    """A bad input the user can fix; the message is one line naming the file or flag and the fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the defaults shown in --help, whose flag errors are UserErrors, so that every bad
    input at the command line ends the same way (see `run_cli`)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def run_cli(main, argv=None) -> int:
    """Runs a command line's `main(argv)`; a UserError, a ValueError or a file's OSError (a full disk)
    becomes one line `error: ...` on stderr and exit status 2, never a traceback. The model files raise
    ValueError, Python's type for a bad argument, so that they import only torch. Returns the exit status."""
    try:
        main(argv)
    except (UserError, ValueError) as e:
        # Raised in a DataLoader worker, the message arrives after the worker's traceback: keep the last line.
        message = str(e).strip().splitlines()[-1].split(f"{type(e).__name__}: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a file: a bug or the system, its traceback is shown
            raise
        # a full disk or a folder without permission, e.g. history.json after an epoch: last.pt is already
        # complete (written atomically before it), so a training run loses nothing and can continue
        print(f"error: {e.filename}: {e.strerror or e}; free space or fix the permissions there (a training run "
              "continues from its last checkpoint with --resume)", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------------------------------
# Images


def normalize(images):
    """ImageNet normalisation. Args: images (..., 3, H, W) in [0, 1]. Returns: the same shape."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (images - mean) / std


def denormalize(images):
    """Inverse of `normalize`. Args: images (..., 3, H, W). Returns: the same shape, in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return images * std + mean


def resize_crop(x, size):
    """Resize the shorter side to `size` (bilinear, antialiased as PIL's resize), then centre-crop
    to a square.

    Args:
        x: (C, H, W) float tensor.
        size: output side.
    Returns:
        (C, size, size) tensor.
    """
    _, h, w = x.shape
    if (h, w) != (size, size):
        scale = size / min(h, w)
        h, w = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True)[0]
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top:top + size, left:left + size]


def _read_pixels(path, size, mode):
    """Decode an image file to a uint8 array, reading JPEGs at a reduced scale when that is enough."""
    try:
        with Image.open(path) as image:
            image.draft(mode, (size, size))  # JPEG: decode directly at >= size, much faster
            return np.array(image.convert(mode))
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"cannot read {path} ({error}); the file is damaged or incomplete, "
                        "extract it again from the dataset archive") from None


def load_image(path, size):
    """Args: path to an RGB image; size: output side. Returns: (3, size, size) float in [0, 1]."""
    pixels = torch.from_numpy(_read_pixels(path, size, "RGB")).permute(2, 0, 1)  # (3, h, w)
    return resize_crop(pixels.float() / 255, size)


def load_mask(path, size):
    """A defect mask as the official MVAD code reads it (lewandofskee/MVAD data/ad_dataset.py: `> 0`
    at the file's resolution, torchvision's bilinear Resize; trainer/mvad_trainer.py: `> 0.5`).

    Args: path to a mask image (defect > 0); size: output side. Returns: (1, size, size) in {0, 1}.
    """
    pixels = torch.from_numpy(_read_pixels(path, size, "L"))[None] > 0  # (1, h, w) binarised at source
    return (resize_crop(pixels.float(), size) > 0.5).float()


# ----------------------------------------------------------------------------------------------------
# Real-IAD on disk


def _json_dirs(root):
    return [root / "realiad_jsons", root / "realiad_jsons" / "realiad_jsons"]


def available_categories(root):
    """The categories that have a Real-IAD JSON under `root` (flat or nested realiad_jsons folder)."""
    return sorted({p.stem for d in _json_dirs(root) if d.is_dir() for p in d.glob("*.json")})


def find_json(root, category):
    """The path of `category`'s Real-IAD JSON under `root`; a UserError naming both places if absent."""
    for directory in _json_dirs(root):
        if (directory / f"{category}.json").is_file():
            return directory / f"{category}.json"
    expected = " or ".join(str(d / f"{category}.json") for d in _json_dirs(root))
    available = ", ".join(available_categories(root)) or "none"
    raise UserError(f"no Real-IAD JSON for category '{category}': expected {expected} "
                    f"(categories available there: {available})")


def _categories(root, category):
    """Resolve `category` (a name, a list of names or "all") to the list of names to load."""
    if category == "all":
        names = available_categories(root)
        if not names:
            raise UserError(f"no Real-IAD JSONs under {root / 'realiad_jsons'}; "
                            "extract realiad_jsons.zip into the Real-IAD folder")
        return names
    names = [category] if isinstance(category, str) else list(category)
    for name in names:
        if name not in CATEGORIES and name not in available_categories(root):
            raise UserError(f"unknown category '{name}'; valid categories: {', '.join(CATEGORIES)}, "
                            "or 'all'")
    return names


def _resolution_dir(root, image_size, resolution):
    """Pick `realiad_<resolution>`, or else the smallest `realiad_<n>` with n >= image_size."""
    present = {p.name[len("realiad_"):]: p for p in root.glob("realiad_*")
               if p.is_dir() and re.fullmatch(r"realiad_([0-9]+|raw)", p.name)}
    order = sorted(present, key=lambda r: math.inf if r == "raw" else int(r))
    listing = ", ".join(f"realiad_{r}" for r in order) or "none"
    if resolution is not None:
        if str(resolution) not in present:
            raise UserError(f"no folder {root / f'realiad_{resolution}'} (present: {listing}); "
                            "extract that resolution or choose another")
        return present[str(resolution)]
    if not present:
        raise UserError(f"{root} holds no realiad_256, realiad_512, realiad_1024 or realiad_raw folder; "
                        "point the data root at the Real-IAD folder that holds them and realiad_jsons")
    large = [r for r in order if r == "raw" or int(r) >= image_size]
    return present[large[0] if large else order[-1]]


def _category_dir(res_dir, prefix, category, first_image, json_path):
    """Find where the JSON's relative paths start: `realiad_<res>/<prefix>`, possibly inside one
    extra wrapping folder (`<prefix>/<category>/` or `<wrapper>/<prefix>/`)."""
    candidates = [res_dir / prefix, res_dir / prefix / category]
    candidates += [d / prefix for d in sorted(res_dir.iterdir()) if d.is_dir()]
    for base in candidates:
        if (base / first_image).is_file():
            return base
    raise UserError(f"{res_dir / prefix / first_image} (first image of {json_path}) not found, nor inside "
                    f"an extra wrapping folder; extract {category} into {res_dir}")


def read_json(json_path, split):
    """Read one Real-IAD JSON. Returns: (meta dict, list of entries of `split`)."""
    try:
        content = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {json_path} ({error}); extract realiad_jsons again") from None
    if not isinstance(content, dict) or not isinstance(content.get(split), list):
        raise UserError(f"{json_path} has no '{split}' list; a Real-IAD JSON holds meta, train and test")
    entries = content[split]
    for i, entry in enumerate(entries):
        missing = [k for k in ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise UserError(f"{json_path}: {split} entry {i} lacks {', '.join(missing)}; every entry "
                            f"needs {', '.join(ENTRY_KEYS)}")
    return content.get("meta", {}), entries


def group_views(entries, json_path):
    """Group JSON entries into samples by sample key. Returns: {key: {camera: entry}}."""
    samples = defaultdict(dict)
    for entry in entries:
        match = SAMPLE_KEY.search(Path(entry["image_path"]).name)
        if match is None:
            raise UserError(f"{json_path}: cannot read the sample key and camera from "
                            f"'{entry['image_path']}'; Real-IAD names images "
                            "<category>_<nnnn>_<OK or NG_code>_C<n>_<timestamp>.jpg")
        key, camera = match.groups()
        if camera in samples[key]:
            raise UserError(f"{json_path}: two entries for camera {camera} of sample {key}; remove one")
        samples[key][camera] = entry
    return samples


class RealIAD(Dataset):
    """Real-IAD as whole multi-view samples.

    Args:
        root: the Real-IAD folder holding `realiad_<res>/` and `realiad_jsons/`.
        category: a category name, a list of names, or "all" (every category with a JSON).
        split: "train" or "test".
        image_size: side of the square images returned.
        resolution: which `realiad_<res>` folder to read (256, 512, 1024, "raw"); default: the
            smallest one >= image_size.
    Items: dict with `images` (V, 3, H, W) ImageNet-normalised, `masks` (V, 1, H, W) in {0, 1},
    `view_labels` (V,) long (any pixel of the resized mask), `view_classes` (V,) long (JSON class
    not the normal class), `label` int (any view's class anomalous), `sample_id` str (the sample
    key), `category` str, `paths` list of V image paths, `mask_paths` list of V mask paths ("" for
    none).
    """

    def __init__(self, root, category, split, image_size=256, resolution=None):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"Real-IAD root {root} does not exist; pass the folder that holds "
                            "realiad_<res>/ and realiad_jsons/")
        if split not in ("train", "test"):
            raise UserError(f"split must be 'train' or 'test', not '{split}'")
        self.image_size = image_size
        self.categories = _categories(root, category)
        res_dir = _resolution_dir(root, image_size, resolution)
        if res_dir.name != "realiad_raw" and int(res_dir.name[len("realiad_"):]) < image_size:
            warnings.warn(f"no Real-IAD folder with images >= {image_size} px; upsampling {res_dir.name}")
        self.samples = []  # (category, sample key, [(image path, mask path or None)] ordered by camera)
        self.classes = []  # per sample, (V,) 1 where the view's JSON class is not the normal class
        incomplete = []
        for name in self.categories:
            json_path = find_json(root, name)
            meta, entries = read_json(json_path, split)
            if not entries:
                continue
            normal_class = meta.get("normal_class", "OK")
            base = _category_dir(res_dir, meta.get("prefix", ""), name, entries[0]["image_path"],
                                 json_path)
            for key, views in sorted(group_views(entries, json_path).items()):
                if set(views) != set(CAMERAS):
                    incomplete.append(key)
                    continue
                files, classes = [], []
                for camera in CAMERAS:
                    entry = views[camera]
                    image = base / entry["image_path"]
                    classes.append(int(entry["anomaly_class"] != normal_class))
                    has_mask = classes[-1] and entry["mask_path"] is not None
                    mask = base / entry["mask_path"] if has_mask else None
                    for path in (image, mask):
                        if path is not None and not path.is_file():
                            raise UserError(f"{path} (listed in {json_path}) does not exist; the archive "
                                            "looks incompletely extracted")
                    files.append((image, mask))
                self.samples.append((name, key, files))
                self.classes.append(torch.tensor(classes))
        if incomplete:
            warnings.warn(f"left out {len(incomplete)} {split} samples that lack one of the views "
                          f"{', '.join(CAMERAS)} (first: {incomplete[0]})")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        category, key, files = self.samples[index]
        size = self.image_size
        images = torch.stack([load_image(image, size) for image, _ in files])  # (V, 3, H, W)
        masks = torch.stack([load_mask(mask, size) if mask else torch.zeros(1, size, size)
                             for _, mask in files])  # (V, 1, H, W)
        view_labels = masks.flatten(1).amax(1).long()  # (V,) image labels, from the resized masks
        classes = self.classes[index]  # (V,) the sample label comes from these, as in the official code
        return {"images": normalize(images), "masks": masks, "view_labels": view_labels,
                "view_classes": classes, "label": int(classes.max()), "sample_id": key,
                "category": category, "paths": [str(image) for image, _ in files],
                "mask_paths": [str(mask or "") for _, mask in files]}


def default_real_iad() -> Path | None:
    """The Real-IAD folder found without a flag: $REALIAD_ROOT, else ./data/realiad; None if neither exists."""
    for candidate in (os.environ.get("REALIAD_ROOT"), "data/realiad"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def find_real_iad(data_root: str | None) -> Path | None:
    """The Real-IAD folder: --data-root (which must exist), else `default_real_iad`."""
    if data_root is None:
        return default_real_iad()
    if not Path(data_root).is_dir():
        raise UserError(f"--data-root {data_root}: no such folder; pass the folder that holds "
                        "realiad_<res>/ and realiad_jsons/ (see README)")
    return Path(data_root)


# ----------------------------------------------------------------------------------------------------
# Perlin noise (Perlin 2002), for the pseudo-anomalies (and synthetic.py's defect outlines)


def _fade(t):
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin(y, x, gradients):
    """Gradient noise at arbitrary lattice coordinates.

    Args:
        y, x: (...) float lattice coordinates (one unit = one lattice cell).
        gradients: (P, P, 2) unit gradient vectors (y, x); the lattice repeats every P cells.
    Returns:
        (...) noise values in [-0.71, 0.71], 0 at every lattice point.
    """
    period = gradients.shape[0]
    y0, x0 = y.floor(), x.floor()
    fy, fx = y - y0, x - x0
    iy, ix = y0.long(), x0.long()

    def corner(dy, dx):  # dot product of the corner's gradient with the offset to the corner
        g = gradients[(iy + dy) % period, (ix + dx) % period]  # (..., 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    wy, wx = _fade(fy), _fade(fx)
    return torch.lerp(torch.lerp(corner(0, 0), corner(0, 1), wx),
                      torch.lerp(corner(1, 0), corner(1, 1), wx), wy)


def perlin_gradients(period, generator):
    """Random unit gradients of a lattice that repeats every `period` cells. Returns: (P, P, 2), P = period."""
    angles = 2 * math.pi * torch.rand(period, period, generator=generator)
    return torch.stack((angles.sin(), angles.cos()), -1)  # (P, P, 2)


def perlin_noise(height, width, scale, angle=0.0, generator=None):
    """2-D Perlin noise on a pixel grid, with the lattice rotated about the image centre.

    Args:
        height, width: output size in pixels.
        scale: (sy, sx) lattice cells across the image per axis.
        angle: rotation in radians.
        generator: torch.Generator for the random gradients.
    Returns:
        (height, width) float tensor in [-1, 1] (scaled by sqrt(2), as DRAEM does).
    """
    py = torch.arange(height) + 0.5 - height / 2
    px = torch.arange(width) + 0.5 - width / 2
    py, px = torch.meshgrid(py, px, indexing="ij")  # (H, W) pixel offsets from the centre
    cos, sin = math.cos(angle), math.sin(angle)
    y = ((cos * py - sin * px) / height + 0.5) * scale[0]
    x = ((sin * py + cos * px) / width + 0.5) * scale[1]
    period = 2 * int(max(scale)) + 2  # larger than the rotated image, so the lattice never repeats in it
    return math.sqrt(2) * perlin(y, x, perlin_gradients(period, generator))


def perlin_mask(height, width, generator=None, threshold=0.5):
    """DRAEM's anomaly-shape mask: Perlin noise of scale 2^k per axis (k in 0..5), rotated by an
    angle in (-90, 90) degrees, thresholded.

    Args:
        height, width: mask size.
        generator: torch.Generator.
        threshold: noise level above which a pixel is anomalous (DRAEM: 0.5).
    Returns:
        (height, width) float tensor in {0, 1}.
    """
    ky, kx = torch.randint(0, 6, (2,), generator=generator).tolist()
    angle = (torch.rand((), generator=generator).item() - 0.5) * math.pi
    noise = perlin_noise(height, width, (2 ** ky, 2 ** kx), angle, generator)
    return (noise > threshold).float()


def _fbm(height, width, cells, generator):
    """Fractal noise: three Perlin octaves from `cells` lattice cells up, each half as strong.
    Returns: (height, width) float tensor."""
    return sum(perlin_noise(height, width, (cells * 2 ** i, cells * 2 ** i), generator=generator) * 0.5 ** i
               for i in range(3))


# ----------------------------------------------------------------------------------------------------
# Pseudo-anomalies for IDIF's denoising student (DRAEM / DeSTSeg recipe)

VIEW_CORRUPTION = 0.5  # probability that a view is corrupted (DRAEM's anomaly rate)
MAX_BETA = 0.8  # beta ~ U(0, 0.8): how much of the original shows through the texture


def blend_anomaly(image, texture, mask, beta):
    """DRAEM's blend: out = x (1 - m) + (1 - beta) tex m + beta x m.

    Args:
        image: (3, H, W) in [0, 1]; texture: (3, H, W) in [0, 1]; mask: (H, W) in {0, 1}.
        beta: opacity of the original image inside the mask, in [0, 1].
    Returns:
        (3, H, W) in [0, 1].
    """
    return image * (1 - mask) + (1 - beta) * texture * mask + beta * image * mask


def procedural_texture(height, width, generator):
    """A random texture: coloured Perlin clouds, stripes or checks between two random colours.

    Args:
        height, width: size; generator: torch.Generator.
    Returns:
        (3, height, width) in [0, 1].
    """
    colours = torch.rand(2, 3, 1, 1, generator=generator)
    kind = torch.randint(3, (), generator=generator).item()
    if kind == 0:  # clouds
        k = 2 ** torch.randint(1, 5, (), generator=generator).item()
        pattern = (_fbm(height, width, k, generator) * 2 + 0.5).clamp(0, 1)
    else:  # stripes (1) or checks (2) of a random period and orientation
        angle = torch.rand((), generator=generator).item() * math.pi
        period = 4 + 28 * torch.rand((), generator=generator).item()
        y, x = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
        pattern = (torch.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period) > 0).float()
        if kind == 2:
            pattern = (pattern + (torch.sin(2 * math.pi * (y * math.cos(angle) - x * math.sin(angle))
                                            / period) > 0).float()) % 2
    return torch.lerp(colours[0], colours[1], pattern)


def _cut_texture(image, generator):
    """A texture cut from another image: a random crop of 25-60% of its side, resized to full size.

    Args:
        image: (3, H, W) in [0, 1]; generator: torch.Generator.
    Returns:
        (3, H, W) in [0, 1].
    """
    _, h, w = image.shape
    side = int(min(h, w) * (0.25 + 0.35 * torch.rand((), generator=generator).item()))
    top = torch.randint(h - side + 1, (), generator=generator).item()
    left = torch.randint(w - side + 1, (), generator=generator).item()
    crop = image[None, :, top:top + side, left:left + side]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]


def _dtd_files(dtd_root):
    """The texture images under a DTD-like folder, sorted. Raises UserError when there are none."""
    root = Path(dtd_root)
    if not root.is_dir():
        raise UserError(f"texture folder {root} does not exist; pass the DTD 'images' folder or no "
                        "texture folder at all")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images (.jpg, .png) under texture folder {root}; pass the DTD 'images' folder")
    return files


class PseudoAnomalies(Dataset):
    """Wraps a RealIAD-like dataset and adds pseudo-anomalous copies of its views.

    Each view is corrupted with probability VIEW_CORRUPTION: a Perlin mask (`perlin_mask`) and a
    texture blended in with beta ~ U(0, 0.8) (`blend_anomaly`). Textures are procedural, cut from
    another training image, or (with `dtd_root`) a DTD image, chosen with equal probability.
    Deterministic for a given (seed, epoch, index); call `set_epoch` before iterating each epoch
    (DataLoader workers get a fresh copy of the dataset per epoch unless they are persistent).
    Args:
        dataset: yields dicts with `images` (V, 3, H, W) ImageNet-normalised.
        seed: random seed.
        dtd_root: optional folder of texture images (e.g. DTD's `images/`).
    Items: the wrapped item plus `corrupted` (V, 3, H, W) ImageNet-normalised and `pseudo_masks`
    (V, 1, H, W) in {0, 1} (empty for views left clean).
    """

    def __init__(self, dataset, seed=0, dtd_root=None):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self.textures = _dtd_files(dtd_root) if dtd_root is not None else []

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def _texture(self, index, height, width, generator):
        sources = 3 if self.textures else 2
        source = torch.randint(sources, (), generator=generator).item()
        if source == 0:
            return procedural_texture(height, width, generator)
        if source == 1:  # a view of another training sample
            step = 1 + torch.randint(max(len(self) - 1, 1), (), generator=generator).item()
            other = (index + step) % len(self)  # another sample (the same one if there is only one)
            views = self.dataset[other]["images"]
            view = torch.randint(len(views), (), generator=generator).item()
            return _cut_texture(denormalize(views[view]).clamp(0, 1), generator)
        path = self.textures[torch.randint(len(self.textures), (), generator=generator).item()]
        pixels = torch.from_numpy(_read_pixels(path, max(height, width), "RGB")).permute(2, 0, 1)
        return F.interpolate(pixels[None].float() / 255, size=(height, width), mode="bilinear",
                             antialias=True)[0]  # the whole image, squeezed to size, as DRAEM does

    def __getitem__(self, index):
        item = dict(self.dataset[index])
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        images = denormalize(item["images"]).clamp(0, 1)  # (V, 3, H, W) in [0, 1]
        v, _, h, w = images.shape
        corrupted, masks = images.clone(), torch.zeros(v, 1, h, w)
        for view in range(v):
            if torch.rand((), generator=generator).item() >= VIEW_CORRUPTION:
                continue
            mask = perlin_mask(h, w, generator)
            while not mask.any():  # an empty mask would leave a "corrupted" view clean
                mask = perlin_mask(h, w, generator)
            beta = MAX_BETA * torch.rand((), generator=generator).item()
            texture = self._texture(index, h, w, generator)
            corrupted[view] = blend_anomaly(images[view], texture, mask, beta)
            masks[view, 0] = mask
        item["corrupted"] = normalize(corrupted)
        item["pseudo_masks"] = masks
        return item
