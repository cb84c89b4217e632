"""Tests of data.py: the Real-IAD loader on a tree written here, pseudo-anomalies, the command-line errors."""
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import synthetic

SIZE = (48, 40)  # written images are not square: the loader resizes the shorter side and crops


# ----------------------------------------------------------------------------------------------------
# A Real-IAD-shaped tree


def _image(path, camera):
    """A flat image whose red channel encodes the camera number (40 * n), to check the view order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", SIZE, (40 * camera, 100, 200)).save(path, quality=95)


def _mask(path, box):
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.new("L", SIZE, 0)
    if box:
        ImageDraw.Draw(mask).rectangle(box, fill=255)
    mask.save(path)


def _sample(base, category, number, code=None, views=(), sep="_"):
    """Write one sample; `views` maps camera number -> (anomaly class, mask box or None, has mask path).
    Returns its JSON entries (cameras missing from `views` are left out when it is not empty)."""
    entries = []
    for cam in range(1, 6):
        if code is None:
            name = f"OK/S{number:04d}/{category}_{number:04d}_OK_C{cam}_2023091215114{cam}"
            cls, box, has_mask = "OK", None, False
        else:
            if cam not in views:
                continue
            name = f"NG/{code}/S{number:04d}/{category}{sep}{number:04d}_NG_{code}_C{cam}_2023102111153{cam}"
            cls, box, has_mask = views[cam]
        _image(base / f"{name}.jpg", cam)
        if has_mask:
            _mask(base / f"{name}.png", box)
        entries.append({"category": category, "anomaly_class": cls, "image_path": f"{name}.jpg",
                        "mask_path": f"{name}.png" if has_mask else None})
    return entries


def _json(path, category, train, test):
    random.Random(0).shuffle(train)  # the JSON order must not matter
    random.Random(1).shuffle(test)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {"prefix": f"{category}/", "normal_class": "OK"},
                                "train": train, "test": test}))


LEFT_HALF = (0, 0, 23, 39)
ALL_VIEWS = {cam: ("OK", None, False) for cam in range(1, 6)}


@pytest.fixture
def tree(tmp_path):
    """audiojack: nested JSON, category inside an extra folder of its own name, double-underscore NG
    names; zipper: flat JSON, category inside an extra wrapping folder."""
    root = tmp_path / "Real-IAD"
    base = root / "realiad_256" / "audiojack" / "audiojack"
    train = _sample(base, "audiojack", 1) + _sample(base, "audiojack", 2)
    train += [e for e in _sample(base, "audiojack", 3) if "_C3_" not in e["image_path"]]  # a view lost
    defect = {1: ("HS", LEFT_HALF, True),  # shows the defect
              2: ("HS", (30, 0, 47, 39), True),  # shows it on the right
              3: ("OK", None, False),  # the release's form for a view that does not show it
              4: ("HS", None, False),  # the other form: defect class without a mask
              5: ("HS", None, True)}  # a defect class with an empty mask
    test = _sample(base, "audiojack", 4) + _sample(base, "audiojack", 64, "HS", defect, sep="__")
    _json(root / "realiad_jsons" / "realiad_jsons" / "audiojack.json", "audiojack", train, test)
    zbase = root / "realiad_256" / "release" / "zipper"
    _json(root / "realiad_jsons" / "zipper.json", "zipper", _sample(zbase, "zipper", 1),
          _sample(zbase, "zipper", 7, "QS", {c: ("QS", LEFT_HALF, True) for c in range(1, 6)}))
    return root


def test_real_iad_tree_loads_samples_labels_masks_and_view_order(tree):
    with pytest.warns(UserWarning, match=r"left out 1 train samples .* \(first: audiojack_0003_OK\)"):
        train = data.RealIAD(tree, "audiojack", "train", image_size=32)
    assert [key for _, key, _ in train.samples] == ["audiojack_0001_OK", "audiojack_0002_OK"]
    item = train[0]
    assert item["images"].shape == (5, 3, 32, 32) and item["masks"].shape == (5, 1, 32, 32)
    red = data.denormalize(item["images"])[:, 0].mean((1, 2)) * 255  # (V,)
    torch.testing.assert_close(red, torch.tensor([40.0, 80, 120, 160, 200]), atol=4, rtol=0)
    assert item["label"] == 0 and item["view_labels"].tolist() == [0] * 5
    assert [Path(p).name.split("_")[3] for p in item["paths"]] == list(data.CAMERAS)

    test = data.RealIAD(tree, "audiojack", "test", image_size=32)
    assert [key for _, key, _ in test.samples] == ["audiojack_0004_OK", "audiojack__0064_NG_HS"]
    normal, defective = test[0], test[1]
    assert normal["label"] == 0 and normal["masks"].sum() == 0
    assert defective["sample_id"] == "audiojack__0064_NG_HS" and defective["category"] == "audiojack"
    assert defective["label"] == 1 and defective["view_labels"].tolist() == [1, 1, 0, 0, 0]
    assert defective["view_classes"].tolist() == [1, 1, 0, 1, 1]  # the JSON classes
    assert defective["mask_paths"][0].endswith("_C1_20231021111531.png") and defective["mask_paths"][2] == ""
    masks = defective["masks"][:, 0]  # 48x40 -> 38x32 (bilinear, > 0.5) -> centre crop 32x32 (3 px off the left)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks[0, :, :15].min() == 1 and masks[0, :, 17:].max() == 0  # left half
    assert masks[1, :, 25:].min() == 1 and masks[1, :, :20].max() == 0  # right part
    assert masks[2:].sum() == 0


def test_a_defect_that_vanishes_when_resized_keeps_its_sample_anomalous(tmp_path):
    """As the official MVAD code: the sample label comes from the JSON classes, the view (image) label
    and the pixels from the mask resized bilinearly and thresholded at 0.5, so a 2x2 defect in a
    48x40 image is gone at 8 px (it covers a tenth of an output pixel) while its sample stays anomalous."""
    root = tmp_path / "Real-IAD"
    base = root / "realiad_256" / "zipper"
    tiny = {c: ("OK", None, False) for c in range(1, 6)}
    tiny[2] = ("PS", (20, 20, 21, 21), True)
    _json(root / "realiad_jsons" / "zipper.json", "zipper", _sample(base, "zipper", 1),
          _sample(base, "zipper", 3, "PS", tiny))
    item = data.RealIAD(root, "zipper", "test", image_size=8)[0]
    assert item["label"] == 1 and item["view_classes"].tolist() == [0, 1, 0, 0, 0]
    assert item["view_labels"].tolist() == [0] * 5 and item["masks"].sum() == 0
    large = data.RealIAD(root, "zipper", "test", image_size=40)[0]  # at the source size it is kept
    assert large["view_labels"].tolist() == [0, 1, 0, 0, 0] and large["masks"].sum() == 4


def test_masks_are_resized_bilinearly_and_thresholded_at_one_half(tmp_path):
    path = tmp_path / "mask.png"
    pixels = np.zeros((8, 8), np.uint8)
    pixels[:, :3] = 1  # any positive value is a defect, even 1 of 255
    Image.fromarray(pixels).save(path)
    mask = data.load_mask(path, 4)[0]  # output column 0 sees input columns 0-2 -> 1.0; column 1
    assert mask.tolist() == [[1.0, 0.0, 0.0, 0.0]] * 4  # weighs 1-4 by 1/8, 3/8, 3/8, 1/8 -> 0.5, not > 0.5


def test_real_iad_category_list_and_all(tree):
    both = data.RealIAD(tree, ["audiojack", "zipper"], "test", image_size=32)
    assert both.categories == ["audiojack", "zipper"] and len(both) == 3
    zipper = [both[i] for i in range(3) if both[i]["category"] == "zipper"][0]
    assert zipper["view_labels"].tolist() == [1] * 5
    assert data.RealIAD(tree, "all", "test", image_size=32).categories == ["audiojack", "zipper"]


def test_resolution_folder_choice(tmp_path):
    for res in ("256", "512", "raw"):
        (tmp_path / f"realiad_{res}").mkdir()
    assert data._resolution_dir(tmp_path, 256, None).name == "realiad_256"
    assert data._resolution_dir(tmp_path, 300, None).name == "realiad_512"
    assert data._resolution_dir(tmp_path, 600, None).name == "realiad_raw"
    assert data._resolution_dir(tmp_path, 128, 512).name == "realiad_512"
    with pytest.raises(data.UserError, match=r"realiad_1024 \(present: realiad_256, realiad_512, "
                                             r"realiad_raw\); extract that resolution"):
        data._resolution_dir(tmp_path, 256, 1024)


def test_load_image_resizes_shorter_side_and_crops(tmp_path):
    path = tmp_path / "wide.png"
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, 40:] = 255  # right half white
    Image.fromarray(pixels).save(path)
    image = data.load_image(path, 20)
    assert image.shape == (3, 20, 20)
    assert image[:, :, :8].max() < 0.05 and image[:, :, 12:].min() > 0.95


def test_reduced_jpeg_decode_agrees_with_a_full_decode_and_resize(tmp_path):
    """The CPU default reads 256 px files at 128: PIL's JPEG draft mode decodes at half scale in
    the DCT, then no resize is left. Against a full decode resized as resize_crop does, the mean
    difference over the five views stays within 2/255 (measured 1.76/255; decoding at a quarter
    scale and upsampling, 2.90/255). Single pixels at the object's edges differ by up to ~50/255."""
    synthetic.synthesize(tmp_path, "zipper", n_train=1, n_test_normal=0, n_test_defect=0, resolution=256, seed=0)
    paths = sorted(tmp_path.rglob("*.jpg"))
    assert len(paths) == 5
    assert data._read_pixels(paths[0], 128, "RGB").shape == (128, 128, 3)  # decoded at half scale

    def full_decode(path):
        with Image.open(path) as image:
            assert image.size == (256, 256)
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255

    reduced = torch.stack([data.load_image(p, 128) for p in paths])  # (5, 3, 128, 128)
    full = torch.stack([data.resize_crop(full_decode(p), 128) for p in paths])
    assert (reduced - full).abs().mean() <= 2 / 255


