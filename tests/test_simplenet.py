"""SimpleNet: the truncated L1 loss by hand, noisy features scored above clean ones after training, the
adaptor and the discriminator as the only trainable parts (at their own rates), parameter counts, map
shapes and composition, one-line config errors. CPU, tiny configs (ResNet18 at 64 px: an 8 x 8 patch
grid, D = 64). No pasted-defect test as the other methods have: on random-init features a few steps of
SimpleNet do not score the pasted square above the normal views (the noise it learns to reject is not
what the square does to the features; README, "The deck's table")."""
import pytest
import torch
from torch.testing import assert_close

import train
from runtime import place
from patchcore import score_map
from simplenet import SimpleNet, SimpleNetConfig, truncated_l1_loss

SIZE = 64
TINY = dict(backbone="resnet18", weights="none", image_size=SIZE, width=64, hidden=32)


def tiny_model(**overrides) -> SimpleNet:
    torch.manual_seed(0)
    return place(SimpleNet(SimpleNetConfig(**{**TINY, **overrides})), "cpu")


def test_truncated_l1_loss_by_hand():
    normal, anomalous = torch.tensor([0.9, 0.2, -1.0, 0.5]), torch.tensor([-0.7, -0.4, 0.3, 2.0])
    # max(0, 0.5 - D(q)): 0, 0.3, 1.5, 0; max(0, 0.5 + D(q-)): 0, 0.1, 0.8, 2.5
    assert truncated_l1_loss(normal, anomalous, 0.5).item() == pytest.approx((0.3 + 1.5) / 4 + (0.1 + 0.8 + 2.5) / 4)
    assert truncated_l1_loss(normal, anomalous, 0.0).item() == pytest.approx(1.0 / 4 + 2.3 / 4)
    beyond = truncated_l1_loss(torch.tensor([0.6, 3.0]), torch.tensor([-0.5, -9.0]), 0.5)
    assert beyond.item() == 0.0  # scores beyond the margins cost nothing


@pytest.fixture(scope="module")
def trained(zipper):
    """(the tiny SimpleNet before training, after 20 of train.py's steps at rate 1e-2 on the 4 training
    samples, the optimizer), both after train.py's calibration. Noise std 0.3: the 64 tiny random-init
    features of a patch are too few for the official 0.015 to be told apart in a few steps."""
    train_split, _ = zipper
    models = []
    for steps in (0, 20):
        model = tiny_model(noise_std=0.3)
        model.encoder.calibrate([train_split.flatten(0, 1)])
        optimizer = train.build_optimizer(model, model.cfg, 1e-2)
        model.train()
        for _ in range(steps):
            train.train_step(model, optimizer, {"images": train_split}, "simplenet", torch.device("cpu"),
                             model.cfg.clip)
        models.append(model.eval())
    return models[0], models[1], optimizer


def test_noisy_features_are_scored_above_clean_ones_after_a_few_steps(zipper, trained):
    """The anomaly score -D of the adapted training features, clean and with the training noise."""
    train_split, _ = zipper
    gaps = []
    for model in trained[:2]:
        with torch.no_grad():
            q = model.adapted(train_split).flatten(0, 2)  # (X, D)
            torch.manual_seed(1)
            noisy = q + model.cfg.noise_std * torch.randn_like(q)
            gaps.append((-model.discriminator(noisy)).mean() - (-model.discriminator(q)).mean())
    assert gaps[1] > 0.2 and gaps[1] > gaps[0] + 0.2, gaps  # a clear preference after training


def test_only_the_adaptor_and_the_discriminator_train(zipper, trained):
    untrained, model, optimizer = trained
    names = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert names == {"adaptor", "discriminator"}
    for (name, a), b in zip(untrained.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b) == name.startswith("encoder."), name  # the encoder, statistics included
    discriminator, adaptor = optimizer.param_groups  # their own rates and decays (parameter_groups)
    assert (discriminator["lr"], discriminator["weight_decay"]) == (1e-2, 1e-5)
    assert (adaptor["lr"], adaptor["weight_decay"]) == (5e-3, 0.01)
    assert [id(p) for p in discriminator["params"]] == [id(p) for p in model.discriminator.parameters()]
    assert [id(p) for p in adaptor["params"]] == [id(model.adaptor.weight), id(model.adaptor.bias)]


def test_parameters_map_shapes_and_composition():
    model = tiny_model(width=1536, hidden=1024).eval()  # the official widths
    adaptor, discriminator = 1536 * 1536 + 1536, 1536 * 1024 + 1024 + 2 * 1024 + 1024
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adaptor + discriminator == 3_937_792
    model = tiny_model().eval()
    images = torch.randn(2, 3, 3, SIZE, SIZE)
    q = model.adapted(images)
    assert q.shape == (6, 8, 8, 64)
    maps = model.anomaly_map(images)
    scores = -model.discriminator(q.reshape(-1, 64)).view(6, 8, 8)
    assert_close(maps, score_map(scores, (SIZE, SIZE), 4.0).view(2, 3, SIZE, SIZE))
    masked = model.anomaly_map(images, torch.tensor([[True, True, False], [True, True, True]]))
    assert masked[0, 2].abs().max() == 0 and torch.equal(masked[1], maps[1])


@pytest.mark.parametrize("field, value, message", [
    ("backbone", "vgg16", "backbone 'vgg16' must be one of resnet18, resnet34, wide_resnet50_2"),
    ("image_size", 40, "image_size 40 must be a multiple of 16"),
    ("patch_size", 2, "patch_size 2 must be odd and positive"),
    ("noise_std", 0.0, "noise_std 0.0 must be positive; official: 0.015"),
    ("adaptor_lr_scale", -1.0, "adaptor_lr_scale -1.0 must be positive"),
    ("lr_decay_at", 1.5, r"lr_decay_at 1.5 must be in \(0, 1\]"),
])
def test_bad_config_values_are_one_line_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message) as error:
        SimpleNetConfig(**{**TINY, field: value})
    assert "\n" not in str(error.value)
