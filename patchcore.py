"""PatchCore: a memory bank of normal patch features, the strongest single-view baseline, on multi-view data.

Paper: K. Roth, L. Pemula, J. Zepeda, B. Schoelkopf, T. Brox, P. Gehler, "Towards Total Recall in
Industrial Anomaly Detection", CVPR 2022, arXiv:2106.08265. Official code:
amazon-science/patchcore-inspection (src/patchcore/patchcore.py, common.py, sampler.py). Where the
paper and the code differ we follow the code and say so at the line.

Nothing is trained: one pass over the normal training images fills a memory bank (`fit`).

    images (B, V, 3, H, W) -> every view on its own: frozen WideResNet50-2, stages 2 and 3
      -> 3x3 local average (Sec. 3.1, eq. 2) -> stage 3 upsampled to stage 2's grid
      -> both pooled over channels to D = 1024 and stacked, pooled to D: one feature per patch
    fit:         the features of all training patches -> greedy k-center coreset (Alg. 1) of 10%
                 chosen on a random projection to 128 dimensions -> the memory bank
    anomaly map: each test patch's squared distance to its nearest bank entry (eq. 6), bilinear
                 upsampling to the input, Gaussian sigma 4
    image score = max of its map, sample score = max over its views (eval.py)

Shape legend (the same letters in every file): B samples, V views per sample, N images ((sample, view)
pairs, e.g. B*V), n items in a list (samples of a split, scores), C channels, H x W image, h x w feature
map, S scales, m heads, d = C / m channels per head, T tokens per attention unit (an MVAS window; an
IDIF view). Here: h x w the stage-2 grid (H/8, W/8), P = h*w patches per image, D feature width, r
projection width, G memory banks (1 or V), E entries per bank (the coreset), X patches in a pool.

Run: `python train.py --method patchcore --category zipper`; tests: `python -m pytest tests/test_patchcore.py`.
A bad argument raises ValueError (Python's type for it; the command lines print it as one line).

Choices where the paper is silent, and where we differ from the official code:
- Multi-view (the paper is single-view): `per_camera=True` (default) keeps one bank per camera, 10% of
  its patches; on the synthetic zipper (CPU profile, seeds 42-44) sample AUROC 90.6 +- 1.7 against
  85.4 +- 2.7 for one bank over all views, half the fit time, 1 point less pixel AUROC, 3 less AU-PRO.
- Distance: squared L2, as the official faiss IndexFlatL2 search (the paper writes L2, eq. 6).
- Image score: eval.py's max of the smoothed map for every method (official: max before smoothing);
  the paper's density reweighting (eq. 7) is left out, as in the official code.
- Coreset: exact greedy farthest-point from one seeded random patch (official default: approximate);
  a Gaussian random projection (official: an untrained nn.Linear).
- Aggregation: 3x3 average with zero padding, then the official two channel poolings (stage 2 weighs
  the window's centre twice in the official one-step pooling; stage 3 is the same).
- Input: the run's image size without a crop (official: resize 256, crop 224).
- Encoder: mvad.FrozenEncoder (ImageNet, else random-init calibrated on the training images).
- Memory: `fit` holds every training patch's feature, n * V * P * D * 4 bytes (0.2 GB synthetic, 128 px).
"""
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mvad import ENCODERS, FrozenEncoder, check_field, check_weights, gaussian_blur, is_count

# ----------------------------------------------------------------------------- features, pure functions


def channel_pool(x: torch.Tensor, width: int) -> torch.Tensor:
    """Adaptive average pooling over the channels of every position (the official MeanMapper and
    Aggregator): output channel j is the mean of the input channels in [j C / width, (j + 1) C / width);
    with width > C each channel is repeated.

    Args:
        x: (N, C, h, w).
        width: output channels.
    Returns:
        (N, width, h, w).
    """
    N, C, h, w = x.shape
    x = x.permute(0, 2, 3, 1).reshape(N * h * w, 1, C)  # (N*h*w, 1, C)
    x = F.adaptive_avg_pool1d(x, width)  # (N*h*w, 1, width)
    return x.view(N, h, w, width).permute(0, 3, 1, 2)  # (N, width, h, w)


def patch_features(stage2: torch.Tensor, stage3: torch.Tensor, patch_size: int, width: int) -> torch.Tensor:
    """Locally aware patch features (Sec. 3.1): the mid-level stages 2 and 3, each averaged over a
    patch_size x patch_size neighbourhood, stage 3 upsampled to stage 2's grid, pooled to `width`.

    Args:
        stage2: (N, C2, h, w); stage3: (N, C3, h/2, w/2) encoder features.
        patch_size: p, the neighbourhood side (paper: 3).
        width: D (paper: 1024).
    Returns:
        (N, h, w, D), one feature per patch of the stage-2 grid.
    """
    pad = patch_size // 2
    # STEP 1: local neighbourhood aggregation, phi(N_p(h, w)) (eq. 2): an average with zero padding
    f2 = F.avg_pool2d(stage2, patch_size, stride=1, padding=pad)  # (N, C2, h, w)
    f3 = F.avg_pool2d(stage3, patch_size, stride=1, padding=pad)  # (N, C3, h/2, w/2)
    # STEP 2: stage 3 to stage 2's grid, bilinear as the official code
    f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)  # (N, C3, h, w)
    # STEP 3: each stage to D channels, stacked, pooled to D: stage 2 and stage 3 get D/2 channels each
    stacked = torch.cat([channel_pool(f2, width), channel_pool(f3, width)], dim=1)  # (N, 2D, h, w)
    return channel_pool(stacked, width).permute(0, 2, 3, 1)  # (N, h, w, D)