# ----------------------------------------------------------------------------------------------------
# Bad input: one clear line each


def test_missing_root(tmp_path):
    with pytest.raises(data.UserError, match=r"Real-IAD root .*nowhere does not exist; pass the folder"):
        data.RealIAD(tmp_path / "nowhere", "zipper", "train")


def test_missing_json_names_expected_paths_and_available(tree):
    with pytest.raises(data.UserError) as error:
        data.RealIAD(tree, "pcb", "train")
    message = str(error.value)
    assert "no Real-IAD JSON for category 'pcb'" in message and "\n" not in message
    assert str(tree / "realiad_jsons" / "pcb.json") in message
    assert str(tree / "realiad_jsons" / "realiad_jsons" / "pcb.json") in message
    assert "(categories available there: audiojack, zipper)" in message


def test_unknown_category_lists_valid_ones(tree):
    with pytest.raises(data.UserError, match=r"unknown category 'zipperr'; valid categories: audiojack, "
                                             r"bottle_cap, .*, zipper, or 'all'"):
        data.RealIAD(tree, "zipperr", "train")


def test_json_entry_with_missing_keys(tree):
    path = tree / "realiad_jsons" / "zipper.json"
    content = json.loads(path.read_text())
    del content["train"][2]["mask_path"]
    path.write_text(json.dumps(content))
    with pytest.raises(data.UserError, match=r"zipper\.json: train entry 2 lacks mask_path; every entry "
                                             r"needs category, anomaly_class, image_path, mask_path"):
        data.RealIAD(tree, "zipper", "train")


