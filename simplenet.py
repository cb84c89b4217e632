"""SimpleNet: a discriminator of normal features against noisy ones, a baseline of the deck's tables, multi-view.

Paper: Z. Liu, Y. Zhou, Y. Xu, Z. Wang, "SimpleNet: A Simple Network for Image Anomaly Detection and
Localization", CVPR 2023, arXiv:2303.15140. Official code: DonaldRR/SimpleNet (simplenet.py, common.py,
main.py, run.sh; built on PatchCore's code). Where the paper and the code differ we follow the code and
say so at the line.

Normal patch features, adapted by one linear layer, are told apart from the same features plus Gaussian
noise (the synthetic anomalies); at test time a patch the discriminator finds unlike the normal ones is
anomalous.

    images (B, V, 3, H, W) -> every view on its own: frozen WideResNet50-2, stages 2 and 3
      -> PatchCore's locally aware patch features (patchcore.patch_features: 3x3 average, stage 3 upsampled
         to stage 2's grid, pooled to D = 1536): one feature per patch
      -> Feature Adaptor: one Linear D -> D: q
    training: Anomalous Feature Generator q- = q + eps, eps ~ N(0, 0.015^2) per channel
      -> Discriminator (Linear D -> 1024, BatchNorm, LeakyReLU 0.2, Linear 1024 -> 1) on q and q- together
      -> truncated L1 loss: mean max(0, th - D(q)) + mean max(0, th + D(q-)), th = 0.5 (`truncated_l1_loss`)
    anomaly map: -D(q) per patch, bilinear upsampling to the input, Gaussian sigma 4 (patchcore.score_map)
    image score = max of its map, sample score = max over its views (eval.py)

Shape legend (the same letters in every file): B samples, V views per sample, N images ((sample, view)
pairs, e.g. B*V), n items in a list (samples of a split, scores), C channels, H x W image, h x w feature
map, S scales, m heads, d = C / m channels per head, T tokens per attention unit. Here: h x w the stage-2
grid (H/8, W/8), D the feature width, X patches of a batch (N*h*w).

Run: `python train.py --method simplenet --category zipper`; tests: `python -m pytest tests/test_simplenet.py`.
A bad argument raises ValueError (Python's type for it; the command lines print it as one line).

Choices where the paper is silent, and where we differ from the official code:
- Multi-view (the paper is single-view): every view is scored on its own by one model shared by the
  cameras, as the deck's tables run SimpleNet on Real-IAD (image level per view, sample = max over views).
- Training length: the official code trains 40 x 4 epochs and after every 4 evaluates on the test split
  and keeps the best (by image AUROC); choosing on the test split is not done here: the last epoch is the model.
- Optimiser: one AdamW for both parts (`parameter_groups`; official: AdamW for the adaptor, Adam with an
  L2 weight decay of 1e-5 for the discriminator); rates per 16 images, base_lr 4e-4 being the official
  2e-4 for a batch of 8 images; no gradient clipping and no schedule, as the official run.sh.
- Image score: eval.py's max of the smoothed map (official: the max of the patch scores, before upsampling).
- Encoder: mvad.FrozenEncoder (ImageNet, else random-init calibrated on the training images).
Measured on the synthetic zipper with the random-init encoder (128 px, seed 0, the adaptor and the
discriminator trained on cached training features, 512-2048 patches a step): with the official noise
the discriminator never tells the noisy features from the clean ones (the loss stays at 1.0, p_true =
p_fake = 0, for 250 steps; the features vary 0.70 per channel, 47 times the noise); with noise 0.5 it
does (p_true 0.89, p_fake 0.95 after 150 steps), yet the defects do not score higher (sample AUROC
59). The noise it learns to reject is not what a defect does to these features: with ImageNet weights
(`--weights imagenet`) the paper's setting applies; without them SimpleNet here is near chance.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from mvad import ENCODERS, FrozenEncoder, TrainingRecipe, check_field, check_recipe, check_weights, is_count
from patchcore import patch_features, score_map

# ----------------------------------------------------------------------------- the loss, a pure function


def truncated_l1_loss(normal: torch.Tensor, anomalous: torch.Tensor, margin: float) -> torch.Tensor:
    """The paper's truncated L1 loss: normal features must score at least th, anomalous ones at most
    -th; scores beyond cost nothing (the official code's torch.clip(-true + th, 0), torch.clip(fake + th, 0)).

    Args:
        normal: (X,) discriminator scores D(q); anomalous: (X,) scores D(q-).
        margin: th (official 0.5, the same for both).
    Returns:
        scalar: mean max(0, th - D(q)) + mean max(0, th + D(q-)).
    """
    return (margin - normal).clamp_min(0).mean() + (margin + anomalous).clamp_min(0).mean()


# ----------------------------------------------------------------------------- config and model


@dataclass
class SimpleNetConfig(TrainingRecipe):
    backbone: str = "wide_resnet50_2"  # frozen encoder, stages 2 and 3; official: wideresnet50 (run.sh -b, -le)
    weights: str = "auto"  # encoder weights: auto | imagenet | none | PATH (mvad.FrozenEncoder); official: ImageNet
    image_size: int = 288  # input side H = W, a multiple of 16; official: 329 resized, 288 cropped (ADer: 256)
    patch_size: int = 3  # p, side of the neighbourhood averaged into each patch; official: 3 (--patchsize)
    width: int = 1536  # D, patch feature width; official: 1536 (--pretrain_embed_dimension, --target_embed_dimension)
    hidden: int = 1024  # the discriminator's hidden width; official: 1024 (--dsc_hidden, --dsc_layers 2)
    noise_std: float = 0.015  # sigma of the Gaussian noise that makes anomalous features; official: 0.015 (--noise_std)
    margin: float = 0.5  # th of the truncated L1 loss; official: 0.5 (--dsc_margin)
    blur_sigma: float = 4.0  # Gaussian smoothing of the anomaly maps in pixels; official: 4 (common.RescaleSegmentor)
    # the optimiser (TrainingRecipe's fields and two more): AdamW, betas (0.9, 0.999), the two parts at their
    # own rates (`parameter_groups`)
    base_lr: float = 4e-4  # the discriminator's rate per 16 images: lr = base_lr * images / 16; official: 2e-4 per 8
    adaptor_lr_scale: float = 0.5  # the adaptor's rate / the discriminator's; official: 1e-4 (0.1 x lr 1e-3) / 2e-4
    weight_decay: float = 1e-5  # the discriminator's weight decay, every parameter; official: 1e-5 (Adam, L2)
    adaptor_weight_decay: float = 0.01  # the adaptor's AdamW weight decay; official: 0.01 (AdamW's default)
    clip: float = math.inf  # gradient-norm clip, inf = none; official: none
    lr_decay_at: float = 1.0  # the rate drops x0.1 after this share of the epochs, 1 = never; official: constant

    def __post_init__(self):
        """Checks every field: a ValueError naming it, its value, its range and the official value."""
        check_field(self, "backbone", self.backbone in ENCODERS, f"one of {', '.join(ENCODERS)}",
                    "official: wide_resnet50_2")
        check_weights(self, "official")
        check_field(self, "image_size", is_count(self.image_size, 16) and self.image_size % 16 == 0,
                    "a multiple of 16 (stage 3 is H/16; --image-size)", "official: 288")
        check_field(self, "patch_size", is_count(self.patch_size) and self.patch_size % 2 == 1,
                    "odd and positive (centred on its patch)", "official: 3")
        check_field(self, "width", is_count(self.width), "at least 1", "official: 1536")
        check_field(self, "hidden", is_count(self.hidden), "at least 1", "official: 1024")
        check_field(self, "noise_std", self.noise_std > 0, "positive", "official: 0.015")
        check_field(self, "margin", self.margin >= 0, "at least 0", "official: 0.5")
        check_field(self, "blur_sigma", self.blur_sigma > 0, "positive", "official: 4")
        check_recipe(self, "official", ("4e-4 per 16 images (2e-4 per 8)", "1e-5", "none (inf)", "1 (constant)"))
        check_field(self, "adaptor_lr_scale", self.adaptor_lr_scale > 0, "positive", "official: 0.5")
        check_field(self, "adaptor_weight_decay", self.adaptor_weight_decay >= 0, "at least 0 (0: no decay)",
                    "official: 0.01")


class SimpleNet(nn.Module):
    """Frozen encoder -> patch features -> feature adaptor -> discriminator (normal vs. noisy features)."""

    def __init__(self, cfg: SimpleNetConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = FrozenEncoder(cfg.backbone, cfg.weights)
        D = cfg.width
        self.adaptor = nn.Linear(D, D)  # the paper's Feature Adaptor (official Projection, pre_proj 1)
        self.discriminator = nn.Sequential(nn.Linear(D, cfg.hidden), nn.BatchNorm1d(cfg.hidden), nn.LeakyReLU(0.2),
                                           nn.Linear(cfg.hidden, 1, bias=False))  # official Discriminator
        for m in self.modules():  # official init_weight: Xavier-normal Linear weights, default biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)

    def adapted(self, images: torch.Tensor) -> torch.Tensor:
        """(B, V, 3, H, W) ImageNet-normalised -> (N, h, w, D) adapted patch features q, every view on its own."""
        _, stage2, stage3 = self.encoder(images.flatten(0, 1))  # (N, C2, h, w), (N, C3, h/2, w/2)
        # STEP 1 (the paper's Feature Extractor, PatchCore's aggregation): one feature per patch
        features = patch_features(stage2.float(), stage3.float(), self.cfg.patch_size, self.cfg.width)  # (N, h, w, D)
        # STEP 2 (Feature Adaptor): one linear layer, trained, moves the features towards the target domain
        return self.adaptor(features)  # (N, h, w, D)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, V, 3, H, W) -> {"loss": the truncated L1 loss, "p_true" / "p_fake": the shares of normal
        / anomalous features already beyond the margin (the official logs' p_true, p_fake)}."""
        q = self.adapted(images).flatten(0, 2)  # (X, D)
        # STEP 3 (Anomalous Feature Generator): i.i.d. Gaussian noise on every channel of every feature
        noisy = q + self.cfg.noise_std * torch.randn_like(q)  # (X, D)
        # STEP 4 (Discriminator): both sets in one batch, as the official code (one BatchNorm over both)
        normal, anomalous = self.discriminator(torch.cat([q, noisy]))[:, 0].float().chunk(2)  # (X,), (X,) float32
        margin = self.cfg.margin
        return {"loss": truncated_l1_loss(normal, anomalous, margin),
                "p_true": (normal.detach() >= margin).float().mean(),
                "p_fake": (anomalous.detach() < -margin).float().mean()}

    def parameter_groups(self, lr: float) -> list[dict]:
        """The optimiser's groups (train.build_optimizer): the discriminator at `lr`, the adaptor at
        lr * adaptor_lr_scale, each with its own weight decay on every parameter."""
        return [{"params": list(self.discriminator.parameters()), "lr": lr, "weight_decay": self.cfg.weight_decay},
                {"params": list(self.adaptor.parameters()), "lr": lr * self.cfg.adaptor_lr_scale,
                 "weight_decay": self.cfg.adaptor_weight_decay}]

    @torch.no_grad()
    def anomaly_map(self, images: torch.Tensor, view_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Anomaly maps at input resolution (call model.eval() first: the discriminator's BatchNorm statistics).

        Args:
            images: (B, V, 3, H, W) ImageNet-normalised; view_mask: (B, V) bool or None (all present).
        Returns:
            (B, V, H, W) float32: -D(q) per patch, upsampled bilinearly, Gaussian sigma 4; zeros for missing
            views (each view is scored on its own).
        """
        B, V, _, H, W = images.shape
        q = self.adapted(images)  # (N, h, w, D)
        N, h, w, D = q.shape
        # STEP 5 (the paper's inference): the anomaly score of a patch is -D(q), upsampled and smoothed
        scores = -self.discriminator(q.reshape(-1, D)).float().view(N, h, w)  # (N, h, w), float32 under autocast
        maps = score_map(scores, (H, W), self.cfg.blur_sigma).view(B, V, H, W)  # (B, V, H, W)
        if view_mask is not None:
            maps = maps * view_mask[:, :, None, None]
        return maps
