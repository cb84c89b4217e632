"""The methods' configs check every field where they are built (their `__post_init__`, mvad.check_field):
a bad value is one ValueError line naming the field and its value; legal values far from the papers' pass.
The bad values below must cover every field: a field added to a config without one fails here."""
import dataclasses
import re

import pytest

from idif import IDIFConfig
from mvad import MVADConfig
from patchcore import PatchCoreConfig
from simplenet import SimpleNetConfig
from uniad import UniADConfig

# config -> field -> bad values, each tried alone on the defaults (256 px)
BAD = {
    MVADConfig: {
        "backbone": ["resnet50"],
        "weights": [""],
        "image_size": [100, 0],
        "n_win": [(0, 0, 0), (14, 9), (14, 9, 17)],  # 17 windows on the 16 x 16 map of scale 3
        "topk": [0, -1],
        "routing": ["learned", "Dot"],
        "blocks": [(1, 2), (1, -1, 4)],
        "num_heads": [7, 0],
        "mlp_ratio": [0],
        "dropout": [1.0, -0.1],
        "drop_path": [1.0],
        "loss_weight": [0.0],
        "blur_sigma": [0.0],
        "mvas": ["false"],
        "base_lr": [-0.1, 0.0],
        "weight_decay": [-1e-4],
        "clip": [0.0],
        "lr_decay_at": [0.0, 1.5],
    },
    IDIFConfig: {
        "image_size": [100, 0],
        "num_views": [0],
        "weights": [""],
        "bottleneck": ["false"],
        "fusion": [1],
        "fusion_residual": [1],
        "latent_channels": [0],
        "voxel_size": [(0, 8, 8), (4, 8)],
        "patch_size": [0],
        "fusion_blocks": [0],
        "heads": [7, 0],
        "view_dropout": [1.0, 1.5, -0.1],
        "alpha": [-1.0, 0.0],
        "beta": [0.0],
        "kl_weight": [-0.01],
        "blur_sigma": [0.0],
        "base_lr": [-0.1],
        "weight_decay": [-1.0],
        "clip": [0.0],
        "lr_decay_at": [1.5],
    },
    PatchCoreConfig: {
        "backbone": ["resnet50"],
        "weights": [""],
        "image_size": [72, 0],
        "patch_size": [2, 0, -1],
        "width": [0],
        "coreset_fraction": [0.0, 2.0],
        "projection_dim": [0],
        "per_camera": ["true"],
        "blur_sigma": [-1.0],
    },
    UniADConfig: {  # defaults: 224 px, a 14 x 14 grid
        "weights": [""],
        "image_size": [72, 0],
        "hidden_dim": [0, 255],
        "num_heads": [7, 0],
        "encoder_layers": [0],
        "decoder_layers": [0],
        "ffn_dim": [0],
        "dropout": [1.0, -0.1],
        "neighbor_size": [2, 0, 15],  # 15: the centre cell of 14 x 14 would see no key
        "jitter_scale": [-1.0],
        "jitter_prob": [1.5, -0.1],
        "blur_sigma": [-1.0],
        "base_lr": [0.0],
        "weight_decay": [-1e-4],
        "clip": [0.0],
        "lr_decay_at": [0.0, 1.5],
    },
    SimpleNetConfig: {
        "backbone": ["resnet50"],
        "weights": [""],
        "image_size": [100, 0],
        "patch_size": [2, 0],
        "width": [0],
        "hidden": [0],
        "noise_std": [0.0],
        "margin": [-0.5],
        "blur_sigma": [0.0],
        "base_lr": [-0.1],
        "adaptor_lr_scale": [0.0],
        "weight_decay": [-1e-5],
        "adaptor_weight_decay": [-0.01],
        "clip": [0.0],
        "lr_decay_at": [1.5],
    },
}
FIELDS = [(config, f.name) for config in BAD for f in dataclasses.fields(config)]


@pytest.mark.parametrize("config, name", FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FIELDS])
def test_every_field_rejects_a_bad_value_in_one_line_naming_it(config, name):
    assert BAD[config].get(name), f"{config.__name__}.{name} has no bad value in BAD: add one (and its check)"
    for value in BAD[config][name]:
        with pytest.raises(ValueError, match=rf"^{name} {re.escape(repr(value))} must be .+; .+") as error:
            config(**{name: value})
        assert "\n" not in str(error.value)


def test_the_bad_values_name_only_fields():
    for config, bad in BAD.items():
        assert set(bad) <= {f.name for f in dataclasses.fields(config)}, config.__name__


@pytest.mark.parametrize("config, values", [
    (MVADConfig, dict(image_size=32, n_win=(8, 4, 2), topk=1, blocks=(0, 0, 0), num_heads=64, dropout=0.0,
                      drop_path=0.0, weight_decay=0.0, lr_decay_at=1.0)),
    (MVADConfig, dict(backbone="wide_resnet50_2", num_heads=256, n_win=(64, 32, 16), topk=10_000)),
    (IDIFConfig, dict(image_size=48, patch_size=3, num_views=1, heads=256, view_dropout=0.0, kl_weight=0.0,
                      voxel_size=(1, 1, 1), lr_decay_at=1.0)),
    (PatchCoreConfig, dict(image_size=16, patch_size=1, width=1, projection_dim=1, coreset_fraction=1.0)),
    (UniADConfig, dict(image_size=64, hidden_dim=2, num_heads=2, neighbor_size=3, jitter_scale=0.0, jitter_prob=0.0,
                       blur_sigma=0.0, dropout=0.0, lr_decay_at=1.0)),
    (SimpleNetConfig, dict(image_size=16, patch_size=1, width=1, hidden=1, margin=0.0, weight_decay=0.0,
                           adaptor_weight_decay=0.0, lr_decay_at=1.0)),
])
def test_legal_values_far_from_the_papers_pass(config, values):
    config(**values)  # raises nothing: the smallest sizes, zero where it is a switch, a top-k beyond the windows
