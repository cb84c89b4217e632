"""A built-in synthetic Real-IAD: procedural objects seen by five cameras, with defects in 3-D.

`synthesize` renders one category's split and writes it as the Real-IAD release lies on disk, so that
`data.RealIAD` reads it; `synthetic_root` generates it once into `data/synthetic/` and reuses it
(train.py and eval.py use it when there is no Real-IAD folder).

    python synthetic.py --out data/demo --category zipper   # write a split, print its statistics

Shapes: V views (5), R = side of the render grid (the images' resolution; `res` in the code). Object
maps (5, R, R): height, albedo r, g, b, specular strength over the table patch [-EXTENT, EXTENT]^2.

Design choices (Real-IAD's layout and cameras, everything else ours):
- Objects: height fields (no overhangs), one procedural shape per category (OBJECTS).
- Cameras: orthographic ray casting with shading and cast shadows; C1 looks straight down, C2..C5 from
  the four sides at 35 degrees; each frames the object's longer side to FILL (80%), like close-ups.
- Normal samples differ by a small turn and shift, light, texture and sensor noise (JITTER).
- Defects sit on the 3-D surface, so which cameras see them follows from geometry: WALL_SHARE (75%)
  on tall side faces with free space in front (one or two side cameras), the rest on upward faces.
- They are sized to be seen at 128 px (4-8% of the footprint) and contrast strongly. Kinds, cycled, as
  Real-IAD codes: HS scratch, ZW stain, QS material cut away, BX bulge, CH discoloured patch.
- A view shows a defect when >= MIN_VISIBLE (0.6%) of its pixels do, else it is rendered without it;
  a defect no camera shows is placed again; a view without it is written as the release does: "OK", no mask.
- Correspondences (what no real data set gives): every pixel's world point is known, so `visibility`
  tells which cameras see it (a depth test) and `window_overlaps` which MVAS windows of two views see
  the same surface. The cache keeps them for a 64 x 64 grid of each view's pixels
  (`synthetic_geometry/<category>.npz`, about 2 MB per 100 samples; `load_geometry`); MVAD's routing
  "oracle" and bench/routing.py read them through `WithOverlaps`.
- Consistency categories (<category>_consistency): every view alone is a normal view, only the views
  together are anomalous (`render_consistency`): normal samples show the accent parts in one of two
  colours in every view, defective ones in the other colour in one or two views, masked there.
"""
import copy
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from data import (CAMERAS, CATEGORIES, ArgumentParser, UserError, find_json, group_views, perlin,
                  perlin_gradients, read_json, run_cli)

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


# One builder per shape of OBJECTS, each for the object in its canonical pose. Args: u, v, the
# object-frame coordinates of the grid (two tensors of one shape); main, accent: colour names;
# size(low, high): draws one of the category's proportions. Returns: the parts, as `_object_parts`.


def _zipper_parts(u, v, main, accent, size):
    """A close-up of a zipper: fabric tapes, interlocking teeth, a slider with a tab."""
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


def _block_parts(u, v, main, accent, size):
    """A rounded box with a raised panel."""
    hx, hy, height = size(0.55, 0.8), size(0.35, 0.55), size(0.25, 0.4)
    body = _box(u, v, 0.0, 0.0, hx, hy, 0.08)
    panel = _box(u, v, size(-0.2, 0.2), 0.0, hx * 0.4, hy * 0.5, 0.04)
    return [(_slab(body, height), main, None), (_slab(panel, height + 0.06), accent, None)]


def _studs_parts(u, v, main, accent, size):
    """A box with a grid of studs (bricks, screws)."""
    hx, hy, height = size(0.6, 0.8), size(0.3, 0.45), size(0.25, 0.35)
    body = _box(u, v, 0.0, 0.0, hx, hy, 0.04)
    pitch = hy
    su = torch.remainder(u + hx, pitch) - pitch / 2
    sv = torch.remainder(v + hy, pitch) - pitch / 2
    studs = torch.maximum(_disk(su, sv, 0.0, 0.0, pitch * 0.3), body + pitch * 0.2)
    return [(_slab(body, height), main, None), (_slab(studs, height + 0.08), accent, None)]


def _disk_parts(u, v, main, accent, size):
    """A cylinder with a raised centre."""
    radius, height = size(0.6, 0.85), size(0.15, 0.35)
    return [(_slab(_disk(u, v, 0, 0, radius), height) + _dome(_disk(u, v, 0, 0, radius), 0.04, 0.1),
             main, 0.92 + 0.08 * torch.cos(48 * torch.atan2(v, u))),
            (_slab(_disk(u, v, 0, 0, radius * 0.45), height + 0.06), accent, None)]


def _ring_parts(u, v, main, accent, size):
    """An annulus (tape rolls, nuts)."""
    outer, height = size(0.7, 0.9), size(0.25, 0.45)
    ring = torch.maximum(_disk(u, v, 0, 0, outer), -_disk(u, v, 0, 0, outer * size(0.4, 0.6)))
    return [(_slab(ring, height), main, 0.95 + 0.05 * torch.cos(90 * torch.hypot(u, v)))]


def _pill_parts(u, v, main, accent, size):
    """A capsule lying on the table, its two halves coloured differently."""
    length, radius = size(0.7, 0.95), size(0.18, 0.3)
    capsule = _box(u, v, 0.0, 0.0, length, radius, radius)
    height = _slab(capsule, radius) + _dome(capsule, radius, radius)
    grain = 0.9 + 0.1 * torch.sin(60 * v + 6 * torch.sin(5 * u)) if main == "wood" else None
    return [(height * (u < 0), main, grain), (height * (u >= 0), accent, grain)]