def test_missing_image_names_the_file(tree):
    path = next((tree / "realiad_256" / "release" / "zipper" / "OK").rglob("*_C4_*.jpg"))
    path.unlink()
    with pytest.raises(data.UserError, match=rf"{path.name} \(listed in .*zipper\.json\) does not exist"):
        data.RealIAD(tree, "zipper", "train")


def test_truncated_image_names_the_file(tree):
    path = next((tree / "realiad_256" / "release" / "zipper" / "OK").rglob("*_C2_*.jpg"))
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    dataset = data.RealIAD(tree, "zipper", "train", image_size=32)
    with pytest.raises(data.UserError) as error:
        dataset[0]
    message = str(error.value)
    assert message.startswith(f"cannot read {path} (") and "extract it again" in message
    assert "\n" not in message


def _rewrite_json(tree, change):
    """Applies `change` to zipper.json's content and writes it back."""
    path = tree / "realiad_jsons" / "zipper.json"
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def test_duplicate_camera_names_the_sample(tree):
    _rewrite_json(tree, lambda content: content["train"].append(dict(content["train"][0])))
    with pytest.raises(data.UserError, match=r"zipper\.json: two entries for camera C[1-5] of sample "
                                             r"zipper_0001_OK; remove one$"):
        data.RealIAD(tree, "zipper", "train")


