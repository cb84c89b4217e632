"""UniAD: one reconstruction model for many classes, a baseline of the deck's tables, on multi-view data.

Paper: Z. You, L. Cui, Y. Shen, K. Yang, X. Lu, Y. Zheng, X. Le, "A Unified Model for Multi-class Anomaly
Detection", NeurIPS 2022, arXiv:2206.03687. Official code: zhiyuanyou/UniAD (models/reconstructions/uniad.py,
models/necks/mfcn.py, models/backbones/__init__.py, experiments/MVTec-AD/config.yaml). Where the paper and
the code differ we follow the code and say so at the line.

The model reconstructs the frozen features of a view; a defect is reconstructed as normal, so the
reconstruction error is high there. Three parts keep it from copying its input (the paper's "identical
shortcut"): each token's own neighbourhood is masked out of every attention, each decoder layer asks with
its own learned query, and the training features are jittered.

    images (B, V, 3, H, W) -> every view on its own: frozen EfficientNet-B4, stages at strides 2, 4, 8, 16
      -> each resized to the stride-16 grid and concatenated: C = 24 + 32 + 56 + 160 = 272 (`align_stages`)
      -> tokens (N, T, C), one per grid cell; in training Feature Jittering adds noise (`feature_jitter`)
      -> Linear C -> d, plus a learned positional embedding
      -> Neighbor Masked Encoder: 4 layers, attention hides each token's k x k neighbourhood (`neighbor_mask`)
      -> Layer-wise Query Decoder: 4 layers, each with its own learned query per grid cell
      -> Linear d -> C: the reconstruction of the clean tokens
    loss: MSE(reconstruction, features)
    anomaly map: per grid cell the L2 norm of the reconstruction error, bilinear upsampling to the input
      (`reconstruction_error_map`), Gaussian sigma 4 (see below)
    image score = max of its map, sample score = max over its views (eval.py)

Shape legend (the same letters in every file): B samples, V views per sample, N images ((sample, view)
pairs, e.g. B*V), n items in a list (samples of a split, scores), C channels, H x W image, h x w feature
map, S scales, m heads, d = C / m channels per head, T tokens per attention unit. Here: C = 272 the aligned
features, h x w the stride-16 grid (H/16, W/16), T = h*w tokens (row-major, one per grid cell, one image
per attention unit), D the transformer's width (official 256), k the side of a masked neighbourhood.

Run: `python train.py --method uniad --category zipper`; tests: `python -m pytest tests/test_uniad.py`.
A bad argument raises ValueError (Python's type for it; the command lines print it as one line).

Choices where the paper is silent, and where we differ from the official code:
- Multi-view (the paper is single-view): every view is reconstructed on its own by one model shared by
  the cameras, as the deck's tables run UniAD on Real-IAD (image level per view, sample = max over views).
- Encoder: torchvision's EfficientNet-B4 (IMAGENET1K_V1) for the official lukemelas EfficientNet-B4
  (efficientnet-b4-6ed6700e.pth); torchvision pads symmetrically where that one pads like TensorFlow.
  Offline, mvad.FrozenEncoder's random-init encoder calibrated on the training images.
- Map smoothing: the official code leaves the map unsmoothed and scores an image by the max of its map
  averaged over 16 x 16 pixels (config.yaml, evaluator `avgpool_size`); eval.py takes the max of the map
  for every method, so the map is smoothed with Gaussian sigma 4 (a 16-pixel box has standard deviation
  4.6 pixels) and `--set blur_sigma=0` gives the official map.
- Optimiser: train.py's AdamW decays the weight matrices only (official: every parameter); its rate per
  16 images, base_lr 2e-4, is the official 1e-4 for a batch of 8 images (ADer's rule lr = 1e-4 x batch / 8).
- The jitter's coin is drawn with torch (seeded by train.py), once per batch as the official random.uniform.
- The neighbourhood is k x k grid cells whatever the grid: at 128 px (grid 8 x 8) the official k = 7
  leaves a centre token 15 keys of 64 (at 224 px, 147 of 196).
Measured on the synthetic zipper (CPU profile: 128 px, 15 epochs, random-init encoder, seed 42, one
thread): sample / pixel AUROC 62.6 / 74.8; k = 3: 61.8 / 74.7; a 10x rate: 62.7 / 75.4; the official
unsmoothed map (blur_sigma 0, same checkpoint): 60.7 / 75.1. The 150 steps leave the reconstruction
error on the training features at 3.55, above the 2.93 that the mean feature of each view and cell
would give (the official schedule is 1000 epochs): the CPU profile is far too short for UniAD.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mvad import FrozenEncoder, TrainingRecipe, check_field, check_recipe, check_weights, gaussian_blur, is_count

GRID_STRIDE = 16  # the grid every stage is resized to: stride 16 (official: MFCN outstrides [16], config.yaml)
# torchvision EfficientNet-B4 `features` blocks whose outputs UniAD takes, strides 2, 4, 8, 16 (official:
# outlayers [1, 2, 3, 4] of models/backbones/__init__.py's efficientnet_b4, its blocks 1, 5, 9, 21)
STAGE_TAPS = (1, 2, 3, 5)
STAGE_CHANNELS = (24, 32, 56, 160)  # their widths (official: backbone_info planes [24, 32, 56, 160])


# ----------------------------------------------------------------------------- pure functions


def align_stages(stages: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """The official neck (MFCN, models/necks/mfcn.py): every stage resized bilinearly to one grid with
    align_corners=True (its UpsamplingBilinear2d, which also shrinks the finer stages) and concatenated.

    Args:
        stages: S tensors (N, C_s, h_s, w_s).
        size: (h, w), the grid.
    Returns:
        (N, C, h, w), C = the sum of the C_s.
    """
    return torch.cat([F.interpolate(s, size=size, mode="bilinear", align_corners=True) for s in stages], dim=1)


def neighbor_mask(h: int, w: int, k: int) -> torch.Tensor:
    """Neighbor Masked Attention's mask: the token of cell (y, x) may attend to no token of the k x k
    cells centred on it (itself included), clipped at the borders (the official `generate_mask`).

    Args:
        h, w: the grid; k: the neighbourhood's side, odd.
    Returns:
        (T, T) bool, T = h*w tokens row-major; True = hidden (nn.MultiheadAttention's convention).
    """
    y, x = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)  # (T,) each: the cells, row-major
    r = k // 2
    return ((y[:, None] - y[None, :]).abs() <= r) & ((x[:, None] - x[None, :]).abs() <= r)  # (T, T)


def feature_jitter(tokens: torch.Tensor, scale: float, prob: float) -> torch.Tensor:
    """Feature Jittering: with probability `prob` (one draw for the batch, as the official add_jitter),
    every token f gets Gaussian noise of standard deviation scale * ||f|| / C, ||f|| its L2 norm.

    Args:
        tokens: (N, T, C).
        scale: alpha (official 20); prob: p (official 1).
    Returns:
        (N, T, C).
    """
    if torch.rand(()).item() > prob:  # the official code jitters when a uniform draw is <= prob
        return tokens
    C = tokens.shape[-1]
    norms = tokens.norm(dim=-1, keepdim=True) / C  # (N, T, 1)
    return tokens + torch.randn_like(tokens) * norms * scale


def reconstruction_error_map(features: torch.Tensor, reconstruction: torch.Tensor, size) -> torch.Tensor:
    """UniAD's anomaly map: per grid cell the L2 norm over channels of the reconstruction error, upsampled
    bilinearly with align_corners=True (the official UpsamplingBilinear2d of `pred`).

    Args:
        features, reconstruction: (N, C, h, w).
        size: (H, W).
    Returns:
        (N, H, W).
    """
    error = (reconstruction - features).square().sum(dim=1).sqrt()  # (N, h, w)
    return F.interpolate(error[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]  # (N, H, W)


# ----------------------------------------------------------------------------- encoder and transformer


class FrozenEfficientNet(FrozenEncoder):
    """EfficientNet-B4's stem and blocks up to stride 16, frozen and always in eval mode, with
    mvad.FrozenEncoder's weights handling (ImageNet from the torch hub cache, else a random-init network
    calibrated on the training images, said in one line) and calibration."""

    networks = {"efficientnet_b4": (torchvision.models.efficientnet_b4,
                                    torchvision.models.EfficientNet_B4_Weights.IMAGENET1K_V1)}
    unused = ("features.6.", "features.7.", "features.8.", "classifier.")  # stride 32 and the head

    def take_stages(self, net: nn.Module, arch: str) -> None:
        """Keeps `features` up to the last tapped block (arch: efficientnet_b4, the one network here)."""
        self.features = net.features[:STAGE_TAPS[-1] + 1]
        self.channels = STAGE_CHANNELS

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (N, 3, H, W) ImageNet-normalised -> [(N, 24, H/2, W/2), (N, 32, H/4, W/4), (N, 56, H/8, W/8),
        (N, 160, H/16, W/16)]."""
        stages = []
        for i, block in enumerate(self.features):
            x = block(x)  # (N, C_i, H/s_i, W/s_i)
            if i in STAGE_TAPS:
                stages.append(x)
        return stages