# ----------------------------------------------------------------------------- coreset, search, map


def greedy_coreset(features: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy k-center selection (Alg. 1): starting from one random point, add at each step the point
    farthest (L2) from everything selected so far.

    Args:
        features: (X, r) points, usually a random projection of the patch features.
        k: points to select, 1 <= k <= X.
        generator: draws the starting point.
    Returns:
        (k,) int64 indices into features, in the order of selection (all distinct).
    """
    X = features.shape[0]
    selected = torch.empty(k, dtype=torch.long)
    selected[0] = torch.randint(X, (1,), generator=generator)
    # distance of every point to its nearest selected point
    nearest = torch.linalg.vector_norm(features - features[selected[0]], dim=1)  # (X,)
    for i in range(1, k):
        selected[i] = nearest.argmax()  # the farthest point; selected points have distance 0
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(features - features[selected[i]], dim=1))
    return selected


def coreset_indices(features: torch.Tensor, fraction: float, projection_dim: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The patches kept in the memory bank: a greedy coreset (Alg. 1) of int(fraction * X) of them
    (at least one), chosen on a random Gaussian projection psi to projection_dim dimensions.

    Args:
        features: (X, D) patch features.
        fraction: share of the patches to keep (paper: 0.1 or 0.01); 1 keeps all.
        projection_dim: r (paper: 128).
        generator: draws the projection and the starting point.
    Returns:
        (E,) int64 indices into features.
    """
    X, D = features.shape
    k = max(1, int(fraction * X))  # the official code rounds down
    if k >= X:
        return torch.arange(X)
    psi = torch.randn(D, projection_dim, generator=generator) / math.sqrt(projection_dim)
    return greedy_coreset(features @ psi.to(features), k, generator)  # (E,)


def nearest_neighbour_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 2**24) -> torch.Tensor:
    """Squared L2 distance of every query to its nearest bank entry (eq. 6; squared as the official
    faiss IndexFlatL2 search), in chunks of queries so that no more than `chunk` distances are held.

    Args:
        queries: (X, D); bank: (E, D).
        chunk: the most query-entry distances computed at once (2^24: 64 MiB in float32).
    Returns:
        (X,).
    """
    rows = max(1, chunk // max(1, bank.shape[0]))
    nearest = [torch.cdist(q, bank).amin(dim=1) for q in queries.split(rows)]  # X/rows x (rows,)
    return torch.cat(nearest).square()  # (X,)


def score_map(scores: torch.Tensor, size, sigma: float) -> torch.Tensor:
    """Patch scores -> anomaly map: bilinear upsampling to the input (align_corners=False) and Gaussian
    smoothing, as the official RescaleSegmentor (src/patchcore/common.py; SimpleNet's common.py keeps it).

    Args:
        scores: (N, h, w) one score per patch.
        size: (H, W); sigma: the Gaussian's standard deviation in pixels (official: 4).
    Returns:
        (N, H, W).
    """
    maps = F.interpolate(scores[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]  # (N, H, W)
    return gaussian_blur(maps, sigma)


# ----------------------------------------------------------------------------- config and model


@dataclass
class PatchCoreConfig:
    backbone: str = "wide_resnet50_2"  # frozen encoder, stages 2 and 3 used (paper: WideResNet50-2)
    weights: str = "auto"  # encoder weights: auto | imagenet | none | PATH (mvad.FrozenEncoder); paper: ImageNet
    image_size: int = 256  # input side H = W; paper: 256 resized, 224 cropped
    patch_size: int = 3  # p, side of the local neighbourhood averaged into each patch (paper: 3)
    width: int = 1024  # D, feature width after pooling over channels (paper: 1024)
    coreset_fraction: float = 0.1  # share of the training patches kept in the bank (paper: 0.1; also 0.01)
    projection_dim: int = 128  # r, random projection on which the coreset is chosen (paper: 128)
    per_camera: bool = True  # one bank per camera, not one over all views (paper: single-view; see above)
    blur_sigma: float = 4.0  # Gaussian smoothing of the anomaly maps in pixels (paper: 4)

    def __post_init__(self):
        """Checks every field: a ValueError naming it, its value, its range and the paper's value."""
        check_field(self, "backbone", self.backbone in ENCODERS, f"one of {', '.join(ENCODERS)}",
                    "the paper uses wide_resnet50_2")
        check_weights(self)
        check_field(self, "image_size", is_count(self.image_size) and self.image_size % 16 == 0,
                    "a multiple of 16 for PatchCore (stage 3 is H/16; --image-size)", "the paper uses 256")
        check_field(self, "patch_size", is_count(self.patch_size) and self.patch_size % 2 == 1,
                    "odd and positive (centred on its patch)", "the paper uses 3")
        check_field(self, "width", is_count(self.width), "at least 1", "the paper uses 1024")
        check_field(self, "coreset_fraction", 0 < self.coreset_fraction <= 1, "in (0, 1]",
                    "the paper uses 0.1 or 0.01")
        check_field(self, "projection_dim", is_count(self.projection_dim), "at least 1", "the paper uses 128")
        check_field(self, "per_camera", isinstance(self.per_camera, bool), "true or false",
                    "the paper: single-view, one bank per camera here")
        check_field(self, "blur_sigma", self.blur_sigma > 0, "positive", "the paper uses 4")


class PatchCore(nn.Module):
    """Frozen encoder -> locally aware patch features -> nearest neighbour in a coreset memory bank."""

    def __init__(self, cfg: PatchCoreConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = FrozenEncoder(cfg.backbone, cfg.weights)
        # (G, E, D): G = 1 bank over all views, or one per camera; empty until fit
        self.register_buffer("memory_bank", torch.zeros(0, 0, cfg.width))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The bank's size is known only after fit: take the stored bank's size before loading it."""
        bank = state_dict.get(prefix + "memory_bank")
        if bank is not None and bank.dim() == 3 and bank.shape[-1] == self.cfg.width:
            self.memory_bank = torch.empty_like(bank, device=self.memory_bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, V, 3, H, W) ImageNet-normalised views -> (B, V, h, w, D) patch features, each view on its own."""
        B, V = images.shape[:2]
        _, stage2, stage3 = self.encoder(images.flatten(0, 1))  # (N, C2, h, w), (N, C3, h/2, w/2)
        features = patch_features(stage2.float(), stage3.float(), self.cfg.patch_size, self.cfg.width)
        return features.unflatten(0, (B, V))  # (B, V, h, w, D)

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor], seed: int = 0) -> dict:
        """Fills the memory bank from normal training samples.

        Args:
            batches: (B, V, 3, H, W) ImageNet-normalised training samples, every view present.
            seed: draws the coreset's random projection and starting point.
        Returns:
            {"patches": training patches, "bank_size": entries kept, "banks": G}.
        """
        # STEP 1: the features of every training patch, view by view
        features = torch.cat([self.embed(images).flatten(2, 3) for images in batches])  # (n, V, P, D)
        n, V, P, D = features.shape
        # STEP 2: the patches of each bank: all views together, or camera by camera
        if self.cfg.per_camera:
            pools = features.transpose(0, 1).reshape(V, n * P, D)  # (V, n*P, D)
        else:
            pools = features.reshape(1, n * V * P, D)  # (1, n*V*P, D)
        # STEP 3: greedy coreset subsampling (Sec. 3.2, Alg. 1) of each bank
        generator = torch.Generator().manual_seed(seed)
        banks = [pool[coreset_indices(pool, self.cfg.coreset_fraction, self.cfg.projection_dim, generator)]
                 for pool in pools]  # G x (E, D)
        self.memory_bank = torch.stack(banks)  # (G, E, D)
        return {"patches": n * V * P, "bank_size": self.memory_bank.shape[0] * self.memory_bank.shape[1],
                "banks": self.memory_bank.shape[0]}

    @torch.no_grad()
    def anomaly_map(self, images: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Anomaly maps at input resolution.

        Args:
            images: (B, V, 3, H, W) ImageNet-normalised; view_mask: (B, V) bool or None (all present).
        Returns:
            (B, V, H, W) float32: each patch's squared distance to its nearest bank entry, upsampled
            bilinearly, Gaussian sigma 4; zeros for missing views (each view is scored on its own).
        """
        G = self.memory_bank.shape[0]
        B, V, _, H, W = images.shape
        if G == 0:
            raise ValueError("PatchCore's memory bank is empty: fit it first (python train.py --method patchcore)")
        if G > 1 and G != V:
            raise ValueError(f"this PatchCore has one memory bank per camera for {G} cameras; "
                             f"the images have {V} views")
        features = self.embed(images)  # (B, V, h, w, D)
        _, _, h, w, D = features.shape
        # STEP 4: nearest-neighbour search (eq. 6): each view in its camera's bank, or all in the one bank
        banks = self.memory_bank.expand(V, -1, -1)  # (V, E, D)
        scores = torch.stack([nearest_neighbour_distance(features[:, v].reshape(-1, D), banks[v]).view(B, h, w)
                              for v in range(V)], dim=1)  # (B, V, h, w)
        # STEP 5: bilinear upsampling to the input and Gaussian smoothing (Sec. 3.3)
        maps = score_map(scores.flatten(0, 1), (H, W), self.cfg.blur_sigma).view(B, V, H, W)  # (B, V, H, W)
        if view_mask is not None:
            maps = maps * view_mask[:, :, None, None]
        return maps