def test_unparseable_file_name_shows_the_naming_rule(tree):
    def rename(content):
        content["train"][3]["image_path"] = "OK/S0001/photo_3.jpg"

    _rewrite_json(tree, rename)
    with pytest.raises(data.UserError, match=r"zipper\.json: cannot read the sample key and camera from "
                                             r"'OK/S0001/photo_3\.jpg'; Real-IAD names images <category>_"):
        data.RealIAD(tree, "zipper", "train")


def test_invalid_json_names_the_file(tree):
    path = tree / "realiad_jsons" / "zipper.json"
    path.write_text('{"meta": {"prefix": "zipper/"}, "train": [')
    with pytest.raises(data.UserError, match=rf"^cannot read {path} \(.+\); extract realiad_jsons again$"):
        data.RealIAD(tree, "zipper", "train")


def test_bad_split(tree):
    with pytest.raises(data.UserError, match=r"^split must be 'train' or 'test', not 'val'$"):
        data.RealIAD(tree, "zipper", "val")


def test_all_without_jsons_says_where_they_belong(tree):
    shutil.rmtree(tree / "realiad_jsons")
    with pytest.raises(data.UserError, match=rf"^no Real-IAD JSONs under {tree / 'realiad_jsons'}; "
                                             r"extract realiad_jsons\.zip into the Real-IAD folder$"):
        data.RealIAD(tree, "all", "train")


WORKER_TRACEBACK = ("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                    "last):\n  File \"idif.py\", line 1, in forward\nValueError: image_size 72 must be a "
                    "multiple of 16")


@pytest.mark.parametrize("error, line", [
    (data.UserError("--out /x: cannot write there; pass a writable folder"),
     "--out /x: cannot write there; pass a writable folder"),
    (ValueError("n_win 0 must be >= 1"), "n_win 0 must be >= 1"),  # the model files' bad arguments
    (ValueError(WORKER_TRACEBACK), "image_size 72 must be a multiple of 16"),  # the last line only
    (OSError(28, "No space left on device", "runs/mvad_zipper/history.json"),  # a full disk after an epoch
     "runs/mvad_zipper/history.json: No space left on device; free space or fix the permissions there (a training "
     "run continues from its last checkpoint with --resume)"),
])
def test_run_cli_prints_one_line_and_returns_2(error, line, capsys):
    def main(argv):
        raise error

    assert data.run_cli(main, []) == 2
    assert capsys.readouterr() == ("", f"error: {line}\n")
    assert data.run_cli(lambda argv: None, []) == 0
    with pytest.raises(KeyError):  # anything else is a bug: its traceback is shown
        data.run_cli(lambda argv: {}["key"], [])

    def no_file(argv):
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):  # an OSError about no file, too
        data.run_cli(no_file, [])