def _beads_parts(u, v, main, accent, size):
    """A row of spheres of varying size (beads, figurines)."""
    parts, x = [], -0.9
    while x < 0.7:
        radius = size(0.16, 0.3)
        sd = _disk(u, v, x + radius, size(-0.1, 0.1), radius)
        parts.append((_slab(sd, radius) + _dome(sd, radius, radius), main if len(parts) % 2 else accent,
                      None))
        x += 2 * radius + 0.02
    return parts


def _board_parts(u, v, main, accent, size):
    """A thin board with components on it."""
    board = _box(u, v, 0.0, 0.0, 0.9, 0.6, 0.03)
    parts = [(_slab(board, 0.05), main, 0.95 + 0.05 * torch.sin(40 * u).sign())]
    for _ in range(5):
        chip = _box(u, v, size(-0.65, 0.65), size(-0.4, 0.4), size(0.08, 0.2), size(0.06, 0.15))
        parts.append((_slab(chip, size(0.12, 0.25)), accent, None))
    return parts


def _plug_parts(u, v, main, accent, size):
    """A body with a metal barrel sticking out."""
    hx, hy, height = size(0.35, 0.5), size(0.22, 0.35), size(0.25, 0.4)
    body = _box(u, v, -0.3, 0.0, hx, hy, 0.06)
    pin = _box(u, v, 0.45, 0.0, 0.45, hy * 0.45, hy * 0.4)
    return [(_slab(body, height), main, None),
            (_slab(pin, height * 0.35) + _dome(pin, height * 0.3, hy * 0.4), accent, None)]


SHAPES = {"zipper": _zipper_parts, "block": _block_parts, "studs": _studs_parts, "disk": _disk_parts,
          "ring": _ring_parts, "pill": _pill_parts, "beads": _beads_parts, "board": _board_parts,
          "plug": _plug_parts}


def _object_parts(shape, u, v, main, accent, rng):
    """The parts of one procedural object in its canonical pose.

    Args:
        shape: one of SHAPES (the shapes of OBJECTS).
        u, v: object-frame coordinates of the grid, two tensors of one shape (2R, 2R in `object_maps`).
        main, accent: colour names.
        rng: numpy Generator (the category's own, for its proportions).
    Returns:
        list of (height like u, colour name, texture like u multiplying the albedo, or None).
    """
    def size(low, high):
        return float(rng.uniform(low, high))

    return SHAPES[shape](u, v, main, accent, size)


def other_finish(colour):
    """The second value of a consistency category's disputed colour: silver, or brass for silver."""
    return "brass" if colour == "silver" else "silver"


def object_maps(category, res, recoloured=False):
    """The category's object on an R x R grid over [-EXTENT, EXTENT]^2, canonical pose.

    Args:
        category: a Real-IAD category name.
        res: grid side R (the images' resolution).
        recoloured: the accent parts (the one part of a ring) in `other_finish` of their colour:
            the second look of the object in a consistency category.
    Returns:
        (5, R, R) tensor: height, albedo r, g, b, specular strength (table included, height 0).
    """
    shape, main, accent = OBJECTS[category]
    if recoloured and shape == "ring":
        main = other_finish(main)
    elif recoloured:
        accent = other_finish(accent)
    rng = np.random.default_rng(zlib.crc32(category.encode()))
    fine = 2 * res  # built at twice the resolution, then averaged: no aliasing of teeth and weaves
    coords = (torch.arange(fine) + 0.5) / fine * 2 * EXTENT - EXTENT
    v, u = torch.meshgrid(coords, coords, indexing="ij")  # rows: y, columns: x
    parts = [(torch.zeros(fine, fine), None, None)] + _object_parts(shape, u, v, main, accent, rng)
    heights = torch.stack([h for h, _, _ in parts])  # (P, 2R, 2R) for P parts
    top = heights.argmax(0)  # the part that forms the surface (the table, part 0, on ties)
    albedo = torch.tensor(TABLE).view(3, 1, 1).expand(3, fine, fine).clone()
    shine = torch.zeros(fine, fine)
    for p, (_, colour, texture) in enumerate(parts[1:], start=1):
        where = top == p
        rgb, specular = COLOURS[colour]
        albedo[:, where] = torch.tensor(rgb)[:, None] * (1 if texture is None else texture[where])
        shine[where] = specular
    return F.avg_pool2d(torch.cat([heights.amax(0)[None], albedo, shine[None]]), 2)  # (5, R, R)


