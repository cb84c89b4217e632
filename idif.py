"""IDIF: Intra-view Decoupling and Inter-view Fusion for multi-view anomaly detection.

Mao et al., "Unveiling Multi-View Anomaly Detection: Intra-view Decoupling and Inter-view Fusion",
AAAI 2025 ("the paper" below; the AAAI proceedings, no arXiv id is cited here). No official code is
released (github.com/Kerio99/IDIF holds only a README), so this file follows the paper's text. Denoising
knowledge distillation in the style of DeSTSeg (Zhang et al., CVPR 2023, arXiv:2211.11317,
github.com/apple/ml-destseg): a frozen teacher sees the clean views, a student sees pseudo-anomalous
views (DRAEM's recipe: Zavrtanik et al., ICCV 2021, arXiv:2108.07610; data.PseudoAnomalies) and must
reproduce the teacher's features of the clean ones.
Between the student's encoder and its decoders (c: the CB's latent sample, L channels; f_c: its
decoding to the C channels of f_E, the tensor that is subtracted):

    f_E^(v)  = StudentEncoder(corrupted view v)                  view-shared ResNet18, stages 1-3
    c        = mu + Sigma * eps,  (mu, Sigma) from all views     Consistency Bottleneck (CB)
    f_c      = Decode(c)                                         one per sample, shared by its views
    f_s^(v)  = f_E^(v) - f_c                                     intra-view decoupling
    P_n      = FusionBlocks(P_0, f_s^(1..V))                     Implicit Voxel Construction (IVC)
    f_p^(v)  = STN^(v)(P_n, theta^(v))                           re-projection to view v
    f_stu^(v) = Decoder^(v)(f_p^(v) + f_c)                       three scales, like the teacher
    L_IB     = mean over kept views of |f_E^(v) - f_c|^2         information bottleneck (IB) loss
    L        = alpha L_Distill + beta L_IB                       alpha = beta = 1 (paper)
    map      = mean over scales of upsampled 1 - cos(f_tea, f_stu), Gaussian-smoothed (blur_sigma)
(IDIF STEPS 1-6, the STEP comments of `IDIF.features` and `decoder_input`: teacher, student encoder,
CB, IVC, STN, decoders.)

Shape legend (the same letters in every file): B samples, V views per sample, N images ((sample, view)
pairs, e.g. B*V), n items in a list (samples of a split, scores), C channels, H x W image, h x w feature
map, S scales, m heads, d = C / m channels per head, T tokens per attention unit (an MVAS window; an
IDIF view). Here: C = 256 (the student's stage 3 = the voxel width), h = w = H / 16 the f_E / f_s
grid, T = (h / p) * (w / p), p patch side, L latent channels of the CB, Dv x Hv x Wv voxel cells,
Tq / Tk query / key tokens, C_s x h_s x w_s teacher scale s (64 x H/4, 128 x H/8, 256 x H/16).

Run: `python train.py --method idif --category zipper`; tests: `python -m pytest tests/test_idif.py`.
A bad argument raises ValueError (Python's type for it; the command lines print it as one line).
Ablations (`--set bottleneck=false`, `--set fusion=false`): no CB (f_c = 0, f_s = f_E, no L_IB); no IVC
and STN (f_p = f_s); both off is the paper's per-view ensemble (its ablation: 94.0 / +IVC 96.1 / full 97.0).
`--set fusion_residual=true` (ours, a diagnostic): f_p = f_s + STN(P_n), so that a view's own detail does not
have to pass through the voxel (bench/ablations.py's `idif-ivc-residual`).
Size (5 views, 256 px): 18.8 M parameters (2.8 M frozen teacher), 23.4 GMACs per sample for a map.

The paper states: a frozen ImageNet ResNet18 teacher (stages 1-3, 256 px, batch 8 samples), a
view-shared student encoder, the CB (f_e^mu, f_e^Sigma over all views, f_c ~ N(mu, Sigma), mu at test
time, L_IB the negative log-likelihood of a training-only decoder q(f_E | f_c), no KL term), the IVC
(learnable voxel P_0; self-attention + FFN, cross-attention to the patchified f_s + FFN), masked-view
cross-attention, one STN and one decoder per view, View-wise Dropout p = 0.2. Our choices where it is silent:
- Student encoder: only stage 3 is f_E; no skip connections, so the decoders never see the corrupted input.
- CB: on the mean of f_E over the kept views, 64-channel latent; q(f_E | f_c) = N(f_c, I), so L_IB ties
  the very f_c that is subtracted to every kept view's (detached) f_E; Sigma = exp(log_var / 2).
  Its price here: on the synthetic audiojack it localises worse than the earlier CB, whose f_c went
  through a learned conv head q to L_IB (commit 387fbed; default command, CPU profile, seeds 42-44):
  pixel AUROC 87.4 +- 2.5 against 91.6 +- 0.3, AU-PRO 75.6 +- 2.2 against 78.8 +- 1.5, sample AUROC
  unchanged (88.4 against 88.9); the zipper's pixel AUROC moves by 0.1-0.3. The drop comes with the
  rewiring (commit 2968eb4, seeds 42 / 43: 87.4 / 89.3; its STN change was undone later and main drops
  as much), not with the isolation of dropped views (view_dropout=0, nothing dropped: 87.7 / 89.7, the
  earlier code 91.6 at seed 42). Without the CB (bottleneck=false): 89.3 / 89.5, about the level with
  it: the CB as the paper reads it neither helps nor hurts the audiojack's maps, the earlier untied f_c
  helped them by about 2 points. We keep the paper's reading and say what it costs.
- KL weight 0.01 (paper: none): without it Sigma collapses to ~1e-4; with it Sigma ends at 0.16 / 0.14
  at the same accuracy (synthetic zipper, CPU profile, seeds 42 / 7); 0.1 costs accuracy (89.3, seed 42).
- IVC: 4 x 8 x 8 voxel of width 256, 2 pre-norm blocks, 8 heads, FFN 4C with GELU; fixed sine encodings
  on normalised cell centres for voxel and tokens (`grid_sine_encoding`); 2x2 patchify; learnable view encoding.
- Masked views: a sample with every key masked gets a zero attention output (plain softmax gives NaN).
- View-wise dropout: each view dropped with p, one random view restored when none is left.
- Dropped and absent views run through nothing (`on_kept_rows`): no influence on outputs, losses,
  gradients or BatchNorm statistics, even if their pixels are NaN.
- STN: one learnable azimuth per view (a turntable), orthographic mean over depth; an azimuth +
  elevation variant scored lower on the synthetic zipper (sample AUROC 93.3 / 95.1 / 94.6 against
  95.0 / 96.6 / 96.6, seeds 42 / 7 / 3), so we keep the turntable.
- Decoder: one per view, one RD4AD DeBasicBlock per scale (RD4AD stacks more), no skip connections.
- L_Distill: the paper writes a squared distance; like DeSTSeg we take 1 - cos (L2-normalised features).
- Pseudo-anomalies: each view corrupted with probability 0.5 (DRAEM's rate; DeSTSeg corrupts every image).
- Inference: the student sees the test views; DeSTSeg's segmentation head is left out; the map is the
  mean over scales (DeSTSeg multiplies them); an absent view's map is zero.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mvad import (DeBasicBlock, FrozenEncoder, TrainingRecipe, check_field, check_recipe, check_weights,
                  cosine_distance_map, encoder_channels, gaussian_blur, is_count, rd4ad_init)


# ----------------------------------------------------------------------------- helpers


def grid_sine_encoding(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed sine-cosine encoding of the cells of a regular grid with any number of axes.

    Each axis gets an even share of the channels (the first axis also takes the remainder). Cell
    centres are scaled to [0, 2 pi), so grids of different sizes share one frame; frequencies
    10000^(-2i / width) as in the Transformer.

    Args:
        grid: the sizes (G_1, ..., G_j) of the axes, e.g. (Dv, Hv, Wv) or (h / p, w / p).
        dim: channels (even, at least 2j).
    Returns:
        (G_1 * ... * G_j, dim), cells in row-major order.
    """
    share = 2 * (dim // (2 * len(grid)))
    widths = [dim - share * (len(grid) - 1)] + [share] * (len(grid) - 1)
    axes = [(torch.arange(g) + 0.5) / g * 2 * math.pi for g in grid]
    coords = torch.meshgrid(*axes, indexing="ij")  # j x (G_1, ..., G_j)
    parts = []
    for coord, width in zip(coords, widths):
        freqs = 10000.0 ** (-torch.arange(width // 2) * 2 / width)  # (width / 2,)
        angles = coord.reshape(-1, 1) * freqs  # (G, width / 2)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)  # (G, dim)


def masked_view_mean(x: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the present views; absent views are replaced by zeros (torch.where, so that not
    even a NaN in them reaches the mean).

    Args:
        x: (B, V, ...) per-view tensors.
        view_mask: (B, V) bool, True = view present (at least one per sample).
    Returns:
        (B, ...).
    """
    keep = view_mask.view(*view_mask.shape, *[1] * (x.dim() - 2))  # (B, V, 1, ...)
    return x.where(keep, 0.0).sum(dim=1) / keep.sum(dim=1)


def on_kept_rows(net, x: torch.Tensor, keep: torch.Tensor):
    """`net` run on the rows of x that `keep` marks; exact zeros in the other rows.

    The other rows are never read: nothing in them (not even a NaN) reaches the output or a
    gradient, and a BatchNorm in training mode takes its statistics over the kept rows alone.

    Args:
        net: maps (N, ...) to a tensor (N, ...) or a list of such tensors.
        x: (*keep.shape, ...), e.g. (B, V, 3, H, W) with keep (B, V).
        keep: bool; N = keep.sum() rows (images) are computed (N = 0 is allowed).
    Returns:
        like net's output, each tensor (*keep.shape, ...).
    """
    out = net(x[keep])  # (N, ...) or a list of them

    def scatter(rows: torch.Tensor) -> torch.Tensor:
        full = rows.new_zeros(*keep.shape, *rows.shape[1:])  # (*keep.shape, ...)
        full[keep] = rows
        return full

    return [scatter(rows) for rows in out] if isinstance(out, (list, tuple)) else scatter(out)


def sample_view_mask(batch: int, views: int, p: float, device=None) -> torch.Tensor:
    """View-wise dropout: drop each view with probability p, keep at least one view per sample.

    Args:
        batch, views: B and V.
        p: drop probability of a view.
    Returns:
        (B, V) bool, True = view kept.
    """
    keep = torch.rand(batch, views, device=device) >= p  # (B, V)
    rescue = F.one_hot(torch.randint(views, (batch,), device=device), views).bool()  # (B, V)
    return keep | (rescue & ~keep.any(dim=1, keepdim=True))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Masked-view attention: softmax(M + Q K^T / sqrt(d)) V, M = -inf on the masked key columns.

    Args:
        q: (B, m, Tq, d) queries of m heads.
        k, v: (B, m, Tk, d) keys and values.
        key_mask: (B, Tk) bool, True = the key may be attended to; None = every key.
    Returns:
        (B, m, Tq, d). A sample with no key left gets a zero output (plain softmax would give NaN).
    """
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, m, Tq, Tk)
    if key_mask is None:
        return logits.softmax(dim=-1) @ v
    has_key = key_mask.any(dim=1)  # (B,)
    M = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
    M = M.masked_fill(~key_mask, float("-inf"))  # (B, Tk), the paper's mask M
    M = M.masked_fill(~has_key[:, None], 0.0)  # finite logits for a fully masked sample, zeroed below
    attn = (M[:, None, None, :] + logits).softmax(dim=-1)  # (B, m, Tq, Tk)
    return (attn @ v).where(has_key[:, None, None, None], 0.0)  # (B, m, Tq, d)


def rotate_and_project(voxel: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """STN re-projection: turn the voxel by each view's azimuth about its height axis, average over
    depth, resize to the f_s grid.

    In affine_grid's normalised coordinates (x: Wv, y: Hv pointing down, z: Dv), a view at theta
    samples the voxel at R(theta) (x, y, z): at theta = 0 it looks along the depth axis; theta grows
    counter-clockwise seen from above, like the azimuths of synthetic.CAMERA_POSES.

    Args:
        voxel: (B, C, Dv, Hv, Wv) the fused voxel P_n.
        theta: (V,) theta^(v), the azimuth of each view in radians.
        size: (h, w) the f_s grid.
    Returns:
        (B, V, C, h, w) f_p, the voxel as seen from each view.
    """
    B, C, Dv, Hv, Wv = voxel.shape
    V = theta.shape[0]
    cos, sin = theta.cos(), theta.sin()
    zero, one = torch.zeros_like(theta), torch.ones_like(theta)
    affine = torch.stack([torch.stack([cos, zero, -sin, zero], dim=-1),
                          torch.stack([zero, one, zero, zero], dim=-1),
                          torch.stack([sin, zero, cos, zero], dim=-1)], dim=1)  # (V, 3, 4), y fixed
    affine = affine.repeat(B, 1, 1)  # (B*V, 3, 4), sample-major
    volume = voxel.repeat_interleave(V, dim=0)  # (B*V, C, Dv, Hv, Wv)
    grid = F.affine_grid(affine, list(volume.shape), align_corners=False)  # (B*V, Dv, Hv, Wv, 3)
    rotated = F.grid_sample(volume, grid, align_corners=False)  # (B*V, C, Dv, Hv, Wv)
    plane = rotated.mean(dim=2)  # (B*V, C, Hv, Wv)
    plane = F.interpolate(plane, size=size, mode="bilinear", align_corners=False)  # (B*V, C, h, w)
    return plane.view(B, V, C, *size)


def distillation_loss(f_tea: list[torch.Tensor], f_stu: list[torch.Tensor],
                      view_mask: torch.Tensor) -> torch.Tensor:
    """L_Distill: sum over kept views and scales of the mean over positions of 1 - cos(f_tea, f_stu),
    in float32 (the features may be bf16 under autocast).

    Dropped views are replaced by zeros with torch.where (not multiplied by 0, which would let a
    NaN through).

    Args:
        f_tea, f_stu: 3 scales, each (B, V, C_s, h_s, w_s).
        view_mask: (B, V) bool, True = view kept.
    Returns:
        scalar, averaged over samples.
    """
    total = 0.0
    for tea, stu in zip(f_tea, f_stu):
        distance = 1 - F.cosine_similarity(tea.float(), stu.float(), dim=2)  # (B, V, h_s, w_s)
        total = total + distance.mean(dim=(2, 3)).where(view_mask, 0.0).sum(dim=1)  # (B,)
    return total.mean()


def kl_divergence(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, Sigma^2) || N(0, 1)) per latent element, averaged over all elements.

    Args:
        mu, log_var: (B, L, h, w), log_var = log Sigma^2.
    Returns:
        scalar.
    """
    return -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).mean()


def student_encoder() -> nn.Sequential:
    """The student's encoder: torchvision ResNet18 stages 1-3, random init. (N, 3, H, W) -> (N, C, h, w)."""
    net = torchvision.models.resnet18(weights=None)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)


def feed_forward(dim: int) -> nn.Sequential:
    """The transformer FFN: (B, T, dim) -> (B, T, dim), hidden width 4 dim."""
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


# ----------------------------------------------------------------------------- blocks


class Latent(NamedTuple):
    """What the CB's forward hands to its ib_loss: the latent sample c and N(mu, Sigma^2)'s
    parameters, each (B, L, h, w), and f_c = Decode(c) (B, C, h, w) itself, so that L_IB's gradient
    reaches the very tensor that is subtracted from f_E."""
    c: torch.Tensor
    mu: torch.Tensor
    log_var: torch.Tensor
    f_c: torch.Tensor


class ConsistencyBottleneck(nn.Module):
    """Consistency Bottleneck (CB): the view-common f_c of a sample and the view-specific f_s."""

    def __init__(self, dim: int, latent: int, kl_weight: float):
        super().__init__()
        self.kl_weight = kl_weight
        self.f_mu = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, latent, 1))
        self.f_sigma = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, latent, 1))
        self.decode = nn.Sequential(nn.Conv2d(latent, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1))  # c -> f_c

    def forward(self, f_E: torch.Tensor, view_mask: torch.Tensor):
        """Args:
            f_E: (B, V, C, h, w) the student encoder's features.
            view_mask: (B, V) bool, True = view kept.
        Returns:
            f_s (B, V, C, h, w), zeros for the dropped views, and the Latent (c, mu, log_var, f_c
            (B, C, h, w)) that the decoders' input and ib_loss take f_c from.
        """
        # STEP 1: what the kept views share: their mean (absent views excluded)
        pooled = masked_view_mean(f_E, view_mask)  # (B, C, h, w)
        # STEP 2: N(mu, Sigma^2) from the two sub-networks f_e^mu and f_e^Sigma
        mu, log_var = self.f_mu(pooled), self.f_sigma(pooled)  # (B, L, h, w)
        # STEP 3: c = mu + Sigma * eps in training (reparameterisation), mu at test time
        c = mu + (0.5 * log_var).exp() * torch.randn_like(mu) if self.training else mu  # (B, L, h, w)
        f_c = self.decode(c)  # (B, C, h, w)
        # STEP 4: f_s^(v) = f_E^(v) - f_c, one f_c per sample shared by its views
        f_s = (f_E - f_c[:, None]).where(view_mask[:, :, None, None, None], 0.0)  # (B, V, C, h, w)
        return f_s, Latent(c, mu, log_var, f_c)

    def ib_loss(self, f_E: torch.Tensor, view_mask: torch.Tensor,
                latent: Latent) -> tuple[torch.Tensor, torch.Tensor]:
        """L_IB = -log q(f_E | f_c) with q(f_E^(v) | f_c) = N(f_c, I): the mean squared distance of
        f_c to each kept view's (detached) f_E, + kl_weight * KL(N(mu, Sigma^2) || N(0, 1)), in float32.

        Args:
            f_E: (B, V, C, h, w); view_mask: (B, V) bool; latent: the Latent from forward.
        Returns:
            L_IB, a scalar averaged over kept views and samples, and the KL inside it (scalar, for the log).
        """
        error = (f_E.detach().float() - latent.f_c[:, None].float()).pow(2).mean(dim=(2, 3, 4))  # (B, V)
        reconstruction = masked_view_mean(error, view_mask).mean()
        kl = kl_divergence(latent.mu.float(), latent.log_var.float())
        return reconstruction + self.kl_weight * kl, kl