# ----------------------------------------------------------------------------------------------------
# Pseudo-anomalies


def test_perlin_noise_shape_range_and_determinism():
    noise = data.perlin_noise(64, 48, (4, 8), angle=0.3, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (64, 48) and noise.abs().max() <= 1 and noise.std() > 0.15
    again = data.perlin_noise(64, 48, (4, 8), angle=0.3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise, again)
    gradients = data.perlin_gradients(4, torch.Generator().manual_seed(0))
    y, x = torch.meshgrid(torch.arange(-3.0, 6), torch.arange(-3.0, 6), indexing="ij")
    assert data.perlin(y, x, gradients).abs().max() < 1e-6  # zero at every lattice point
    torch.testing.assert_close(data.perlin(y + 0.3, x + 0.6, gradients),
                               data.perlin(y + 4.3, x - 3.4, gradients))  # repeats every 4 cells


def test_perlin_mask_coverage():
    generator = torch.Generator().manual_seed(0)
    masks = torch.stack([data.perlin_mask(64, 64, generator) for _ in range(100)])
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    coverage = masks.mean((1, 2))
    assert 0.02 < coverage.mean() < 0.3 and coverage.max() < 0.7
    assert (coverage > 0).float().mean() > 0.5  # most masks mark something


def test_blend_anomaly_formula():
    generator = torch.Generator().manual_seed(0)
    image, texture = torch.rand(3, 8, 8, generator=generator), torch.rand(3, 8, 8, generator=generator)
    mask = (torch.rand(8, 8, generator=generator) > 0.5).float()
    out = data.blend_anomaly(image, texture, mask, 0.3)
    expected = torch.where(mask.bool(), 0.7 * texture + 0.3 * image, image)
    torch.testing.assert_close(out, expected)


class _Views(torch.utils.data.Dataset):
    """Six samples of 5 random views, like RealIAD items."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(index))
        return {"images": data.normalize(images), "sample_id": str(index)}


def test_pseudo_anomalies_shapes_masks_and_determinism():
    dataset = data.PseudoAnomalies(_Views(), seed=1)
    item = dataset[2]
    assert item["sample_id"] == "2" and item["corrupted"].shape == (5, 3, 32, 32)
    assert item["pseudo_masks"].shape == (5, 1, 32, 32)
    torch.testing.assert_close(dataset[2]["corrupted"], item["corrupted"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[2]["corrupted"], item["corrupted"])

    corrupted_views, total = 0, 0
    for index in range(len(dataset)):
        item = dataset[index]
        masks = item["pseudo_masks"]
        outside = (masks == 0).expand_as(item["images"])
        torch.testing.assert_close(item["corrupted"][outside], item["images"][outside])  # only in the mask
        changed = (item["corrupted"] - item["images"]).abs().amax(1, keepdim=True) > 1e-4
        assert not (changed & (masks == 0)).any()
        corrupted_views += int((masks.flatten(1).sum(1) > 0).sum())
        total += 5
    assert 0.2 < corrupted_views / total < 0.8  # some views stay clean


def test_pseudo_anomalies_with_texture_folder(tmp_path):
    with pytest.raises(data.UserError, match=r"texture folder .*missing does not exist; pass the DTD"):
        data.PseudoAnomalies(_Views(), dtd_root=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.UserError, match=r"no images \(\.jpg, \.png\) under texture folder"):
        data.PseudoAnomalies(_Views(), dtd_root=tmp_path / "empty")
    Image.new("RGB", (20, 30), (255, 0, 0)).save(tmp_path / "red.jpg")
    dataset = data.PseudoAnomalies(_Views(), dtd_root=tmp_path)
    items = [dataset[i] for i in range(len(dataset))]
    assert all(item["corrupted"].shape == (5, 3, 32, 32) for item in items)