def _grid(res):
    """Normalised texel centres in (-1, 1) along one axis. Returns (res,)."""
    return (torch.arange(res) + 0.5) / res * 2 - 1


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
        height: (R, R) height field over [-EXTENT, EXTENT]^2.
        azimuth, elevation: direction towards the light, radians.
    Returns:
        (R, R) float in [0, 1] (bilinear at shadow edges).
    """
    res = height.shape[-1]
    cos, sin = math.cos(azimuth), math.sin(azimuth)
    across, toward = _grid(res)[None, :], -_grid(res)[:, None]  # frame axes; row 0 is nearest the light
    frame = torch.stack(torch.broadcast_tensors(-sin * across + cos * toward, cos * across + sin * toward),
                        -1)
    h = F.grid_sample(height[None, None], frame[None], align_corners=False)[0, 0]  # (R, R) light frame
    level = h - math.tan(elevation) * toward * EXTENT
    lit = (level >= level.cummax(0).values - 1e-3).float()
    x, y = _grid(res)[None, :], _grid(res)[:, None]
    back = torch.stack(torch.broadcast_tensors(-sin * x + cos * y, -(cos * x + sin * y)), -1)
    return F.grid_sample(lit[None, None], back[None], padding_mode="border", align_corners=False)[0, 0]


def _world(maps, light):
    """Add lighting to the posed object maps.

    Args:
        maps: (5, R, R) height, albedo r, g, b, shine.
        light: (azimuth, elevation, intensity) of the key light, radians.
    Returns:
        (7, R, R): the maps plus light visibility and ambient occlusion.
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
    Args: maps (C, R, R). Returns: (V, C, R, R)."""
    turns = [round(azimuth - 270) // 90 % 4 for azimuth, _ in CAMERA_POSES.values()]  # quarter turns
    return torch.stack([torch.rot90(maps, k, (-2, -1)) for k in turns])


def camera_windows(maps):
    """Frame the object in every camera, as close-up photographs do: each camera's square screen
    window is centred on the object's outline in that view, with its longer side FILL of the window.

    Args:
        maps: (5, R, R) canonical object maps from `object_maps` (channel 0: height).
    Returns:
        (V, 3) tensor: horizontal centre, vertical centre and half-side of each window (object units).
    """
    res = maps.shape[-1]
    texel = 2 * EXTENT / res
    _, el = _camera_angles()
    h = _turned(maps[0])  # (V, R, R) rows: depth, nearest first
    body = h > 0.005
    depth = (EXTENT - (torch.arange(res) + 0.5) * texel).view(1, -1, 1)  # towards the camera, per row
    a = ((torch.arange(res) + 0.5) * texel - EXTENT).view(1, 1, -1).expand_as(h)  # across, per column
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
        world: (7, R, R) maps from `_world`: height, albedo r, g, b, shine, light visibility, occlusion.
        windows: (V, 3) from `camera_windows`: each camera's window centre (across, up) and half-side.
    Returns:
        hit: (V, 3, R, R) world x, y, z of the surface point each pixel sees.
        surface: (V, 8, R, R) albedo r, g, b, shine, light visibility, occlusion, and the height
            slopes along the camera's horizontal axis and towards the camera (the segment's own).
    """
    res = world.shape[-1]
    views = len(CAMERAS)
    texel = 2 * EXTENT / res
    az, el = _camera_angles()
    centre_a, centre_s, half = (windows[:, k].view(-1, 1, 1) for k in range(3))  # (V, 1, 1) each
    a = centre_a + half * _grid(res).view(1, 1, res)  # (V, 1, R) horizontal position of each column
    columns = torch.stack(torch.broadcast_tensors(a / EXTENT, _grid(res).view(1, res, 1)), -1)  # (V, R, R, 2)
    frames = F.grid_sample(_turned(world), columns, padding_mode="border", align_corners=False)
    h = frames[:, 0].contiguous()  # (V, R, R) rows: depth, nearest first
    slope_a = torch.gradient(h, dim=2)[0] / (2 * half / res)
    slope_w = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1] - h[:, 1:]], 1) / texel
    depth = EXTENT - (torch.arange(res) + 0.5) * texel  # (R,) towards the camera, per row
    s = -el.sin() * depth.view(1, -1, 1) + el.cos() * h  # (V, R, R) screen height of each texel
    rows = (centre_s - half * _grid(res).view(1, res, 1)).expand(views, res, res)  # screen height per pixel row
    idx = torch.searchsorted(s.cummax(1).values.transpose(1, 2).contiguous(),
                             rows.transpose(1, 2).contiguous()).transpose(1, 2)
    last = idx.clamp(max=res - 1)  # idx == res: the pixel sees past the far edge of the table patch
    prev = (idx - 1).clamp(min=0)
    s_idx, s_prev = s.gather(1, last), s.gather(1, prev)
    t = ((rows - s_prev) / (s_idx - s_prev)).nan_to_num(1.0).clamp(0, 1)
    z = torch.lerp(h.gather(1, prev), h.gather(1, last), t) * (idx < res)  # (V, R, R)
    w = EXTENT - (torch.lerp(prev.float(), idx.float(), t) + 0.5) * texel  # depth of the hit
    x, y = -az.sin() * a + az.cos() * w, az.cos() * a + az.sin() * w
    channels = torch.empty(views, 8, res + 1, res)  # one extra row: what lies beyond the patch
    channels[:, :6, :res], channels[:, 6, :res], channels[:, 7, :res] = frames[:, 1:], slope_a, slope_w
    channels[:, :, res] = torch.tensor(BACKGROUND).view(1, 8, 1)
    surface = channels.gather(2, idx[:, None].expand(-1, 8, -1, -1))  # (V, 8, R, R)
    return torch.stack([x, y, z], 1), surface


def _shade(surface, light):
    """Lambert + Blinn-Phong shading with cast shadows and ambient occlusion.

    Args:
        surface: (V, 8, R, R) from `_rasterize` (its albedo may be repainted).
        light: (azimuth, elevation, intensity) of the key light, radians.
    Returns:
        (V, 3, R, R) colours in [0, 1].
    """
    az, el = _camera_angles()
    lx, ly = math.cos(light[1]) * math.cos(light[0]), math.cos(light[1]) * math.sin(light[0])
    to_light = (-az.sin() * lx + az.cos() * ly, az.cos() * lx + az.sin() * ly, math.sin(light[1]))
    halfway = F.normalize(torch.stack(torch.broadcast_tensors(
        to_light[0], to_light[1] + el.cos(), to_light[2] + el.sin())), dim=0)  # (3, V, 1, 1)
    # camera axes: across, towards the camera, up
    na, nw = -surface[:, SLOPE_A:SLOPE_A + 1], -surface[:, SLOPE_W:SLOPE_W + 1]  # (V, 1, R, R)
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


