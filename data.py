"""Multi-view data: the Real-IAD loader, a built-in synthetic Real-IAD, and pseudo-anomalies for IDIF.

A *sample* is one physical object photographed by V = 5 cameras: C1 from the top, C2..C5 from the
sides. `RealIAD` reads whole samples of the Real-IAD release (Wang et al., CVPR 2024) as they lie on
disk; `synthesize` writes a small synthetic stand-in in exactly that layout, so that one loader reads
both (`synthetic_root` generates it once into `data/synthetic/` and reuses it); `PseudoAnomalies` adds
the DRAEM/DeSTSeg pseudo-anomalies that IDIF's denoising student learns from.

    python data.py synth --out data/demo --category zipper   # write a split, print its statistics

Shapes: V views (5), H = W = image_size, N = side of the synthetic render grid (= its resolution).
Items: `images` (V, 3, H, W) ImageNet-normalised, `masks` (V, 1, H, W) in {0, 1}, `view_labels` (V,)
(from the masks), `view_classes` (V,) (from the JSON classes), `label` (the sample's).

Where the dataset and the papers are silent, we chose:
- Real-IAD: views are grouped into samples by the sample key in the file name (ADEval's regex:
  everything before `_C<n>_`), never by position in the JSON, and ordered by camera id; samples that
  lack one of C1..C5 are left out and counted in one warning. The smallest `realiad_<res>` folder
  >= image_size is read; the category may sit inside one extra wrapping folder.
- Labels as the official MVAD code (lewandofskee/MVAD, data/ad_dataset.py and
  trainer/mvad_trainer.py): a sample is anomalous when any view's JSON class is not
  `meta.normal_class` (`label`, from `view_classes`); a view (image) is anomalous when its resized
  mask has a positive pixel (`view_labels`), so a defect too small to survive the resizing leaves
  its view normal but its sample anomalous. The release lists the views of a defective sample that
  do not show the defect as class "OK" with a null mask (they lie in the NG folders); a defect
  class with no mask is accepted too (an empty mask).
- Images: shorter side resized to image_size (bilinear, antialiased), then centre-cropped; masks
  as the official code: binarised with `> 0` at their own resolution, resized the same way, `> 0.5`.
- Synthetic objects are height fields (no overhangs), one procedural shape per category (OBJECTS),
  rendered by orthographic ray casting with shading and cast shadows: C1 looks straight down, C2..C5
  look from the four sides at 35 degrees elevation. Like Real-IAD's close-up photographs, every
  camera frames the object so that its longer side fills FILL (80%) of the image. Normal samples
  differ only by a small turn and shift, a slight change of light and texture, and sensor noise
  (JITTER), so that 40 training samples cover them.
- Synthetic defects live on the object's surface in 3-D, so what each camera sees of them follows
  from geometry: 75% sit on side faces (seen by one or two side cameras; only on faces that are
  tall, open in front and flat along the defect, not in the gaps of a comb such as zipper teeth),
  the rest on upward faces (seen by every camera that no taller part blocks). They are sized to be
  seen at 128 px (4-8% of the object's footprint; scratches >= 0.1 object units wide) and contrast
  strongly: dark on light surfaces and light on dark ones, a colour far from all of the object's, a
  dark interior or a hole where material is cut away, a bulge tall enough to change the shading and
  the outline. A view shows the defect when at least MIN_VISIBLE (0.6%) of its pixels do; smaller
  slivers are left out of its mask and its image (rendered without the defect there), so that image
  and label agree; a defect that no camera shows is placed again. Kinds, with the Real-IAD codes
  they stand for: HS scratch (a light or dark line), ZW contamination (an irregular stain), QS
  missing parts (material cut away), BX deformation (a bulge), CH abrasion (a discoloured patch);
  defective samples cycle through them. Views that do not show the defect are
  written the way the release writes them: class "OK", no mask.
- Pseudo-anomalies: Perlin masks and beta blending as in DRAEM/DeSTSeg; textures are procedural
  (Perlin clouds, stripes, checks), cut from another training image, or read from a local DTD folder.
  Each view is corrupted independently with probability 0.5 (DRAEM's rate), so that the student also
  sees clean views; their mask is empty. As in DRAEM, anomalies may fall on the background.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
import zlib
from collections import Counter, defaultdict
from datetime import datetime, timedelta
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
    """Runs a command line's `main(argv)`; a UserError becomes one line `error: ...` on stderr and exit
    status 2, never a traceback. Returns the exit status."""
    try:
        main(argv)
    except UserError as e:
        # Raised in a DataLoader worker, the message arrives after the worker's traceback: keep the last line.
        message = str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
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


def _find_json(root, category):
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


def _read_json(json_path, split):
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


def _group_views(entries, json_path):
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
            json_path = _find_json(root, name)
            meta, entries = _read_json(json_path, split)
            if not entries:
                continue
            normal_class = meta.get("normal_class", "OK")
            base = _category_dir(res_dir, meta.get("prefix", ""), name, entries[0]["image_path"],
                                 json_path)
            for key, views in sorted(_group_views(entries, json_path).items()):
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


# ----------------------------------------------------------------------------------------------------
# Perlin noise (Perlin 2002), for the pseudo-anomalies and the outlines of synthetic defects


def _fade(t):
    return t * t * t * (t * (t * 6 - 15) + 10)


def _perlin(y, x, gradients):
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


def _gradients(period, generator):
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
    return math.sqrt(2) * _perlin(y, x, _gradients(period, generator))


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
# The built-in synthetic Real-IAD: procedural height-field objects, 5 orthographic cameras

EXTENT = 1.25  # half-side of the square patch of table the object stands on (object units)
FILL = 0.8  # share of each camera's window that the object's longer side fills (close-up photographs)
CAMERA_POSES = {  # camera: (azimuth of the camera around the object, elevation), degrees
    "C1": (270.0, 90.0), "C2": (270.0, 35.0), "C3": (0.0, 35.0), "C4": (90.0, 35.0), "C5": (180.0, 35.0),
}
SYNTH_DEFECTS = ("HS", "ZW", "QS", "BX", "CH")  # scratch, stain, cut-away, bulge, discoloured patch
MIN_VISIBLE = 0.006  # a view shows a defect when at least this fraction of its pixels does
MIN_WALL = 0.08  # side faces lower than this do not get defects (they would be slivers)
OPEN_SPACE = 0.12  # side faces get defects only where the space this far in front of them is free
WALL_SHARE = 0.75  # share of defects placed on side faces (the others go on upward faces)
LIGHT = (230.0, 50.0, 0.6)  # key light: azimuth, elevation (degrees), intensity
JITTER = (  # how much normal samples vary, each uniformly in +-:
    1.0,  # object turn on the table, degrees
    0.01,  # object shift, object units (the patch is 2 * EXTENT wide)
    3.0, 2.0,  # light azimuth and elevation, degrees
    0.03,  # light intensity, relative
    0.02,  # albedo blotches, relative (a smooth random field; standard deviation)
    0.008,  # sensor noise, standard deviation
)
TABLE = (0.60, 0.60, 0.58)
COLOURS = {  # name: (albedo, specular strength)
    "black": ((0.10, 0.10, 0.11), 0.3), "white": ((0.88, 0.88, 0.85), 0.2),
    "silver": ((0.70, 0.71, 0.74), 0.9), "brass": ((0.80, 0.62, 0.28), 0.8),
    "red": ((0.75, 0.14, 0.12), 0.3), "blue": ((0.15, 0.30, 0.72), 0.3),
    "green": ((0.10, 0.42, 0.22), 0.2), "yellow": ((0.90, 0.74, 0.15), 0.2),
    "orange": ((0.92, 0.45, 0.10), 0.3), "wood": ((0.66, 0.46, 0.26), 0.05),
    "porcelain": ((0.94, 0.92, 0.88), 0.5), "navy": ((0.10, 0.14, 0.32), 0.05),
    "grey": ((0.45, 0.46, 0.48), 0.2),
}
OBJECTS = {  # category: (shape, main colour, accent colour)
    "audiojack": ("plug", "black", "silver"), "bottle_cap": ("disk", "red", "white"),
    "button_battery": ("disk", "silver", "silver"), "end_cap": ("disk", "black", "grey"),
    "eraser": ("block", "white", "blue"), "fire_hood": ("disk", "red", "black"),
    "mint": ("pill", "white", "white"), "mounts": ("block", "black", "silver"),
    "pcb": ("board", "green", "black"), "phone_battery": ("block", "blue", "silver"),
    "plastic_nut": ("ring", "white", "white"), "plastic_plug": ("plug", "white", "brass"),
    "porcelain_doll": ("beads", "porcelain", "blue"), "regulator": ("plug", "black", "silver"),
    "rolled_strip_base": ("ring", "brass", "black"), "sim_card_set": ("board", "white", "brass"),
    "switch": ("block", "black", "red"), "tape": ("ring", "yellow", "white"),
    "terminalblock": ("studs", "green", "silver"), "toothbrush": ("pill", "blue", "white"),
    "toy": ("beads", "yellow", "red"), "toy_brick": ("studs", "red", "red"),
    "transistor1": ("plug", "black", "silver"), "u_block": ("block", "grey", "black"),
    "usb": ("plug", "silver", "black"), "usb_adaptor": ("plug", "white", "silver"),
    "vcpill": ("pill", "orange", "white"), "wooden_beads": ("beads", "wood", "wood"),
    "woodstick": ("pill", "wood", "wood"), "zipper": ("zipper", "blue", "brass"),
}


def _box(u, v, cx, cy, hx, hy, radius=0.02):
    """Signed distance (< 0 inside) to a rectangle with rounded corners. Returns: like u."""
    qx = (u - cx).abs() - hx + radius
    qy = (v - cy).abs() - hy + radius
    outside = torch.hypot(qx.clamp(min=0), qy.clamp(min=0))
    return outside + torch.maximum(qx, qy).clamp(max=0) - radius


def _disk(u, v, cx, cy, radius):
    """Signed distance (< 0 inside) to a disk. Returns: like u."""
    return torch.hypot(u - cx, v - cy) - radius


def _slab(sd, height, bevel=0.012):
    """Height of a flat-topped solid over the 2-D shape `sd`, with a steep bevelled side face."""
    return height * (-sd / bevel).clamp(0, 1)


def _dome(sd, height, radius):
    """Height of a rounded cap over the shape `sd`: 0 at its edge, `height` from `radius` inwards."""
    t = 1 - (-sd / radius).clamp(0, 1)
    return height * (1 - t * t).sqrt()


def _object_parts(shape, u, v, main, accent, rng):
    """The parts of one procedural object in its canonical pose.

    Args:
        shape: one of the shapes in OBJECTS.
        u, v: (N, N) object-frame coordinates of the grid.
        main, accent: colour names.
        rng: numpy Generator (the category's own, for its proportions).
    Returns:
        list of (height (N, N), colour name, texture (N, N) multiplying the albedo, or None).
    """
    def size(low, high):
        return float(rng.uniform(low, high))

    if shape == "zipper":  # a close-up of a zipper: fabric tapes, interlocking teeth, a slider with a tab
        weave = 0.9 + 0.1 * torch.sin(2 * math.pi * (u + v) / 0.05).sign()
        parts = [(_slab(_box(u, v, 0.0, 0.0, 0.95, 0.62, 0.03), 0.04), main, weave)]
        pitch, chain = 0.15, (u + 0.3).abs() - 0.64  # teeth from x = -0.94 to 0.34
        for side, phase in ((1.0, 0.0), (-1.0, 0.5)):  # upper teeth and lower teeth, half a pitch apart
            du = torch.remainder(u + phase * pitch, pitch) - pitch / 2
            tooth = torch.maximum(_box(du, v, 0.0, side * 0.07, 0.05, 0.13, 0.02), chain)
            parts.append((_slab(tooth, 0.13, 0.008) + _dome(tooth, 0.035, 0.035), accent, None))
        body = _box(u, v, 0.62, 0.0, 0.26, 0.22, 0.08)
        tab = torch.maximum(_box(u, v, 0.42, 0.0, 0.36, 0.1, 0.07), -_box(u, v, 0.18, 0.0, 0.08, 0.04))
        parts += [(_slab(body, 0.14) + _dome(body, 0.09, 0.12), "silver", None),
                  (_slab(tab, 0.27), "silver", None)]
        return parts
    if shape == "block":  # a rounded box with a raised panel
        hx, hy, height = size(0.55, 0.8), size(0.35, 0.55), size(0.25, 0.4)
        body = _box(u, v, 0.0, 0.0, hx, hy, 0.08)
        panel = _box(u, v, size(-0.2, 0.2), 0.0, hx * 0.4, hy * 0.5, 0.04)
        return [(_slab(body, height), main, None), (_slab(panel, height + 0.06), accent, None)]
    if shape == "studs":  # a box with a grid of studs (bricks, screws)
        hx, hy, height = size(0.6, 0.8), size(0.3, 0.45), size(0.25, 0.35)
        body = _box(u, v, 0.0, 0.0, hx, hy, 0.04)
        pitch = hy
        su = torch.remainder(u + hx, pitch) - pitch / 2
        sv = torch.remainder(v + hy, pitch) - pitch / 2
        studs = torch.maximum(_disk(su, sv, 0.0, 0.0, pitch * 0.3), body + pitch * 0.2)
        return [(_slab(body, height), main, None), (_slab(studs, height + 0.08), accent, None)]
    if shape == "disk":  # a cylinder with a raised centre
        radius, height = size(0.6, 0.85), size(0.15, 0.35)
        return [(_slab(_disk(u, v, 0, 0, radius), height) + _dome(_disk(u, v, 0, 0, radius), 0.04, 0.1),
                 main, 0.92 + 0.08 * torch.cos(48 * torch.atan2(v, u))),
                (_slab(_disk(u, v, 0, 0, radius * 0.45), height + 0.06), accent, None)]
    if shape == "ring":  # an annulus (tape rolls, nuts)
        outer, height = size(0.7, 0.9), size(0.25, 0.45)
        ring = torch.maximum(_disk(u, v, 0, 0, outer), -_disk(u, v, 0, 0, outer * size(0.4, 0.6)))
        return [(_slab(ring, height), main, 0.95 + 0.05 * torch.cos(90 * torch.hypot(u, v)))]
    if shape == "pill":  # a capsule lying on the table, its two halves coloured differently
        length, radius = size(0.7, 0.95), size(0.18, 0.3)
        capsule = _box(u, v, 0.0, 0.0, length, radius, radius)
        height = _slab(capsule, radius) + _dome(capsule, radius, radius)
        grain = 0.9 + 0.1 * torch.sin(60 * v + 6 * torch.sin(5 * u)) if main == "wood" else None
        return [(height * (u < 0), main, grain), (height * (u >= 0), accent, grain)]
    if shape == "beads":  # a row of spheres of varying size (beads, figurines)
        parts, x = [], -0.9
        while x < 0.7:
            radius = size(0.16, 0.3)
            sd = _disk(u, v, x + radius, size(-0.1, 0.1), radius)
            parts.append((_slab(sd, radius) + _dome(sd, radius, radius), main if len(parts) % 2 else accent,
                          None))
            x += 2 * radius + 0.02
        return parts
    if shape == "board":  # a thin board with components on it
        board = _box(u, v, 0.0, 0.0, 0.9, 0.6, 0.03)
        parts = [(_slab(board, 0.05), main, 0.95 + 0.05 * torch.sin(40 * u).sign())]
        for _ in range(5):
            chip = _box(u, v, size(-0.65, 0.65), size(-0.4, 0.4), size(0.08, 0.2), size(0.06, 0.15))
            parts.append((_slab(chip, size(0.12, 0.25)), accent, None))
        return parts
    # the remaining shape, "plug": a body with a metal barrel sticking out
    hx, hy, height = size(0.35, 0.5), size(0.22, 0.35), size(0.25, 0.4)
    body = _box(u, v, -0.3, 0.0, hx, hy, 0.06)
    pin = _box(u, v, 0.45, 0.0, 0.45, hy * 0.45, hy * 0.4)
    return [(_slab(body, height), main, None),
            (_slab(pin, height * 0.35) + _dome(pin, height * 0.3, hy * 0.4), accent, None)]


def object_maps(category, n):
    """The category's object on an n x n grid over [-EXTENT, EXTENT]^2, canonical pose.

    Args:
        category: a Real-IAD category name.
        n: grid side.
    Returns:
        (5, n, n) tensor: height, albedo r, g, b, specular strength (table included, height 0).
    """
    shape, main, accent = OBJECTS[category]
    rng = np.random.default_rng(zlib.crc32(category.encode()))
    fine = 2 * n  # built at twice the resolution, then averaged: no aliasing of teeth and weaves
    coords = (torch.arange(fine) + 0.5) / fine * 2 * EXTENT - EXTENT
    v, u = torch.meshgrid(coords, coords, indexing="ij")  # rows: y, columns: x
    parts = [(torch.zeros(fine, fine), None, None)] + _object_parts(shape, u, v, main, accent, rng)
    heights = torch.stack([h for h, _, _ in parts])  # (P, 2n, 2n)
    top = heights.argmax(0)  # the part that forms the surface (the table, part 0, on ties)
    albedo = torch.tensor(TABLE).view(3, 1, 1).expand(3, fine, fine).clone()
    shine = torch.zeros(fine, fine)
    for p, (_, colour, texture) in enumerate(parts[1:], start=1):
        where = top == p
        rgb, specular = COLOURS[colour]
        albedo[:, where] = torch.tensor(rgb)[:, None] * (1 if texture is None else texture[where])
        shine[where] = specular
    return F.avg_pool2d(torch.cat([heights.amax(0)[None], albedo, shine[None]]), 2)  # (5, n, n)


def _grid(n):
    """Normalised texel centres in (-1, 1) along one axis. Returns (n,)."""
    return (torch.arange(n) + 0.5) / n * 2 - 1


def _pose(maps, angle, shift):
    """Rotate (radians) and shift (object units) the object maps on the table. Returns: like maps."""
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, sin, -shift[0] / EXTENT], [-sin, cos, -shift[1] / EXTENT]],
                         dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, *maps.shape], align_corners=False)
    return F.grid_sample(maps[None], grid, padding_mode="border", align_corners=False)[0]


def _light_visibility(height, azimuth, elevation):
    """Cast shadows: 1 where a texel sees the directional light, 0 where a taller texel blocks it.

    Rotates the height field so that rows run away from the light; a texel is lit when no texel
    nearer the light rises above the ray to the light (a running maximum along the row direction).
    Args:
        height: (N, N) height field over [-EXTENT, EXTENT]^2.
        azimuth, elevation: direction towards the light, radians.
    Returns:
        (N, N) float in [0, 1] (bilinear at shadow edges).
    """
    n = height.shape[-1]
    cos, sin = math.cos(azimuth), math.sin(azimuth)
    across, toward = _grid(n)[None, :], -_grid(n)[:, None]  # frame axes; row 0 is nearest the light
    frame = torch.stack(torch.broadcast_tensors(-sin * across + cos * toward, cos * across + sin * toward),
                        -1)
    h = F.grid_sample(height[None, None], frame[None], align_corners=False)[0, 0]  # (N, N) light frame
    level = h - math.tan(elevation) * toward * EXTENT
    lit = (level >= level.cummax(0).values - 1e-3).float()
    x, y = _grid(n)[None, :], _grid(n)[:, None]
    back = torch.stack(torch.broadcast_tensors(-sin * x + cos * y, -(cos * x + sin * y)), -1)
    return F.grid_sample(lit[None, None], back[None], padding_mode="border", align_corners=False)[0, 0]


def _world(maps, light):
    """Add lighting to the posed object maps.

    Args:
        maps: (5, N, N) height, albedo r, g, b, shine.
        light: (azimuth, elevation, intensity) of the key light, radians.
    Returns:
        (7, N, N): the maps plus light visibility and ambient occlusion.
    """
    h = maps[:1]
    lit = _light_visibility(h[0], light[0], light[1])
    crowd = F.avg_pool2d(F.avg_pool2d(h, (15, 1), 1, (7, 0)), (1, 15), 1, (0, 7))  # local mean height
    occlusion = 1 - 0.5 * ((crowd - h) / 0.1).clamp(0, 1)  # darker in creases and at the foot of walls
    return torch.cat([maps, lit[None], occlusion])


RGB_, SHINE_, LIT_, AO_, SLOPE_A, SLOPE_W = slice(0, 3), 3, 4, 5, 6, 7  # channels of a rendered surface
BACKGROUND = (*TABLE, 0.0, 1.0, 1.0, 0.0, 0.0)  # what a pixel that sees past the table patch shows


def _camera_angles():
    """Azimuth and elevation of each camera, radians. Returns: two (V, 1, 1) tensors."""
    az, el = zip(*CAMERA_POSES.values())
    return torch.tensor(az).deg2rad().view(-1, 1, 1), torch.tensor(el).deg2rad().view(-1, 1, 1)


def _turned(maps):
    """The maps turned into each camera's frame: rows run away from the camera (nearest first),
    columns left to right (the cameras sit at multiples of 90 degrees, so turning is exact).
    Args: maps (C, N, N). Returns: (V, C, N, N)."""
    turns = [round(azimuth - 270) // 90 % 4 for azimuth, _ in CAMERA_POSES.values()]  # quarter turns
    return torch.stack([torch.rot90(maps, k, (-2, -1)) for k in turns])


def camera_windows(maps):
    """Frame the object in every camera, as close-up photographs do: each camera's square screen
    window is centred on the object's outline in that view, with its longer side FILL of the window.

    Args:
        maps: (5, N, N) canonical object maps from `object_maps` (channel 0: height).
    Returns:
        (V, 3) tensor: horizontal centre, vertical centre and half-side of each window (object units).
    """
    n = maps.shape[-1]
    texel = 2 * EXTENT / n
    _, el = _camera_angles()
    h = _turned(maps[0])  # (V, N, N) rows: depth, nearest first
    body = h > 0.005
    depth = (EXTENT - (torch.arange(n) + 0.5) * texel).view(1, -1, 1)  # towards the camera, per row
    a = ((torch.arange(n) + 0.5) * texel - EXTENT).view(1, 1, -1).expand_as(h)  # across, per column
    top, foot = -el.sin() * depth + el.cos() * h, (-el.sin() * depth).expand_as(h)  # screen heights

    def extent(values):  # (V,) smallest and largest value over the object's texels
        return (torch.where(body, values, math.inf).amin((1, 2)),
                torch.where(body, values, -math.inf).amax((1, 2)))

    (a0, a1), (s0, s1) = extent(a), (extent(foot)[0], extent(top)[1])
    half = torch.maximum(a1 - a0, s1 - s0) / (2 * FILL)
    return torch.stack([(a0 + a1) / 2, (s0 + s1) / 2, half], 1)


def _rasterize(world, windows):
    """Ray-cast the height field into the five orthographic cameras.

    Each camera's frame is the world grid turned so that rows run away from the camera and columns
    run left to right, then resampled to the columns of the camera's window. A texel at depth w
    (towards the camera) with height h projects to screen height s = -sin(el) w + cos(el) h and is
    visible when no nearer texel projects higher (a running maximum along the row). A pixel row at
    screen height s shows the first texel whose running maximum reaches s, interpolated within the
    segment from the texel before it.
    Args:
        world: (7, N, N) maps from `_world`: height, albedo r, g, b, shine, light visibility, occlusion.
        windows: (V, 3) from `camera_windows`: each camera's window centre (across, up) and half-side.
    Returns:
        hit: (V, 3, N, N) world x, y, z of the surface point each pixel sees.
        surface: (V, 8, N, N) albedo r, g, b, shine, light visibility, occlusion, and the height
            slopes along the camera's horizontal axis and towards the camera (the segment's own).
    """
    n = world.shape[-1]
    views = len(CAMERAS)
    texel = 2 * EXTENT / n
    az, el = _camera_angles()
    centre_a, centre_s, half = (windows[:, k].view(-1, 1, 1) for k in range(3))  # (V, 1, 1) each
    a = centre_a + half * _grid(n).view(1, 1, n)  # (V, 1, N) horizontal position of each column
    columns = torch.stack(torch.broadcast_tensors(a / EXTENT, _grid(n).view(1, n, 1)), -1)  # (V, N, N, 2)
    frames = F.grid_sample(_turned(world), columns, padding_mode="border", align_corners=False)
    h = frames[:, 0].contiguous()  # (V, N, N) rows: depth, nearest first
    slope_a = torch.gradient(h, dim=2)[0] / (2 * half / n)
    slope_w = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1] - h[:, 1:]], 1) / texel
    depth = EXTENT - (torch.arange(n) + 0.5) * texel  # (N,) towards the camera, per row
    s = -el.sin() * depth.view(1, -1, 1) + el.cos() * h  # (V, N, N) screen height of each texel
    rows = (centre_s - half * _grid(n).view(1, n, 1)).expand(views, n, n)  # screen height per pixel row
    idx = torch.searchsorted(s.cummax(1).values.transpose(1, 2).contiguous(),
                             rows.transpose(1, 2).contiguous()).transpose(1, 2)
    last = idx.clamp(max=n - 1)  # idx == n: the pixel sees past the far edge of the table patch
    prev = (idx - 1).clamp(min=0)
    s_idx, s_prev = s.gather(1, last), s.gather(1, prev)
    t = ((rows - s_prev) / (s_idx - s_prev)).nan_to_num(1.0).clamp(0, 1)
    z = torch.lerp(h.gather(1, prev), h.gather(1, last), t) * (idx < n)  # (V, N, N)
    w = EXTENT - (torch.lerp(prev.float(), idx.float(), t) + 0.5) * texel  # depth of the hit
    x, y = -az.sin() * a + az.cos() * w, az.cos() * a + az.sin() * w
    channels = torch.empty(views, 8, n + 1, n)  # one extra row: what lies beyond the patch
    channels[:, :6, :n], channels[:, 6, :n], channels[:, 7, :n] = frames[:, 1:], slope_a, slope_w
    channels[:, :, n] = torch.tensor(BACKGROUND).view(1, 8, 1)
    surface = channels.gather(2, idx[:, None].expand(-1, 8, -1, -1))  # (V, 8, N, N)
    return torch.stack([x, y, z], 1), surface


def _shade(surface, light):
    """Lambert + Blinn-Phong shading with cast shadows and ambient occlusion.

    Args:
        surface: (V, 8, H, W) from `_rasterize` (its albedo may be repainted).
        light: (azimuth, elevation, intensity) of the key light, radians.
    Returns:
        (V, 3, H, W) colours in [0, 1].
    """
    az, el = _camera_angles()
    lx, ly = math.cos(light[1]) * math.cos(light[0]), math.cos(light[1]) * math.sin(light[0])
    to_light = (-az.sin() * lx + az.cos() * ly, az.cos() * lx + az.sin() * ly, math.sin(light[1]))
    halfway = F.normalize(torch.stack(torch.broadcast_tensors(
        to_light[0], to_light[1] + el.cos(), to_light[2] + el.sin())), dim=0)  # (3, V, 1, 1)
    # camera axes: across, towards the camera, up
    na, nw = -surface[:, SLOPE_A:SLOPE_A + 1], -surface[:, SLOPE_W:SLOPE_W + 1]  # (V, 1, H, W)
    norm = (na * na + nw * nw + 1).rsqrt()
    lit = surface[:, LIT_:LIT_ + 1]
    diffuse = ((na * to_light[0][:, None] + nw * to_light[1][:, None] + to_light[2]) * norm).clamp(min=0)
    specular = ((na * halfway[0][:, None] + nw * halfway[1][:, None] + halfway[2][:, None]) * norm
                ).clamp(min=0) ** 40
    ambient = 0.55 * surface[:, AO_:AO_ + 1] * (0.7 + 0.3 * norm)
    colour = surface[:, RGB_] * (ambient + light[2] * diffuse * lit) + \
        surface[:, SHINE_:SHINE_ + 1] * specular * lit
    return colour.clamp(0, 1)


def _frame(normal, rng):
    """Unit tangents (t1 horizontal, t2 = normal x t1) for a surface normal. Returns: (t1, t2)."""
    if abs(normal[2]) > 0.999:  # a level face: any horizontal direction
        angle = rng.uniform(0, math.pi)
        t1 = np.array([math.cos(angle), math.sin(angle), 0.0])
    else:  # a sloping or side face: the horizontal direction along it
        t1 = np.array([-normal[1], normal[0], 0.0]) / math.hypot(normal[0], normal[1])
    return t1, np.cross(normal, t1)


def _place_defect(world, code, rng, generator):
    """Choose where a defect sits on the posed object and how big it is.

    A share WALL_SHARE of the defects sits on a side face tall enough to hold them, with free space
    in front (OPEN_SPACE) and facing one way along the defect's length (shortened to fit, or another
    face is drawn): seen by one or two side cameras. The others sit on an upward face, seen by every
    camera that a taller part does not block.
    Args:
        world: (7, N, N) posed maps from `_world`.
        code: one of SYNTH_DEFECTS.
        rng: numpy Generator; generator: torch.Generator (for the defect's outline noise).
    Returns:
        dict: code, centre (3,), normal n, tangents t1, t2, radii r1 (along t1), r2 (along t2),
        rn (thickness along n), radius (the nominal size), wall (on a side face?), paint colour (3,)
        (None for stains and scratches: `_paint` chooses it), outline gradients.
    """
    h = world[0]
    n = h.shape[-1]
    texel = 2 * EXTENT / n
    gy, gx = torch.gradient(h, spacing=texel)
    slope = torch.hypot(gx, gy)
    high = F.max_pool2d(F.max_pool2d(h[None], (9, 1), 1, (4, 0)), (1, 9), 1, (0, 4))[0]
    low = -F.max_pool2d(F.max_pool2d(-h[None], (9, 1), 1, (4, 0)), (1, 9), 1, (0, 4))[0]
    body = h > 0.015
    outward = OPEN_SPACE / texel / slope.clamp(min=1e-6)  # texels per unit of downhill gradient
    ahead = h[(torch.arange(n).view(-1, 1) - outward * gy).round().long().clamp(0, n - 1),
              (torch.arange(n).view(1, -1) - outward * gx).round().long().clamp(0, n - 1)]
    walls = (slope > 2.0) & (high - low > MIN_WALL) & (ahead < low + 0.25 * (high - low))
    radius = math.sqrt(rng.uniform(0.04, 0.08) * float(body.sum()) * texel ** 2 / math.pi)
    out_x, out_y = -gx / slope.clamp(min=1e-6), -gy / slope.clamp(min=1e-6)  # outward wall normals
    on_wall = bool(walls.any()) and rng.random() < WALL_SHARE
    candidates = torch.nonzero(walls)
    for _ in range(20 if on_wall else 0):  # a side face facing one way along the defect, or a shorter one
        i, j = candidates[rng.integers(len(candidates))].tolist()
        r2 = min(radius, 0.45 * (high[i, j] - low[i, j]).item())  # vertical extent fits the face
        r1 = 2.5 * radius if code == "HS" else min(radius * radius / r2, 3.0 * radius)
        facing = walls & (out_x * out_x[i, j] + out_y * out_y[i, j] > 0.75)
        facing = F.max_pool2d(facing[None].float(), 5, 1, 2)[0] > 0  # (N, N), a few texels of slack
        along = torch.arange(1, int(r1 / texel) + 1, 2.0)  # texels along the face, one way
        along = torch.stack([along, -along])  # (2, K): both ways
        rows = (i + along * out_x[i, j]).round().long().clamp(0, n - 1)
        cols = (j - along * out_y[i, j]).round().long().clamp(0, n - 1)
        reach = facing[rows, cols].long().cumprod(1).sum(1).min().item() * 2 * texel  # along both ways
        if reach >= max(r2, 0.5 * radius):
            r1 = min(r1, reach)
            break
    else:
        on_wall = False
    if on_wall:
        x, y = (j + 0.5) * texel - EXTENT, (i + 0.5) * texel - EXTENT
        normal = np.array([out_x[i, j].item(), out_y[i, j].item(), 0.0])
        z = low[i, j].item() + rng.uniform(0.35, 0.65) * (high[i, j] - low[i, j]).item()
    else:
        candidates = torch.nonzero(body & (slope < 0.6))
        i, j = candidates[rng.integers(len(candidates))].tolist()
        x, y = (j + 0.5) * texel - EXTENT, (i + 0.5) * texel - EXTENT
        normal = np.array([-gx[i, j].item(), -gy[i, j].item(), 1.0])
        normal /= np.linalg.norm(normal)
        z = h[i, j].item()
        r1 = radius * rng.uniform(0.8, 1.25)
        r2 = radius * radius / r1
    t1, t2 = _frame(normal, rng)
    if code == "HS":  # a scratch: long and thin
        r1, r2 = min(2.5 * radius, r1) if on_wall else 2.5 * radius, min(max(0.05, 0.25 * radius), r2)
    paint = None  # stains and scratches: chosen by `_paint` against the surface they cover
    if code == "CH":  # discoloured: the saturated colour farthest from every colour of the object
        palette = torch.tensor([COLOURS[c][0] for c in ("red", "blue", "green", "yellow", "orange")])
        paint = palette[torch.cdist(palette, world[1:4, body].T).amin(1).argmax()]
    return {"code": code, "centre": np.array([x, y, z]), "n": normal, "t1": t1, "t2": t2, "r1": r1,
            "r2": r2, "rn": max(0.5 * min(r1, r2), 0.03), "radius": radius, "wall": on_wall,
            "paint": paint, "outline": _gradients(8, generator)}


def _local(defect, x, y, z):
    """Coordinates of world points in the defect's frame, in units of its radii.

    Args:
        defect: dict from `_place_defect`; x, y, z: world coordinates, tensors of one shape.
    Returns:
        (q1, q2, qn) along t1, t2 and the normal, like x.
    """
    d = [x - defect["centre"][0], y - defect["centre"][1], z - defect["centre"][2]]

    def along(axis, radius):
        return (d[0] * float(axis[0]) + d[1] * float(axis[1]) + d[2] * float(axis[2])) / radius

    return (along(defect["t1"], defect["r1"]), along(defect["t2"], defect["r2"]),
            along(defect["n"], defect["rn"]))


def _outline(defect, q1, q2):
    """An irregular blob's radius towards (q1, q2): 1 + 0.6 Perlin noise, 0.58 to 1.42. Returns like q1."""
    return 1 + 0.6 * _perlin(q1 * 1.5 + 4, q2 * 1.5 + 4, defect["outline"])


def _deform(maps, defect):
    """Change the geometry for the shape defects (QS: material cut away, BX: a bulge).

    Args:
        maps: (5, N, N) posed height, albedo r, g, b, shine; defect: dict from `_place_defect`.
    Returns:
        (5, N, N) the changed maps.
    """
    n = maps.shape[-1]
    coords = _grid(n) * EXTENT
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    h = maps[0]
    # footprint on the table: along t1 and across it (for side faces: half a radius into the object)
    e1 = defect["t1"][:2] / np.linalg.norm(defect["t1"][:2])
    r_across = 0.5 * defect["radius"] if defect["wall"] else defect["r2"]
    dx, dy = x - defect["centre"][0], y - defect["centre"][1]
    q1 = (dx * e1[0] + dy * e1[1]) / defect["r1"]
    q2 = (-dx * e1[1] + dy * e1[0]) / r_across
    q = torch.hypot(q1, q2) / _outline(defect, q1, q2)
    maps = maps.clone()
    if defect["code"] == "QS":  # cut down to a floor below the centre; the table shows where it is 0
        floor = max(defect["centre"][2] - (defect["r2"] if defect["wall"] else 0.8 * defect["radius"]), 0.0)
        cut = (q < 1) & (h > floor + 0.005)
        maps[0] = torch.where(cut, torch.full_like(h, floor), h)
        exposed = torch.tensor(TABLE).view(3, 1, 1) if floor < 0.005 else maps[1:4] * 0.3  # darker inside
        maps[1:4] = torch.where(cut, exposed, maps[1:4])
        maps[4] = torch.where(cut, 0.0, maps[4])
    else:  # a smooth bump on the object (not on the table)
        maps[0] = h + 1.2 * defect["radius"] * (1 - q * q).clamp(min=0) ** 2 * (h > 0.01)
    return maps


def _paint(defect, hit, surface):
    """Repaint the surface for the colour defects (HS, ZW, CH).

    Args:
        defect: dict from `_place_defect`.
        hit: (V, 3, N, N) world points each pixel sees; surface: (V, 8, N, N).
    Returns:
        (repainted surface, (V, N, N) bool: pixels that see the defect).
    """
    q1, q2, qn = _local(defect, hit[:, 0], hit[:, 1], hit[:, 2])
    if defect["code"] == "HS":  # a slightly curved line
        inside = (q1.abs() < 1) & ((q2 - 0.1 * defect["r1"] / defect["r2"] * q1 * q1).abs() < 1)
        inside &= qn.abs() < 1
    else:  # an irregular blob; its outline (at most 1.42 radii) is only evaluated near it
        near = (torch.hypot(q1, q2) < 1.5) & (qn.abs() < 1)
        inside = torch.zeros_like(near)
        inside[near] = torch.hypot(q1[near], q2[near]) < _outline(defect, q1[near], q2[near])
    inside &= hit[:, 2] > 0.005  # on the object, not on the table
    colour = defect["paint"]
    if colour is None:  # stains and scratches: dark on light surfaces, light on dark ones
        light = surface[:, RGB_].transpose(0, 1)[:, inside].mean() > 0.45
        colour = torch.tensor([0.12, 0.08, 0.05] if light else [0.95, 0.92, 0.85])
    strength = 0.9 if defect["code"] == "CH" else 0.95
    paint = torch.lerp(surface[:, RGB_], colour.view(1, 3, 1, 1), strength)
    surface = surface.clone()
    surface[:, RGB_] = torch.where(inside[:, None], paint, surface[:, RGB_])
    surface[:, SHINE_] = torch.where(inside, 0.1, surface[:, SHINE_])  # matte: no metallic highlight
    return surface, inside


def _defect_view(maps, world, surface, hit, light, windows, code, rng, generator):
    """Place a defect and find what each camera sees of it.

    Returns:
        surface: (V, 8, N, N) what the cameras see with the defect; masks: (V, N, N) bool, the
        pixels that show the defect, emptied for views where they are fewer than MIN_VISIBLE.
    """
    n = world.shape[-1]
    defect = _place_defect(world, code, rng, generator)
    if code in ("QS", "BX"):
        hit_d, surface_d = _rasterize(_world(_deform(maps, defect), light), windows)
        moved = (hit_d - hit).abs() > 0.01  # (V, 3, N, N)
        masks = moved[:, 0] | moved[:, 1] | moved[:, 2]  # the pixel sees another surface point
    else:
        surface_d, masks = _paint(defect, hit, surface)
    return surface_d, masks & (masks.flatten(1).sum(1).view(-1, 1, 1) >= MIN_VISIBLE * n * n)


def render_sample(category_maps, code, rng):
    """Render one synthetic sample: a slightly re-posed, re-lit object, with or without a defect.

    Args:
        category_maps: (5, N, N) from `object_maps`.
        code: None for a normal sample, else one of SYNTH_DEFECTS.
        rng: numpy Generator (everything random about the sample comes from it).
    Returns:
        images: (V, N, N, 3) uint8; masks: (V, N, N) bool (all False for a normal sample).
    """
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    n = category_maps.shape[-1]
    turn, shift, light_turn, light_tilt, exposure, blotch, grain = JITTER
    maps = _pose(category_maps, math.radians(rng.uniform(-turn, turn)),
                 rng.uniform(-shift, shift, 2).tolist())
    blotches = F.interpolate(torch.randn(1, 1, n // 8, n // 8, generator=generator), size=(n, n),
                             mode="bicubic", align_corners=False)[0]
    maps[1:4] *= 1 + blotch * blotches * (maps[0] > 0.01)  # slight texture noise on the object
    azimuth, elevation, intensity = LIGHT
    light = (math.radians(azimuth + rng.uniform(-light_turn, light_turn)),
             math.radians(elevation + rng.uniform(-light_tilt, light_tilt)),
             intensity * (1 + rng.uniform(-exposure, exposure)))
    world = _world(maps, light)
    windows = camera_windows(category_maps)
    hit, surface = _rasterize(world, windows)
    images = _shade(surface, light)
    masks = torch.zeros(len(CAMERAS), n, n, dtype=torch.bool)
    if code is not None:
        for _ in range(10):  # place the defect again (at most 10 times) while no camera shows it
            surface_d, masks = _defect_view(maps, world, surface, hit, light, windows, code, rng,
                                                  generator)
            if masks.any():
                break
        images = torch.where(masks[:, None], _shade(surface_d, light), images)
    noise = grain * torch.randn(images.shape, generator=generator)  # sensor noise
    images = ((images + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy(), masks.numpy()


def _timestamp(number, view):
    """A Real-IAD-style capture time (YYYYmmddHHMMSS), distinct per sample and view."""
    return (datetime(2023, 9, 12, 9, 0, 0) + timedelta(seconds=40 * number + view)).strftime("%Y%m%d%H%M%S")


def _write_sample(category_dir, category, number, code, images, masks):
    """Write one sample's images (and masks) in the Real-IAD layout. Returns: its 5 JSON entries."""
    if code is None:
        folder, stem = f"OK/S{number:04d}", f"{category}_{number:04d}_OK"
    else:  # Real-IAD's audiojack NG files have a double underscore, so ours do too
        separator = "__" if category == "audiojack" else "_"
        folder, stem = f"NG/{code}/S{number:04d}", f"{category}{separator}{number:04d}_NG_{code}"
    (category_dir / folder).mkdir(parents=True, exist_ok=True)
    entries = []
    for view, camera in enumerate(CAMERAS):
        name = f"{folder}/{stem}_{camera}_{_timestamp(number, view)}"
        Image.fromarray(images[view]).save(category_dir / f"{name}.jpg", quality=95)
        visible = bool(masks[view].any())
        if visible:
            Image.fromarray(masks[view].astype(np.uint8) * 255).save(category_dir / f"{name}.png")
        # like the release: a view of a defective sample that does not show the defect is "OK", no mask
        entries.append({"category": category, "anomaly_class": code if visible else "OK",
                        "image_path": f"{name}.jpg", "mask_path": f"{name}.png" if visible else None})
    return entries


def _check_synthetic_category(category):
    if category not in CATEGORIES:
        raise UserError(f"unknown category '{category}'; valid categories: {', '.join(CATEGORIES)}")


def synthesize(out, category, n_train=40, n_test_normal=30, n_test_defect=30, resolution=256, seed=0):
    """Write a synthetic multi-view split of one category in the Real-IAD layout.

    Writes `out/realiad_<resolution>/<category>/{OK,NG/<code>}/S<nnnn>/*.jpg|png` and
    `out/realiad_jsons/<category>.json` (meta, train, test; entries in shuffled order). Each sample
    draws its randomness from (seed, category, its role, its index within the role), so a sample
    does not change when the other sizes do.
    Args:
        out: output folder (the Real-IAD root to pass to `RealIAD`).
        category: one of CATEGORIES.
        n_train: normal training samples.
        n_test_normal, n_test_defect: normal and defective test samples.
        resolution: image side in pixels.
        seed: random seed.
    Returns:
        Path of `out`.
    """
    _check_synthetic_category(category)
    for flag, value in (("n_train", n_train), ("n_test_normal", n_test_normal),
                        ("n_test_defect", n_test_defect)):
        if value < 0:
            raise UserError(f"{flag} must be >= 0, not {value}")
    if resolution < 32:
        raise UserError(f"resolution must be >= 32 pixels, not {resolution}")
    out = Path(out)
    category_dir = out / f"realiad_{resolution}" / category
    maps = object_maps(category, resolution)
    plan = [("train", None)] * n_train + [("test", None)] * n_test_normal
    plan += [("test", SYNTH_DEFECTS[i % len(SYNTH_DEFECTS)]) for i in range(n_test_defect)]
    splits = {"train": [], "test": []}
    index = Counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: about as fast, and far faster when other jobs load the cores
    try:
        for number, (split, code) in enumerate(plan, start=1):
            role = 0 if split == "train" else 1 if code is None else 2
            rng = np.random.default_rng([seed, zlib.crc32(category.encode()), role, index[role]])
            index[role] += 1
            images, masks = render_sample(maps, code, rng)
            splits[split] += _write_sample(category_dir, category, number, code, images, masks)
    finally:
        torch.set_num_threads(threads)
    order = np.random.default_rng(seed)
    content = {"meta": {"prefix": f"{category}/", "normal_class": "OK"},
               **{split: [entries[i] for i in order.permutation(len(entries))]
                  for split, entries in splits.items()}}
    (out / "realiad_jsons").mkdir(parents=True, exist_ok=True)
    (out / "realiad_jsons" / f"{category}.json").write_text(json.dumps(content, indent=1))
    return out


def visibility_stats(root, category):
    """How many views show the defect, per defective test sample (read back from the JSON).

    Args:
        root: a Real-IAD(-like) root; category: its category.
    Returns:
        list of 6 counts: defective samples (those in NG folders) shown by 0, 1, ..., 5 views.
    """
    json_path = _find_json(Path(root), category)
    meta, entries = _read_json(json_path, "test")
    counts = [0] * (len(CAMERAS) + 1)
    for key, views in _group_views(entries, json_path).items():
        if "_NG_" in key:
            counts[sum(e["anomaly_class"] != meta.get("normal_class", "OK") and e["mask_path"] is not None
                       for e in views.values())] += 1
    return counts


SYNTH_VERSION = 3  # part of the cache key: bump it when the generator changes what it writes
SYNTHETIC_CACHE = Path(__file__).resolve().parent / "data" / "synthetic"  # synthetic_root's default folder


def default_real_iad() -> Path | None:
    """The Real-IAD folder found without a flag: $REALIAD_ROOT, else ./data/realiad; None if neither exists."""
    for candidate in (os.environ.get("REALIAD_ROOT"), "data/realiad"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def synthetic_root(category, cache_dir=None, n_train=40, n_test_normal=30, n_test_defect=30,
                   resolution=256, seed=0):
    """The built-in synthetic dataset, generated once into a cache folder and reused.

    Args:
        category: a category name, a list of names, or "all"; one root holds them all.
        cache_dir: where the generated roots live (default: `data/synthetic` next to this file).
        n_train, n_test_normal, n_test_defect, resolution, seed: as in `synthesize`.
    Returns:
        Path of a Real-IAD-shaped root holding those categories.
    """
    names = sorted(set(CATEGORIES if category == "all" else [category] if isinstance(category, str)
                       else category))
    for name in names:
        _check_synthetic_category(name)
    if names == sorted(CATEGORIES):
        label = "all"
    elif len(names) <= 3:
        label = "+".join(names)
    else:  # keep the folder name short
        label = f"{len(names)}-categories-{zlib.crc32(' '.join(names).encode()):08x}"
    key = f"{label}-{n_train}-{n_test_normal}-{n_test_defect}-{resolution}px-seed{seed}-v{SYNTH_VERSION}"
    cache_dir = Path(cache_dir) if cache_dir else SYNTHETIC_CACHE
    root = cache_dir / key
    if not all((root / "realiad_jsons" / f"{name}.json").is_file() for name in names):
        staging = cache_dir / f"{key}.tmp{os.getpid()}"
        try:
            for name in names:
                synthesize(staging, name, n_train, n_test_normal, n_test_defect, resolution, seed)
            staging.rename(root)  # atomic: a concurrent process sees all of it or nothing
        except OSError:  # another process finished first; its copy is identical
            pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


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


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    """`python data.py synth ...`: write a synthetic split and print its visibility statistics."""
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write a synthetic multi-view split in the Real-IAD layout")
    synth.add_argument("--out", type=Path, required=True, help="output folder (a Real-IAD root)")
    synth.add_argument("--category", default="zipper", help="Real-IAD category name")
    synth.add_argument("--n-train", type=int, default=40, help="normal training samples")
    synth.add_argument("--n-test-normal", type=int, default=30, help="normal test samples")
    synth.add_argument("--n-test-defect", type=int, default=30, help="defective test samples")
    synth.add_argument("--resolution", type=int, default=256, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = synthesize(args.out, args.category, args.n_train, args.n_test_normal, args.n_test_defect,
                      args.resolution, args.seed)
    seconds = time.perf_counter() - start
    counts = visibility_stats(root, args.category)
    total = args.n_train + args.n_test_normal + args.n_test_defect
    print(f"wrote {total} samples of {args.category} to {root} in {seconds:.1f} s")
    print("defective test samples by number of views that show the defect: "
          + ", ".join(f"{k}: {c}" for k, c in enumerate(counts)))
    partial = sum(counts[1:len(CAMERAS)])
    print(f"seen by only 1 to 4 of the 5 views: {partial} of {sum(counts)} "
          f"({100 * partial / max(sum(counts), 1):.0f}%)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