class MultiHeadAttention(nn.Module):
    """Multi-head attention around masked_attention: (B, Tq, C) queries x (B, Tk, C) context -> (B, Tq, C)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None):
        B, Tq, C = x.shape
        Tk, m = context.shape[1], self.heads
        q = self.q(x).view(B, Tq, m, C // m).transpose(1, 2)  # (B, m, Tq, d)
        k, v = self.kv(context).view(B, Tk, 2, m, C // m).permute(2, 0, 3, 1, 4)  # 2 x (B, m, Tk, d)
        out = masked_attention(q, k, v, key_mask)  # (B, m, Tq, d)
        return self.out(out.transpose(1, 2).reshape(B, Tq, C))  # (B, Tq, C)


class FusionBlock(nn.Module):
    """One IVC fusion block, pre-norm: self-attention + FFN over the voxel, then cross-attention from
    the voxel to the view tokens + FFN."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), MultiHeadAttention(dim, heads)
        self.norm2, self.ffn1 = nn.LayerNorm(dim), feed_forward(dim)
        self.norm3, self.norm_tokens = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, heads)
        self.norm4, self.ffn2 = nn.LayerNorm(dim), feed_forward(dim)

    def forward(self, voxel: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Args:
            voxel: (B, Dv*Hv*Wv, C) the voxel P_i as tokens.
            tokens: (B, V*T, C) the view-specific tokens of all views.
            token_mask: (B, V*T) bool, False on the tokens of dropped views.
        Returns:
            (B, Dv*Hv*Wv, C) P_{i+1}.
        """
        # STEP 1: P' = FFN(SelfAttn(P)): the voxel's cells exchange information
        x = self.norm1(voxel)
        voxel = voxel + self.self_attn(x, x)
        voxel = voxel + self.ffn1(self.norm2(voxel))
        # STEP 2: P_{i+1} = FFN(CrossAttn(P', f_s)): queries from the voxel, keys/values from the view
        # tokens, the dropped views' columns masked with -inf
        voxel = voxel + self.cross_attn(self.norm3(voxel), self.norm_tokens(tokens), token_mask)
        return voxel + self.ffn2(self.norm4(voxel))


class ImplicitVoxel(nn.Module):
    """Implicit Voxel Construction (IVC): a learnable, sample-independent voxel P_0 that the fusion
    blocks fill with the view-specific features f_s of the present views."""

    def __init__(self, dim: int, voxel_size: tuple[int, int, int], token_grid: tuple[int, int],
                 num_views: int, patch_size: int, blocks: int, heads: int):
        super().__init__()
        self.voxel_size = tuple(voxel_size)
        self.prototype = nn.Parameter(torch.randn(math.prod(voxel_size), dim) * 0.02)  # P_0
        self.register_buffer("voxel_pos", grid_sine_encoding(self.voxel_size, dim), persistent=False)
        self.patchify = nn.Conv2d(dim, dim, patch_size, stride=patch_size)
        self.register_buffer("token_pos", grid_sine_encoding(token_grid, dim), persistent=False)
        self.view_embed = nn.Parameter(torch.randn(num_views, dim) * 0.02)
        self.blocks = nn.ModuleList(FusionBlock(dim, heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)

    def forward(self, f_s: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        """Args:
            f_s: (B, V, C, h, w) view-specific features.
            view_mask: (B, V) bool, True = view kept.
        Returns:
            (B, C, Dv, Hv, Wv) the fused voxel P_n.
        """
        B, V, C, h, w = f_s.shape
        # STEP 1: patchify the kept views' f_s into a 1D token sequence + 2D positional + view encodings
        tokens = on_kept_rows(self.patchify, f_s, view_mask)  # (B, V, C, h/p, w/p), zeros if dropped
        tokens = tokens.flatten(3).transpose(2, 3) + self.token_pos  # (B, V, T, C)
        T = tokens.shape[2]
        tokens = (tokens + self.view_embed[:, None, :]).reshape(B, V * T, C)  # (B, V*T, C)
        token_mask = view_mask.repeat_interleave(T, dim=1)  # (B, V*T)
        # STEP 2: the prototype P_0 + 3D positional encoding, the same for every sample
        voxel = (self.prototype + self.voxel_pos).expand(B, -1, -1)  # (B, Dv*Hv*Wv, C)
        # STEP 3: the fusion blocks, P_0 -> P_n
        for block in self.blocks:
            voxel = block(voxel, tokens, token_mask)  # (B, Dv*Hv*Wv, C)
        voxel = self.norm(voxel)
        # STEP 4: reshape the token sequence into the 3D voxel
        return voxel.transpose(1, 2).reshape(B, C, *self.voxel_size)  # (B, C, Dv, Hv, Wv)


class STN(nn.Module):
    """The re-projection f_p^(v) = STN^(v)(P_n, theta^(v)) with one learnable azimuth per view."""

    def __init__(self, num_views: int):
        super().__init__()
        self.theta = nn.Parameter(torch.arange(num_views) * 2 * math.pi / num_views)  # (V,) evenly over 2 pi

    def forward(self, voxel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, C, Dv, Hv, Wv) -> (B, V, C, h, w) with (h, w) = size."""
        return rotate_and_project(voxel, self.theta, size)


class ViewDecoder(nn.Module):
    """Decoder^(v): a reversed ResNet (RD4AD's DeBasicBlock, one per scale) from f_p^(v) + f_c to
    the teacher's three scales; no skip connections."""

    def __init__(self, channels: tuple[int, int, int]):
        super().__init__()
        c1, c2, c3 = channels
        self.stage3 = DeBasicBlock(c3, c3, upsample=False)
        self.stage2 = DeBasicBlock(c3, c2, upsample=True)
        self.stage1 = DeBasicBlock(c2, c1, upsample=True)
        rd4ad_init(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, c3, h, w) -> [(N, c1, 4h, 4w), (N, c2, 2h, 2w), (N, c3, h, w)], the teacher's order."""
        f3 = self.stage3(x)  # (N, c3, h, w)
        f2 = self.stage2(f3)  # (N, c2, 2h, 2w)
        f1 = self.stage1(f2)  # (N, c1, 4h, 4w)
        return [f1, f2, f3]


# ----------------------------------------------------------------------------- config and model


@dataclass
class IDIFConfig(TrainingRecipe):
    image_size: int = 256  # input side H = W (paper: 256); a multiple of 16 * patch_size
    num_views: int = 5  # V, views per sample (Real-IAD: 5 cameras); one STN theta and decoder each
    weights: str = "auto"  # teacher ResNet18 weights: auto | imagenet | none | PATH (mvad.FrozenEncoder)
    bottleneck: bool = True  # the Consistency Bottleneck; False: f_c = 0, f_s = f_E, no L_IB (paper's ablation)
    fusion: bool = True  # the IVC and the STN; False: each decoder gets its own view's f_s (+ f_c) only
    fusion_residual: bool = False  # True: f_p = f_s + STN(P_n), the view keeps its own f_s (ours, a diagnostic;
    # the paper: f_p = STN(P_n), every view's detail passes through the voxel)
    latent_channels: int = 64  # L, channels of the bottleneck's latent c (paper is silent)
    voxel_size: tuple[int, int, int] = (4, 8, 8)  # (Dv, Hv, Wv) voxel cells of width 256 (paper is silent)
    patch_size: int = 2  # f_s patch side per token: 16x16 -> 8x8 tokens per view at 256 (paper is silent)
    fusion_blocks: int = 2  # IVC fusion blocks (paper is silent)
    heads: int = 8  # attention heads in the fusion blocks (paper is silent)
    view_dropout: float = 0.2  # probability of dropping a view in training, one always kept (paper: 0.2)
    alpha: float = 1.0  # weight of L_Distill (paper: 1)
    beta: float = 1.0  # weight of L_IB (paper: 1)
    kl_weight: float = 0.01  # weight of KL(N(mu, Sigma^2) || N(0, 1)) in L_IB; holds Sigma up (0: none, the paper's)
    blur_sigma: float = 4.0  # Gaussian smoothing of the anomaly maps, pixels (paper is silent; MVAD's official 4)
    # the optimiser (TrainingRecipe's fields), paper is silent: MVAD's official recipe with a lower rate for
    # the attention fusion
    base_lr: float = 0.002  # learning rate per 16 images: lr = base_lr * images per step / 16 (MVAD's: 0.005)

    def __post_init__(self):
        """Checks every field: a ValueError naming it, its value, its range and the paper's value."""
        check_field(self, "patch_size", is_count(self.patch_size), "at least 1", "the paper is silent, we use 2")
        stride = 16 * self.patch_size  # pixels per f_s token: stage 3 is H/16, then patches of patch_size
        check_field(self, "image_size", is_count(self.image_size) and self.image_size % stride == 0,
                    f"a multiple of {stride} for IDIF (16 x patch_size {self.patch_size}); use e.g. --image-size "
                    "128 or 256", "the paper uses 256")
        check_field(self, "num_views", is_count(self.num_views), "at least 1", "Real-IAD has 5")
        check_weights(self)
        check_field(self, "bottleneck", isinstance(self.bottleneck, bool), "true or false", "the paper: true")
        check_field(self, "fusion", isinstance(self.fusion, bool), "true or false", "the paper: true")
        check_field(self, "fusion_residual", isinstance(self.fusion_residual, bool), "true or false",
                    "the paper: false")
        check_field(self, "fusion_residual", self.fusion or not self.fusion_residual,
                    "false when fusion=false (there is no voxel to add)", "the paper: false")
        check_field(self, "latent_channels", is_count(self.latent_channels), "at least 1",
                    "the paper is silent, we use 64")
        check_field(self, "voxel_size", len(self.voxel_size) == 3 and all(map(is_count, self.voxel_size)),
                    "3 sizes (Dv, Hv, Wv), each at least 1", "the paper is silent, we use 4, 8, 8")
        check_field(self, "fusion_blocks", is_count(self.fusion_blocks), "at least 1 (fusion=false: none)",
                    "the paper is silent, we use 2")
        width = encoder_channels("resnet18")[-1]  # C, the teacher's stage 3 and the voxel's width
        check_field(self, "heads", is_count(self.heads) and width % self.heads == 0,
                    f"a divisor of the fusion width {width}", "the paper is silent, we use 8")
        check_field(self, "view_dropout", 0 <= self.view_dropout < 1, "in [0, 1)", "the paper uses 0.2")
        check_field(self, "alpha", self.alpha > 0, "positive", "the paper uses 1")
        check_field(self, "beta", self.beta > 0, "positive (bottleneck=false: no L_IB)", "the paper uses 1")
        check_field(self, "kl_weight", self.kl_weight >= 0, "at least 0 (0: no KL term)",
                    "the paper has none, we use 0.01")
        check_field(self, "blur_sigma", self.blur_sigma > 0, "positive", "the paper is silent, MVAD's official: 4")
        check_recipe(self, "the paper is silent, MVAD's official")


class IDIF(nn.Module):
    """IDIF: frozen teacher, denoising student with Consistency Bottleneck, Implicit Voxel, STN."""

    def __init__(self, cfg: IDIFConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // (16 * cfg.patch_size)
        self.teacher = FrozenEncoder("resnet18", cfg.weights)
        channels = self.teacher.channels  # (64, 128, 256); C = 256 is also the student's f_E width
        self.student = student_encoder()
        # a switched-off part is not built at all: no parameters, no computation
        self.bottleneck = (ConsistencyBottleneck(channels[-1], cfg.latent_channels, cfg.kl_weight)
                           if cfg.bottleneck else None)
        self.implicit_voxel = (ImplicitVoxel(channels[-1], cfg.voxel_size, (grid, grid), cfg.num_views,
                                             cfg.patch_size, cfg.fusion_blocks, cfg.heads)
                               if cfg.fusion else None)
        self.stn = STN(cfg.num_views) if cfg.fusion else None
        self.decoders = nn.ModuleList(ViewDecoder(channels) for _ in range(cfg.num_views))

    def check_inputs(self, images: torch.Tensor, view_mask: torch.Tensor | None) -> None:
        """Raises ValueError when images (B, V, 3, H, W) or view_mask (B, V) do not fit the model."""
        V, size = self.cfg.num_views, self.cfg.image_size
        if images.dim() != 5 or tuple(images.shape[1:]) != (V, 3, size, size):
            raise ValueError(f"IDIF got images of shape {tuple(images.shape)}; it was built for "
                             f"(B, {V}, 3, {size}, {size}) (IDIFConfig num_views={V}, image_size={size}); "
                            "resize the views or build the model with matching settings")
        if view_mask is None:
            return
        if view_mask.dtype != torch.bool or tuple(view_mask.shape) != tuple(images.shape[:2]):
            raise ValueError(f"view_mask must be a bool tensor of shape {tuple(images.shape[:2])} "
                             f"(True = view present), got {view_mask.dtype} {tuple(view_mask.shape)}")
        if not view_mask.any(dim=1).all():
            raise ValueError("view_mask marks every view of a sample absent; IDIF needs at least one "
                             "present view per sample")

    def decoder_input(self, f_E: torch.Tensor, view_mask: torch.Tensor):
        """The CB, the IVC and the STN, each skipped when switched off.

        Args:
            f_E: (B, V, C, h, w) the student encoder's features; view_mask: (B, V) bool.
        Returns:
            f_p + f_c (B, V, C, h, w), the decoders' input, and the CB's Latent (None without a CB).
        """
        f_s, latent = f_E, None  # without a CB: f_c = 0, f_s = f_E
        if self.bottleneck is not None:
            # IDIF STEP 3 of 6 (the paper's Intra-view Decoupling, Consistency Bottleneck): c = mu + Sigma * eps,
            # f_c = Decode(c), f_s = f_E - f_c
            f_s, latent = self.bottleneck(f_E, view_mask)  # (B, V, C, h, w), latent.f_c (B, C, h, w)
        f_p = f_s  # without fusion each view keeps its own f_s
        if self.implicit_voxel is not None:
            # IDIF STEP 4 of 6 (Inter-view Fusion, Implicit Voxel Construction): P_0 -> P_n with the kept views' f_s
            voxel = self.implicit_voxel(f_s, view_mask)  # (B, C, Dv, Hv, Wv)
            # IDIF STEP 5 of 6 (the STN re-projection): f_p^(v) = STN^(v)(P_n, theta^(v))
            f_p = self.stn(voxel, f_E.shape[-2:])  # (B, V, C, h, w)
            if self.cfg.fusion_residual:  # ours, not the paper's: the voxel adds to the view's own f_s
                f_p = f_s + f_p  # (B, V, C, h, w)
        return (f_p if latent is None else f_p + latent.f_c[:, None]), latent  # (B, V, C, h, w)

    def features(self, images: torch.Tensor, corrupted: torch.Tensor, view_mask: torch.Tensor):
        """The teacher's features of the clean views and the student's of the corrupted ones, both
        computed for the kept views only (zeros for the others).

        Args:
            images, corrupted: (B, V, 3, H, W) clean and pseudo-anomalous (or, at test time, the same) views.
            view_mask: (B, V) bool, True = view kept.
        Returns:
            f_tea, f_stu (3 scales, each (B, V, C_s, h_s, w_s)), f_E (B, V, C, h, w), the CB's
            Latent (None without a CB).
        """
        # IDIF STEP 1 of 6 (Mao et al., AAAI 2025, the framework overview): the frozen teacher sees every kept
        # clean view separately
        f_tea = on_kept_rows(self.teacher, images, view_mask)  # 3 x (B, V, C_s, h_s, w_s)
        # IDIF STEP 2 of 6 (same): the view-shared student encoder on the kept pseudo-anomalous views, f_E^(v)
        f_E = on_kept_rows(self.student, corrupted, view_mask)  # (B, V, C, h, w)
        # IDIF STEPS 3-5 of 6 (`decoder_input`): CB, IVC and STN: x = f_p + f_c
        x, latent = self.decoder_input(f_E, view_mask)  # (B, V, C, h, w)
        # IDIF STEP 6 of 6 (the view-specific decoders): f_stu^(v) = Decoder^(v)(f_p^(v) + f_c), on the
        # samples that keep view v
        per_view = [on_kept_rows(decoder, x[:, v], view_mask[:, v])
                    for v, decoder in enumerate(self.decoders)]  # V x 3 x (B, C_s, h_s, w_s)
        f_stu = [torch.stack(scale, dim=1) for scale in zip(*per_view)]  # 3 x (B, V, C_s, h_s, w_s)
        return f_tea, f_stu, f_E, latent

    def loss_parts(self, images: torch.Tensor, corrupted: torch.Tensor,
                   view_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The training loss and its parts.

        Args:
            images: (B, V, 3, H, W) clean views (the teacher's input).
            corrupted: (B, V, 3, H, W) pseudo-anomalous views (the student's input).
            view_mask: (B, V) bool, True = view present; None: view-wise dropout in training mode,
                every view in eval mode.
        Returns:
            {"loss": alpha L_Distill + beta L_IB, "distill": L_Distill} and, with a CB, "ib": L_IB,
            "kl": KL(N(mu, Sigma^2) || N(0, 1)) (logged even at kl_weight 0), "sigma": the mean of
            Sigma; all but "loss" detached.
        """
        self.check_inputs(images, view_mask)
        if corrupted.shape != images.shape:
            raise ValueError(f"corrupted views of shape {tuple(corrupted.shape)} must match images "
                             f"{tuple(images.shape)}")
        B, V = images.shape[:2]
        if view_mask is None:  # view-wise dropout in training mode, every view otherwise
            view_mask = (sample_view_mask(B, V, self.cfg.view_dropout, images.device) if self.training
                         else torch.ones(B, V, dtype=torch.bool, device=images.device))  # (B, V)
        f_tea, f_stu, f_E, latent = self.features(images, corrupted, view_mask)
        distill = distillation_loss(f_tea, f_stu, view_mask)
        if latent is None:
            return {"loss": self.cfg.alpha * distill, "distill": distill.detach()}
        ib, kl = self.bottleneck.ib_loss(f_E, view_mask, latent)
        loss = self.cfg.alpha * distill + self.cfg.beta * ib  # L = alpha L_Distill + beta L_IB
        return {"loss": loss, "distill": distill.detach(), "ib": ib.detach(), "kl": kl.detach(),
                "sigma": (0.5 * latent.log_var.float()).exp().mean().detach()}

    def forward(self, images: torch.Tensor, corrupted: torch.Tensor,
                view_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The training loss and its parts, loss_parts' dict (train.py logs every part)."""
        return self.loss_parts(images, corrupted, view_mask)

    @torch.no_grad()
    def anomaly_map(self, images: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-view anomaly maps at input resolution; call in eval mode.

        Args:
            images: (B, V, 3, H, W) test views, ImageNet-normalised.
            view_mask: (B, V) bool, True = view present; None = every view. An absent view is never
                read, has no influence on the present views' maps, and its own map is zero.
        Returns:
            (B, V, H, W) float32: mean over scales of the upsampled 1 - cos, smoothed with blur_sigma.
        """
        self.check_inputs(images, view_mask)
        B, V, _, H, W = images.shape
        if view_mask is None:
            view_mask = torch.ones(B, V, dtype=torch.bool, device=images.device)
        f_tea, f_stu, _, _ = self.features(images, images, view_mask)  # the student sees the test views
        maps = [cosine_distance_map(tea.flatten(0, 1).float(), stu.flatten(0, 1).float(), (H, W))
                for tea, stu in zip(f_tea, f_stu)]  # 3 x (B*V, H, W)
        maps = gaussian_blur(torch.stack(maps).mean(dim=0), self.cfg.blur_sigma)  # (B*V, H, W)
        return maps.view(B, V, H, W).where(view_mask[:, :, None, None], 0.0)  # (B, V, H, W)