def _faces(h, texel):
    """What defect placement reads off the posed height field.

    Args:
        h: (R, R) heights over [-EXTENT, EXTENT]^2; texel: the grid step, object units.
    Returns:
        dict of (R, R) maps: gx, gy (height gradient), slope, high and low (highest and lowest height
        within 4 texels), body (on the object), walls (side faces that can hold a defect: steep, at
        least MIN_WALL tall, free OPEN_SPACE in front), out_x, out_y (outward wall normal).
    """
    res = h.shape[-1]
    gy, gx = torch.gradient(h, spacing=texel)
    slope = torch.hypot(gx, gy)
    high = F.max_pool2d(F.max_pool2d(h[None], (9, 1), 1, (4, 0)), (1, 9), 1, (0, 4))[0]
    low = -F.max_pool2d(F.max_pool2d(-h[None], (9, 1), 1, (4, 0)), (1, 9), 1, (0, 4))[0]
    outward = OPEN_SPACE / texel / slope.clamp(min=1e-6)  # texels per unit of downhill gradient
    ahead = h[(torch.arange(res).view(-1, 1) - outward * gy).round().long().clamp(0, res - 1),
              (torch.arange(res).view(1, -1) - outward * gx).round().long().clamp(0, res - 1)]
    walls = (slope > 2.0) & (high - low > MIN_WALL) & (ahead < low + 0.25 * (high - low))
    return {"gx": gx, "gy": gy, "slope": slope, "high": high, "low": low, "body": h > 0.015, "walls": walls,
            "out_x": -gx / slope.clamp(min=1e-6), "out_y": -gy / slope.clamp(min=1e-6)}


def _on_side_face(faces, radius, code, rng, texel):
    """A spot on a side face that faces one way along the defect's length (shortened to fit).

    Args:
        faces: dict from `_faces`; radius: the defect's nominal size; code: one of SYNTH_DEFECTS;
        rng: numpy Generator; texel: the grid step, object units.
    Returns:
        (centre (3,), normal (3,), r1, r2), or None when none of 20 wall texels drawn holds the defect.
    """
    walls, high, low, out_x, out_y = (faces[k] for k in ("walls", "high", "low", "out_x", "out_y"))
    res = walls.shape[-1]
    candidates = torch.nonzero(walls)
    for _ in range(20):
        i, j = candidates[rng.integers(len(candidates))].tolist()
        r2 = min(radius, 0.45 * (high[i, j] - low[i, j]).item())  # vertical extent fits the face
        r1 = 2.5 * radius if code == "HS" else min(radius * radius / r2, 3.0 * radius)
        facing = walls & (out_x * out_x[i, j] + out_y * out_y[i, j] > 0.75)
        facing = F.max_pool2d(facing[None].float(), 5, 1, 2)[0] > 0  # (R, R), a few texels of slack
        along = torch.arange(1, int(r1 / texel) + 1, 2.0)  # texels along the face, one way
        along = torch.stack([along, -along])  # (2, K): both ways
        rows = (i + along * out_x[i, j]).round().long().clamp(0, res - 1)
        cols = (j - along * out_y[i, j]).round().long().clamp(0, res - 1)
        reach = facing[rows, cols].long().cumprod(1).sum(1).min().item() * 2 * texel  # along both ways
        if reach >= max(r2, 0.5 * radius):
            break
    else:
        return None
    x, y = (j + 0.5) * texel - EXTENT, (i + 0.5) * texel - EXTENT
    normal = np.array([out_x[i, j].item(), out_y[i, j].item(), 0.0])
    z = low[i, j].item() + rng.uniform(0.35, 0.65) * (high[i, j] - low[i, j]).item()
    return np.array([x, y, z]), normal, min(r1, reach), r2


def _on_upward_face(h, faces, radius, rng, texel):
    """A spot on a face of the object that slopes gently upward. Args: as `_on_side_face`, and h the
    (R, R) heights. Returns: (centre (3,), normal (3,), r1, r2)."""
    candidates = torch.nonzero(faces["body"] & (faces["slope"] < 0.6))
    i, j = candidates[rng.integers(len(candidates))].tolist()
    x, y = (j + 0.5) * texel - EXTENT, (i + 0.5) * texel - EXTENT
    normal = np.array([-faces["gx"][i, j].item(), -faces["gy"][i, j].item(), 1.0])
    normal /= np.linalg.norm(normal)
    z = h[i, j].item()
    r1 = radius * rng.uniform(0.8, 1.25)
    return np.array([x, y, z]), normal, r1, radius * radius / r1