def feed_forward(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """The layers' FFN with its residual dropout, as the official layers: Linear, ReLU, Dropout, Linear, Dropout."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


class NeighborMaskedEncoderLayer(nn.Module):
    """One layer of the Neighbor Masked Encoder, post-norm as the official TransformerEncoderLayer
    (normalize_before False):  x = LN(x + Dropout(Attn(q = k = x + pos, v = x, mask)));  x = LN(x + FFN(x))."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = feed_forward(dim, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (N, T, D); pos: (T, D); mask: (T, T) bool, True = hidden. Returns (N, T, D)."""
        q = x + pos  # (N, T, D)
        x = self.norm1(x + self.drop(self.attn(q, q, x, attn_mask=mask, need_weights=False)[0]))  # (N, T, D)
        return self.norm2(x + self.ffn(x))  # (N, T, D)


class LayerWiseQueryDecoderLayer(nn.Module):
    """One layer of the Layer-wise Query Decoder, as the official TransformerDecoderLayer.forward_post: the
    layer's own learned query (one per grid cell) attends to the encoder's output, then to the previous
    decoder layer's output (the encoder's for the first), both neighbour-masked; post-norm:
        q = LN(query + Dropout(Attn(q = query + pos, k = memory + pos, v = memory, mask)))
        q = LN(q + Dropout(Attn(q = q + pos, k = previous + pos, v = previous, mask)));  q = LN(q + FFN(q))"""

    def __init__(self, dim: int, tokens: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.query = nn.Parameter(torch.randn(tokens, dim))  # official: nn.Embedding, its N(0, 1) init
        self.attn_memory = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.drop1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.attn_previous = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.drop2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = feed_forward(dim, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, previous: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """previous, memory: (N, T, D); pos: (T, D); mask: (T, T) bool. Returns (N, T, D)."""
        query = self.query.expand(memory.shape[0], -1, -1)  # (N, T, D)
        attended = self.attn_memory(query + pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        q = self.norm1(query + self.drop1(attended))  # (N, T, D)
        attended = self.attn_previous(q + pos, previous + pos, previous, attn_mask=mask, need_weights=False)[0]
        q = self.norm2(q + self.drop2(attended))  # (N, T, D)
        return self.norm3(q + self.ffn(q))  # (N, T, D)


# ----------------------------------------------------------------------------- config and model


@dataclass
class UniADConfig(TrainingRecipe):
    weights: str = "auto"  # EfficientNet-B4's: auto | imagenet | none | PATH (mvad.FrozenEncoder); official: ImageNet
    image_size: int = 224  # input side H = W, a multiple of 16; official: 224 (input_size; ADer's Real-IAD: 256)
    hidden_dim: int = 256  # D, the transformer's width; official: 256 (config.yaml hidden_dim)
    num_heads: int = 8  # attention heads, a divisor of hidden_dim; official: 8 (nhead)
    encoder_layers: int = 4  # Neighbor Masked Encoder layers; official: 4 (num_encoder_layers)
    decoder_layers: int = 4  # Layer-wise Query Decoder layers; official: 4 (num_decoder_layers)
    ffn_dim: int = 1024  # hidden width of the layers' FFN; official: 1024 (dim_feedforward)
    dropout: float = 0.1  # dropout of the attention weights, the FFN and the residual branches; official: 0.1
    neighbor_size: int = 7  # k, side of the masked neighbourhood in grid cells, odd; official: 7 (neighbor_size)
    jitter_scale: float = 20.0  # alpha: noise std = alpha * ||f|| / C; official: 20 (feature_jitter scale)
    jitter_prob: float = 1.0  # p, probability that a training batch is jittered; official: 1 (feature_jitter prob)
    blur_sigma: float = 4.0  # Gaussian smoothing of the maps in pixels, 0 = none; official: none (module docstring)
    # the optimiser (TrainingRecipe's fields; official: config.yaml trainer, AdamW betas (0.9, 0.999))
    base_lr: float = 2e-4  # rate per 16 images: lr = base_lr * images per step / 16; official: 1e-4 for 8 images
    weight_decay: float = 1e-4  # AdamW weight decay, on weights only (official: on every parameter); official: 1e-4
    clip: float = 0.1  # gradient-norm clip; official: 0.1 (clip_max_norm)
    lr_decay_at: float = 0.8  # the rate drops x0.1 after this share of the epochs; official: StepLR at 800 of 1000

    def __post_init__(self):
        """Checks every field: a ValueError naming it, its value, its range and the official value."""
        check_weights(self, "official")
        check_field(self, "image_size", is_count(self.image_size, GRID_STRIDE) and self.image_size % GRID_STRIDE == 0,
                    f"a multiple of {GRID_STRIDE} (the grid is H/{GRID_STRIDE}; --image-size)", "official: 224")
        check_field(self, "hidden_dim", is_count(self.hidden_dim) and self.hidden_dim % 2 == 0,
                    "even and positive (half for rows, half for columns of the positions)", "official: 256")
        check_field(self, "num_heads", is_count(self.num_heads) and self.hidden_dim % self.num_heads == 0,
                    f"a divisor of hidden_dim {self.hidden_dim}", "official: 8")
        check_field(self, "encoder_layers", is_count(self.encoder_layers), "at least 1", "official: 4")
        check_field(self, "decoder_layers", is_count(self.decoder_layers), "at least 1", "official: 4")
        check_field(self, "ffn_dim", is_count(self.ffn_dim), "at least 1", "official: 1024")
        check_field(self, "dropout", 0 <= self.dropout < 1, "in [0, 1)", "official: 0.1")
        half = (self.image_size // GRID_STRIDE) // 2  # a centre token keeps a key while k // 2 < half
        check_field(self, "neighbor_size", is_count(self.neighbor_size) and self.neighbor_size % 2 == 1
                    and self.neighbor_size // 2 < half, f"odd and at most {2 * half - 1} at image_size "
                    f"{self.image_size} (a wider neighbourhood hides every key of the centre token)", "official: 7")
        check_field(self, "jitter_scale", self.jitter_scale >= 0, "at least 0 (0: no jitter)", "official: 20")
        check_field(self, "jitter_prob", 0 <= self.jitter_prob <= 1, "in [0, 1] (0: no jitter)", "official: 1")
        check_field(self, "blur_sigma", self.blur_sigma >= 0, "at least 0 (0: no smoothing)", "official: none")
        check_recipe(self, "official", ("2e-4 per 16 images (1e-4 per 8)", "1e-4", "0.1", "0.8"))


class UniAD(nn.Module):
    """Frozen EfficientNet-B4 -> aligned stages -> neighbour-masked transformer encoder-decoder with
    layer-wise queries -> reconstruction of the features; the map is the reconstruction error."""

    def __init__(self, cfg: UniADConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = FrozenEfficientNet("efficientnet_b4", cfg.weights)
        C, D = sum(self.backbone.channels), cfg.hidden_dim  # 272, 256
        h = w = cfg.image_size // GRID_STRIDE  # the grid
        self.input_proj = nn.Linear(C, D)
        # learned positional embedding, half the channels per row and half per column (official
        # PositionEmbeddingLearned, uniform(0, 1) init)
        self.row_embed = nn.Parameter(torch.rand(h, D // 2))
        self.col_embed = nn.Parameter(torch.rand(w, D // 2))
        self.encoder_layers = nn.ModuleList(NeighborMaskedEncoderLayer(D, cfg.num_heads, cfg.ffn_dim, cfg.dropout)
                                            for _ in range(cfg.encoder_layers))
        self.decoder_layers = nn.ModuleList(
            LayerWiseQueryDecoderLayer(D, h * w, cfg.num_heads, cfg.ffn_dim, cfg.dropout)
            for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(D)
        self.output_proj = nn.Linear(D, C)
        self.register_buffer("mask", neighbor_mask(h, w, cfg.neighbor_size), persistent=False)  # (T, T)
        for m in self.modules():  # official initializer xavier_uniform: every nn.Linear, biases zero
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, V, 3, H, W) ImageNet-normalised, H = W = image_size -> (N, C, h, w) the frozen stages on the
        stride-16 grid, every view on its own (N = B*V, sample-major)."""
        size = self.cfg.image_size
        if images.dim() != 5 or images.shape[2] != 3 or images.shape[-2:] != (size, size):
            raise ValueError(f"UniAD expects images (B, V, 3, {size}, {size}), got {tuple(images.shape)}; "
                             "set --image-size to the data's size")
        stages = self.backbone(images.flatten(0, 1))  # 4 x (N, C_s, H/s, W/s)
        grid = (size // GRID_STRIDE, size // GRID_STRIDE)
        return align_stages([s.float() for s in stages], grid)  # (N, C, h, w)

    def position(self) -> torch.Tensor:
        """(T, D) the learned embedding of every grid cell, row-major: [its column's, its row's] (official order)."""
        h, w = self.row_embed.shape[0], self.col_embed.shape[0]
        columns = self.col_embed[None].expand(h, -1, -1)  # (h, w, D/2)
        rows = self.row_embed[:, None].expand(-1, w, -1)  # (h, w, D/2)
        return torch.cat([columns, rows], dim=-1).flatten(0, 1)  # (T, D)

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, C, h, w): the features rebuilt by the encoder-decoder; jittered in training only."""
        N, C, h, w = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # (N, T, C)
        # STEP 1 (the paper's Feature Jittering): noise on the input tokens in training, the target stays clean
        if self.training:
            tokens = feature_jitter(tokens, self.cfg.jitter_scale, self.cfg.jitter_prob)  # (N, T, C)
        x, pos = self.input_proj(tokens), self.position()  # (N, T, D), (T, D)
        # STEP 2 (Neighbor Masked Encoder): no token sees its own k x k neighbourhood
        for layer in self.encoder_layers:
            x = layer(x, pos, self.mask)  # (N, T, D)
        # STEP 3 (Layer-wise Query Decoder): a learned query per layer and cell, fed the encoder's output
        out = x
        for layer in self.decoder_layers:
            out = layer(out, x, pos, self.mask)  # (N, T, D)
        out = self.output_proj(self.decoder_norm(out))  # (N, T, C)
        return out.transpose(1, 2).reshape(N, C, h, w)  # (N, C, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, V, 3, H, W) -> scalar training loss: MSE between the reconstruction and the features
        (official FeatureMSELoss, weight 1)."""
        features = self.features(images)  # (N, C, h, w)
        return F.mse_loss(self.reconstruct(features).float(), features)  # in float32 (bf16 under autocast)

    @torch.no_grad()
    def anomaly_map(self, images: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Anomaly maps at input resolution (call model.eval() first: no jitter, no dropout).

        Args:
            images: (B, V, 3, H, W) ImageNet-normalised; view_mask: (B, V) bool or None (all present).
        Returns:
            (B, V, H, W) float32: the upsampled reconstruction error, Gaussian-smoothed with blur_sigma;
            zeros for missing views (each view is scored on its own).
        """
        B, V, _, H, W = images.shape
        features = self.features(images)  # (N, C, h, w)
        # STEP 4 (the paper's anomaly localization): the reconstruction error per cell, upsampled
        maps = reconstruction_error_map(features, self.reconstruct(features).float(), (H, W))  # (N, H, W)
        if self.cfg.blur_sigma > 0:
            maps = gaussian_blur(maps, self.cfg.blur_sigma)
        maps = maps.view(B, V, H, W)  # (B, V, H, W)
        if view_mask is not None:
            maps = maps * view_mask[:, :, None, None]
        return maps