def _place_defect(world, code, rng, generator):
    """Choose where a defect sits on the posed object and how big it is.

    A share WALL_SHARE of the defects sits on a side face tall enough to hold them, with free space
    in front (OPEN_SPACE) and facing one way along the defect's length (shortened to fit, or another
    face is drawn): seen by one or two side cameras. The others sit on an upward face, seen by every
    camera that a taller part does not block.
    Args:
        world: (7, R, R) posed maps from `_world`.
        code: one of SYNTH_DEFECTS.
        rng: numpy Generator; generator: torch.Generator (for the defect's outline noise).
    Returns:
        dict: code, centre (3,), normal n, tangents t1, t2, radii r1 (along t1), r2 (along t2),
        rn (thickness along n), radius (the nominal size), wall (on a side face?), paint colour (3,)
        (None for stains and scratches: `_paint` chooses it), outline gradients.
    """
    h = world[0]
    texel = 2 * EXTENT / h.shape[-1]
    faces = _faces(h, texel)
    radius = math.sqrt(rng.uniform(0.04, 0.08) * float(faces["body"].sum()) * texel ** 2 / math.pi)
    on_wall = bool(faces["walls"].any()) and rng.random() < WALL_SHARE
    spot = _on_side_face(faces, radius, code, rng, texel) if on_wall else None
    on_wall = spot is not None
    centre, normal, r1, r2 = spot if on_wall else _on_upward_face(h, faces, radius, rng, texel)
    t1, t2 = _frame(normal, rng)
    if code == "HS":  # a scratch: long and thin
        r1, r2 = min(2.5 * radius, r1) if on_wall else 2.5 * radius, min(max(0.05, 0.25 * radius), r2)
    paint = None  # stains and scratches: chosen by `_paint` against the surface they cover
    if code == "CH":  # discoloured: the saturated colour farthest from every colour of the object
        palette = torch.tensor([COLOURS[c][0] for c in ("red", "blue", "green", "yellow", "orange")])
        paint = palette[torch.cdist(palette, world[1:4, faces["body"]].T).amin(1).argmax()]
    return {"code": code, "centre": centre, "n": normal, "t1": t1, "t2": t2, "r1": r1,
            "r2": r2, "rn": max(0.5 * min(r1, r2), 0.03), "radius": radius, "wall": on_wall,
            "paint": paint, "outline": perlin_gradients(8, generator)}


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
    return 1 + 0.6 * perlin(q1 * 1.5 + 4, q2 * 1.5 + 4, defect["outline"])


def _deform(maps, defect):
    """Change the geometry for the shape defects (QS: material cut away, BX: a bulge).

    Args:
        maps: (5, R, R) posed height, albedo r, g, b, shine; defect: dict from `_place_defect`.
    Returns:
        (5, R, R) the changed maps.
    """
    res = maps.shape[-1]
    coords = _grid(res) * EXTENT
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
        hit: (V, 3, R, R) world points each pixel sees; surface: (V, 8, R, R).
    Returns:
        (repainted surface, (V, R, R) bool: pixels that see the defect).
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
        surface: (V, 8, R, R) what the cameras see with the defect; masks: (V, R, R) bool, the
        pixels that show the defect, emptied for views where they are fewer than MIN_VISIBLE; hit:
        (V, 3, R, R) the world point each pixel sees (moved where a QS or BX defect changes the shape).
    """
    res = world.shape[-1]
    defect = _place_defect(world, code, rng, generator)
    if code in ("QS", "BX"):
        hit_d, surface_d = _rasterize(_world(_deform(maps, defect), light), windows)
        moved = (hit_d - hit).abs() > 0.01  # (V, 3, R, R)
        masks = moved[:, 0] | moved[:, 1] | moved[:, 2]  # the pixel sees another surface point
    else:
        hit_d = hit
        surface_d, masks = _paint(defect, hit, surface)
    return surface_d, masks & (masks.flatten(1).sum(1).view(-1, 1, 1) >= MIN_VISIBLE * res * res), hit_d


def render_sample(category_maps, code, rng):
    """Render one synthetic sample: a slightly re-posed, re-lit object, with or without a defect.

    Args:
        category_maps: (5, R, R) from `object_maps`.
        code: None for a normal sample, else one of SYNTH_DEFECTS.
        rng: numpy Generator (everything random about the sample comes from it).
    Returns:
        images: (V, R, R, 3) uint8; masks: (V, R, R) bool (all False for a normal sample); hit:
        (V, 3, R, R) the world point x, y, z that each pixel sees (the defect's shape included).
    """
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    res = category_maps.shape[-1]
    turn, shift, light_turn, light_tilt, exposure, blotch, grain = JITTER
    maps = _pose(category_maps, math.radians(rng.uniform(-turn, turn)),
                 rng.uniform(-shift, shift, 2).tolist())
    blotches = F.interpolate(torch.randn(1, 1, res // 8, res // 8, generator=generator), size=(res, res),
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
    masks = torch.zeros(len(CAMERAS), res, res, dtype=torch.bool)
    if code is not None:
        for _ in range(10):  # place the defect again (at most 10 times) while no camera shows it
            surface_d, masks, hit_d = _defect_view(maps, world, surface, hit, light, windows, code, rng, generator)
            if masks.any():
                break
        images = torch.where(masks[:, None], _shade(surface_d, light), images)
        hit = torch.where(masks[:, None], hit_d, hit)  # what the pixels show: the defect's shape where shown
    noise = grain * torch.randn(images.shape, generator=generator)  # sensor noise
    images = ((images + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy(), masks.numpy(), hit


# ----------------------------------------------------------------------------- correspondences between views
# What the renderer knows and no real data set gives: the world point behind every pixel, hence which
# pixels of two cameras see the same point, and which windows of MVAS's grids see the same surface.

GEOMETRY_GRID = 64  # the cache keeps the geometry of a 64 x 64 grid of each view's pixels
SEEN_WITHIN = 2.0  # a camera sees a point when its pixel there shows a point at most this many pixels away


def project(points, windows, poses=None):
    """Where each camera's picture shows world points: `_rasterize`'s orthographic projection run
    forwards, without the depth test (see `visibility`).

    Args:
        points: (..., 3) world x, y, z.
        windows: (V, 3) from `camera_windows`.
        poses: (V, 2) each camera's azimuth and elevation, radians (None: CAMERA_POSES).
    Returns:
        (V, ..., 2) the position in each picture, (row, column) as fractions of its side: pixel
        (r, c) of an R x R picture covers [r / R, (r + 1) / R) x [c / R, (c + 1) / R).
    """
    az, el = _camera_angles() if poses is None else (poses[:, 0], poses[:, 1])
    shape = (-1,) + (1,) * (points.dim() - 1)  # broadcast over the points' shape
    az, el = az.reshape(shape), el.reshape(shape)
    centre_a, centre_s, half = (windows[:, k].reshape(shape) for k in range(3))
    x, y, z = points.unbind(-1)
    across = -az.sin() * x + az.cos() * y  # (V, ...) the camera's horizontal axis
    depth = az.cos() * x + az.sin() * y  # towards the camera
    up = -el.sin() * depth + el.cos() * z  # screen height
    return torch.stack([((centre_s - up) / half + 1) / 2, ((across - centre_a) / half + 1) / 2], -1)


def visibility(points, hit, windows, poses=None):
    """Which cameras see given object points: a depth test. Camera j sees a point when the pixel it
    projects to shows that point (within SEEN_WITHIN of that camera's pixels); a nearer surface there
    occludes it.

    Args:
        points: (V, ..., 3) world points, those that view i shows at some of its pixels in row i
            (`hit.permute(0, 2, 3, 1)`: every pixel).
        hit: (V, 3, R, R) the world point behind each pixel of each view (`render_sample`).
        windows, poses: as `project`.
    Returns:
        (V, V, ...) bool: [i, j] whether camera j sees the points of row i; [i, i]: whether they
        lie on the object (not on the table).
    """
    V, _, R, _ = hit.shape
    pixel = (project(points, windows, poses) * R).floor().long()  # (V_j, V_i, ..., 2)
    inside = ((pixel >= 0) & (pixel < R)).all(-1)  # (V_j, V_i, ...)
    pixel = pixel.clamp(0, R - 1)
    shown = torch.stack([hit[j][:, pixel[j, ..., 0], pixel[j, ..., 1]] for j in range(V)])  # (V_j, 3, V_i, ...)
    pixel_size = (2 * windows[:, 2] / R).reshape((-1,) + (1,) * (points.dim() - 1))  # (V_j, 1, ...)
    close = (shown.movedim(1, -1) - points).norm(dim=-1) < SEEN_WITHIN * pixel_size  # (V_j, V_i, ...)
    return (inside & close & (points[..., 2] > 0.005)).transpose(0, 1)  # (V_i, V_j, ...)


def sample_geometry(hit, windows, grid=GEOMETRY_GRID):
    """What the cache keeps of a sample's geometry (`synthesize`): a grid x grid subset of each view's
    pixels (one per grid cell), the world points behind them and which cameras see those points.

    Args:
        hit: (V, 3, R, R) from `render_sample`; windows: (V, 3) from `camera_windows`; grid: G <= R.
    Returns:
        points (V, 3, G, G) float16, seen (V, V, G, G) bool (`visibility` of those points).
    """
    R = hit.shape[-1]
    pick = ((torch.arange(grid) + 0.5) * R / grid).long()  # (G,) a pixel inside each grid cell
    points = hit[:, :, pick][..., pick]  # (V, 3, G, G)
    return points.half(), visibility(points.permute(0, 2, 3, 1), hit, windows)


def window_overlaps(points, seen, windows, size, n_win, poses=None):
    """How much of the object surface that each MVAS window of one view sees, each window of every
    other view sees too: the geometric counterparts of a window, at one scale of the model.

    Args:
        points, seen: (V, 3, G, G), (V, V, G, G) from `sample_geometry` (a grid cell stands for the
            pixels it covers).
        windows, poses: as `project`.
        size: the side h = w of the feature map that MVAS cuts (e.g. 24 at scale 0 of a 96 px input).
        n_win: a, windows per side, the map zero-padded to a multiple of it (mvad.window_partition).
    Returns:
        (V, A, V, A) with A = a*a, windows row-major: [i, p, j, q] the share of the object pixels of
        window p of view i whose point camera j sees inside its window q (0 where j == i; over q
        the shares of one (i, p, j) sum to at most 1).
    """
    V, _, G, _ = points.shape
    tokens = -(-size // n_win)  # tokens per window side (mvad.window_grid)
    A = n_win * n_win

    def window_of(where):  # (..., 2) positions as fractions of the picture -> (...) window index
        token = (where.clamp(0, 1 - 1e-6) * size).floor().long() // tokens
        return token[..., 0] * n_win + token[..., 1]

    centres = (torch.arange(G) + 0.5) / G
    own = window_of(torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1)).flatten()  # (G*G,)
    there = window_of(project(points.permute(0, 2, 3, 1).float(), windows, poses)).flatten(2)  # (V_j, V_i, G*G)
    overlaps = torch.zeros(V, A, V, A)
    for i in range(V):
        surface = torch.bincount(own, seen[i, i].flatten().float(), minlength=A)  # (A,) object pixels
        for j in set(range(V)) - {i}:
            shared = torch.bincount(own * A + there[j, i], seen[i, j].flatten().float(), minlength=A * A)
            overlaps[i, :, j] = shared.view(A, A) / surface.clamp(min=1)[:, None]
    return overlaps


def candidate_overlaps(overlaps):
    """`window_overlaps` in MVAS's candidate order: for query view i the windows of the other views
    0..i-1, i+1..V-1, view-major (mvad.MultiViewFusion). (V, A, V, A) -> (V, A, (V-1) A)."""
    V = overlaps.shape[0]
    return torch.stack([torch.cat([overlaps[i, :, j] for j in range(V) if j != i], -1) for i in range(V)])


def _timestamp(number, view):
    """A Real-IAD-style capture time (YYYYmmddHHMMSS), distinct per sample and view."""
    return (datetime(2023, 9, 12, 9, 0, 0) + timedelta(seconds=40 * number + view)).strftime("%Y%m%d%H%M%S")


def _write_sample(category_dir, category, number, code, images, masks):
    """Write one sample's images (and masks) in the Real-IAD layout. Returns: its sample key (the
    file names' stem before the camera) and its 5 JSON entries."""
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
    return stem, entries


CONSISTENCY = "_consistency"  # the suffix of a consistency category's name: zipper_consistency
CONSISTENCY_CODE = "CV"  # its defect class: the views disagree (not a Real-IAD code)
DISPUTED_CONTRAST = 25  # a pixel shows the disputed part when the two looks differ by this much (of 255)
GEOMETRY_DIR = "synthetic_geometry"  # <root>/synthetic_geometry/<category>.npz: `sample_geometry` per sample


def consistency_base(category):
    """The plain category a consistency category is made of (zipper_consistency -> zipper); None for others."""
    return category[:-len(CONSISTENCY)] if category.endswith(CONSISTENCY) else None


def _check_synthetic_category(category):
    if (consistency_base(category) or category) not in CATEGORIES:
        raise UserError(f"unknown category '{category}'; valid categories: {', '.join(CATEGORIES)}, "
                        f"each also as <category>{CONSISTENCY} (views that disagree, synthetic data only)")


def render_consistency(looks, defective, rng, choice):
    """One sample of a consistency category: every view alone is a normal view, only the views
    together can be anomalous. Each view shows the object in one of its two looks (`object_maps`:
    the accent parts in two colours); a normal sample shows one look in every view (either, half of
    the samples each), a defective one the other look in one or two of its views.

    Args:
        looks: two (5, R, R) object maps of one category, as `object_maps` and its recoloured twin.
        defective: whether the views disagree.
        rng: the rendering's numpy Generator, as `render_sample` takes it: both looks are rendered
            from copies of it, so with the same pose, light, texture and noise.
        choice: a numpy Generator for the looks (the majority's and the odd views).
    Returns:
        images (V, R, R, 3) uint8; masks (V, R, R) bool, the disputed parts (where the two looks
        differ) in the views that disagree with the majority; hit (V, 3, R, R) as `render_sample`.
    """
    renders = [render_sample(maps, None, copy.deepcopy(rng)) for maps in looks]  # one pose, two looks
    views = len(CAMERAS)
    look = np.full(views, choice.integers(2))  # (V,) the majority's look everywhere
    odd = np.zeros(views, dtype=bool)
    if defective:
        odd[choice.choice(views, size=choice.integers(1, 3), replace=False)] = True
    look[odd] = 1 - look[odd]
    images = np.where((look == 0)[:, None, None, None], renders[0][0], renders[1][0])  # (V, R, R, 3)
    disputed = np.abs(renders[0][0].astype(np.int16) - renders[1][0]).max(-1) > DISPUTED_CONTRAST  # (V, R, R)
    return images, disputed & odd[:, None, None], renders[0][2]


def _render_role(maps, looks, code, rng, choice):
    """A sample of a plain category (`render_sample`; looks None) or of a consistency category
    (`render_consistency`; code None or CONSISTENCY_CODE). Returns: images, masks, hit."""
    if looks is None:
        return render_sample(maps, code, rng)
    return render_consistency(looks, code is not None, rng, choice)


def _write_geometry(out, category, geometry, windows):
    """Writes every sample's `sample_geometry` to out/GEOMETRY_DIR/<category>.npz (about 6 MB per
    100 samples), with the cameras' windows: what `load_geometry` reads."""
    keys = sorted(geometry)
    (out / GEOMETRY_DIR).mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / GEOMETRY_DIR / f"{category}.npz", keys=np.array(keys), windows=windows.numpy(),
                        points=np.stack([geometry[key][0].numpy() for key in keys]),
                        seen=np.stack([geometry[key][1].numpy() for key in keys]))


def load_geometry(root, category):
    """A synthetic category's stored geometry (`_write_geometry`).

    Returns:
        {sample key: (points (V, 3, G, G), seen (V, V, G, G))} and the windows (V, 3) (`sample_geometry`).
    """
    path = Path(root) / GEOMETRY_DIR / f"{category}.npz"
    if not path.is_file():
        raise UserError(f"{path} not found: routing 'oracle' needs the geometry that the built-in synthetic data "
                        "stores beside its images (real data has none); use --set routing=dot or routing=cosine")
    with np.load(path) as stored:
        points, seen = torch.from_numpy(stored["points"]), torch.from_numpy(stored["seen"])
        samples = {key: (points[n], seen[n]) for n, key in enumerate(stored["keys"].tolist())}
        return samples, torch.from_numpy(stored["windows"])


class WithOverlaps(Dataset):
    """A synthetic split whose items also carry "overlaps": per MVAS scale, every query window's
    `window_overlaps` with the windows of the other views, in MVAS's candidate order (V, A, (V-1) A):
    what MVAD's routing "oracle" ranks its candidates by.

    Args:
        dataset: a data.RealIAD split of the built-in synthetic data (items with "sample_id", "category").
        root: its data root; sizes: the feature-map side at each MVAS scale; n_win: a at each scale.
    """

    def __init__(self, dataset, root, sizes, n_win):
        self.dataset, self.sizes, self.n_win = dataset, list(sizes), list(n_win)
        self.geometry = {category: load_geometry(root, category) for category in dataset.categories}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = dict(self.dataset[index])
        samples, windows = self.geometry[item["category"]]
        points, seen = samples[item["sample_id"]]
        item["overlaps"] = [candidate_overlaps(window_overlaps(points, seen, windows, size, a))
                            for size, a in zip(self.sizes, self.n_win)]  # S x (V, A, (V-1) A)
        return item


def routed(dataset, root, model):
    """The split as the model reads it: for MVAD with routing "oracle" its items also carry each
    window's geometric overlaps with the other views' windows (`WithOverlaps`); otherwise
    the split itself."""
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "routing", "dot") != "oracle" or model.fusion is None:
        return dataset
    return WithOverlaps(dataset, root, [cfg.image_size // s for s in model.encoder.strides], cfg.n_win)


def routing_inputs(batch: dict, device) -> dict:
    """What a batch of a `routed` split holds for the model beyond the images: {"overlaps": S x
    (B, V, A, M)} for MVAD's routing "oracle", {} otherwise."""
    return {"overlaps": [o.to(device) for o in batch["overlaps"]]} if "overlaps" in batch else {}


def synthesize(out, category, n_train=40, n_test_normal=30, n_test_defect=30, resolution=256, seed=0):
    """Write a synthetic multi-view split of one category in the Real-IAD layout.

    Writes `out/realiad_<resolution>/<category>/{OK,NG/<code>}/S<nnnn>/*.jpg|png`,
    `out/realiad_jsons/<category>.json` (meta, train, test; entries in shuffled order) and each
    sample's geometry, `out/synthetic_geometry/<category>.npz`. Each sample draws its randomness
    from (seed, category, its role, its index within the role), so a sample does not change when
    the other sizes do. A consistency category (<category>_consistency) is made of the plain
    category's object in two looks (`render_consistency`), its defective samples of class "CV".
    Args:
        out: output folder (the Real-IAD root to pass to `RealIAD`).
        category: one of CATEGORIES, or one of them with the suffix _consistency.
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
    splits, geometry, windows = _render_split(out, category, n_train, n_test_normal, n_test_defect, resolution, seed)
    order = np.random.default_rng(seed)
    content = {"meta": {"prefix": f"{category}/", "normal_class": "OK"},
               **{split: [entries[i] for i in order.permutation(len(entries))]
                  for split, entries in splits.items()}}
    (out / "realiad_jsons").mkdir(parents=True, exist_ok=True)
    (out / "realiad_jsons" / f"{category}.json").write_text(json.dumps(content, indent=1))
    _write_geometry(out, category, geometry, windows)
    return out


def _render_split(out, category, n_train, n_test_normal, n_test_defect, resolution, seed):
    """Renders and writes every sample of a split (`synthesize`). Returns: the JSON entries per split,
    {sample key: `sample_geometry`}, the cameras' windows (V, 3)."""
    base = consistency_base(category)
    maps = object_maps(base or category, resolution)
    looks = None if base is None else (maps, object_maps(base, resolution, recoloured=True))
    plan = [("train", None)] * n_train + [("test", None)] * n_test_normal
    plan += [("test", CONSISTENCY_CODE if base else SYNTH_DEFECTS[i % len(SYNTH_DEFECTS)]) for i in range(n_test_defect)]
    splits, geometry, windows = {"train": [], "test": []}, {}, camera_windows(maps)
    index = Counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: about as fast, and far faster when other jobs load the cores
    try:
        for number, (split, code) in enumerate(plan, start=1):
            role = 0 if split == "train" else 1 if code is None else 2
            drawn = [seed, zlib.crc32(category.encode()), role, index[role]]
            index[role] += 1
            images, masks, hit = _render_role(maps, looks, code, np.random.default_rng(drawn),
                                              np.random.default_rng(drawn + [1]))
            key, entries = _write_sample(out / f"realiad_{resolution}" / category, category, number, code, images, masks)
            splits[split] += entries
            geometry[key] = sample_geometry(hit, windows)
    finally:
        torch.set_num_threads(threads)
    return splits, geometry, windows


def visibility_stats(root, category):
    """How many views show the defect, per defective test sample (read back from the JSON).

    Args:
        root: a Real-IAD(-like) root; category: its category.
    Returns:
        list of 6 counts: defective samples (those in NG folders) shown by 0, 1, ..., 5 views.
    """
    json_path = find_json(Path(root), category)
    meta, entries = read_json(json_path, "test")
    counts = [0] * (len(CAMERAS) + 1)
    for key, views in group_views(entries, json_path).items():
        if "_NG_" in key:
            counts[sum(e["anomaly_class"] != meta.get("normal_class", "OK") and e["mask_path"] is not None
                       for e in views.values())] += 1
    return counts


SYNTH_VERSION = 4  # part of the cache key: bump it when the generator changes what it writes
SYNTHETIC_CACHE = Path(__file__).resolve().parent / "data" / "synthetic"  # synthetic_root's default folder


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


def main(argv=None):
    """`python synthetic.py ...`: write a synthetic split and print its visibility statistics."""
    parser = ArgumentParser(description="Write a synthetic multi-view split in the Real-IAD layout.")
    parser.add_argument("--out", type=Path, required=True, help="output folder (a Real-IAD root)")
    parser.add_argument("--category", default="zipper", help="Real-IAD category name")
    parser.add_argument("--n-train", type=int, default=40, help="normal training samples")
    parser.add_argument("--n-test-normal", type=int, default=30, help="normal test samples")
    parser.add_argument("--n-test-defect", type=int, default=30, help="defective test samples")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
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
