"""The mini street scenes benchmark (docs/data.md §7) and the domains figure."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cag.data import io
from cag.data import synthetic as syn
from cag.errors import OutputError
from cag.labels import cityscapes_lut, colorize, label_id_palette

SMALL = (32, 64)
#: Classes large enough for stable per-class colour means over a few samples.
STUFF = (syn.ROAD, syn.SIDEWALK, syn.BUILDING, syn.VEGETATION, syn.TERRAIN, syn.SKY)


def render_set(preset, strength, domain, n, split="train", size=SMALL):
    pairs = [syn.render_sample(preset, strength, domain, split, i, size) for i in range(n)]
    return np.stack([p[0] for p in pairs]).astype(np.float64), np.stack([p[1] for p in pairs])


def class_means(images, labels, classes=STUFF):
    return np.stack([images[labels == c].mean(axis=0) for c in classes])


def fraction(labels, label_id):
    return float((labels == label_id).mean())


def small_benchmark(out, **overrides):
    kwargs = dict(preset="full", size=SMALL, n_source=3, n_target_train=2, n_target_val=2,
                  n_target_test=1, progress=False)
    kwargs.update(overrides)
    return syn.generate(out, **kwargs)


# ----------------------------------------------------------------------------- determinism


def test_same_arguments_give_identical_bytes():
    for domain in syn.DOMAINS:
        a_image, a_labels = syn.render_sample("full", 0.7, domain, "val", 3, SMALL)
        b_image, b_labels = syn.render_sample("full", 0.7, domain, "val", 3, SMALL)
        assert a_image.dtype == np.uint8 and a_image.shape == (*SMALL, 3)
        assert a_labels.dtype == np.uint8 and a_labels.shape == SMALL
        assert a_image.tobytes() == b_image.tobytes()
        assert a_labels.tobytes() == b_labels.tobytes()


def test_domain_split_and_index_all_enter_the_seed():
    reference = syn.render_sample("class", 0.0, "target", "train", 0, SMALL)[0]
    for other in (("source", "train", 0), ("target", "val", 0), ("target", "test", 0), ("target", "train", 1)):
        assert not np.array_equal(syn.render_sample("class", 0.0, *other, SMALL)[0], reference)


def test_a_sample_does_not_depend_on_generation_order(tmp_path):
    syn.generate(tmp_path, preset="class", size=SMALL, n_source=6, n_target_train=0,
                 n_target_val=6, n_target_test=0, progress=False)
    for domain, split in (("source", "train"), ("target", "val")):
        image, labels = syn.render_sample("class", None, domain, split, 5, SMALL)
        paths = syn.source_paths(tmp_path, 5) if domain == "source" else syn.target_paths(tmp_path, split, 5)
        assert np.array_equal(io.read_image(paths[0]), image)
        assert np.array_equal(io.read_index_label(paths[1]), labels)


def test_any_size_and_only_known_label_ids():
    allowed = set(syn.CLASS_LABEL_IDS) | set(syn.VOID_LABEL_IDS)
    seen = set()
    for size in ((16, 16), (40, 100), (64, 128)):
        for index in range(6):
            image, labels = syn.render_sample("full", 1.0, "target", "train", index, size)
            assert image.shape == (*size, 3) and labels.shape == size
            seen |= set(np.unique(labels).tolist())
    assert seen <= allowed
    assert {syn.ROAD, syn.SKY, syn.CAR, syn.PERSON, syn.UNLABELED} <= seen


# ----------------------------------------------------------------------------- the shift


def test_strength_zero_is_no_shift_whatever_the_preset():
    images = [syn.render_sample(p, 0.0, "target", "train", 2, SMALL) for p in syn.PRESETS]
    for image, labels in images[1:]:
        assert np.array_equal(image, images[0][0]) and np.array_equal(labels, images[0][1])


def test_strength_zero_target_has_the_source_appearance_statistics():
    source = class_means(*render_set("class", None, "source", 24))
    same = class_means(*render_set("class", 0.0, "target", 24))
    shifted = class_means(*render_set("class", None, "target", 24))
    assert np.abs(same - source).max() < 8
    assert np.abs(shifted - source).max() > 40


def paired_shift(preset, strength, n=8):
    """Per-class mean colour change of the same target scenes against strength 0."""
    base_images, labels = render_set(preset, 0.0, "target", n)
    images, same_labels = render_set(preset, strength, "target", n)
    assert np.array_equal(labels, same_labels)
    return class_means(base_images, labels), class_means(images, labels)


def affine_residual(before, after):
    """Largest per-channel residual of the best map after = a * before + b over classes."""
    worst = 0.0
    for ch in range(3):
        design = np.stack([before[:, ch], np.ones(len(before))], axis=1)
        coef = np.linalg.lstsq(design, after[:, ch], rcond=None)[0]
        worst = max(worst, float(np.abs(design @ coef - after[:, ch]).max()))
    return worst


def test_global_preset_is_one_colour_map_for_every_class():
    before, after = paired_shift("global", 1.0)
    assert np.abs(after - before).max() > 15
    assert affine_residual(before, after) < 2.0


def test_class_preset_moves_classes_in_different_directions():
    before, after = paired_shift("class", 1.0)
    brightness = (after - before).mean(axis=1)
    road, sidewalk, vegetation = (STUFF.index(c) for c in (syn.ROAD, syn.SIDEWALK, syn.VEGETATION))
    assert brightness[road] > 25 and brightness[sidewalk] < -25 and brightness[vegetation] < -25
    assert affine_residual(before, after) > 20


def test_class_preset_makes_cars_achromatic():
    images, labels = render_set("class", 1.0, "target", 12)
    source_images, source_labels = render_set("class", 1.0, "source", 12)

    def chroma(images, labels):
        car = images[labels == syn.CAR]
        return float((car.max(axis=1) - car.min(axis=1)).mean())

    assert chroma(source_images, source_labels) > 100
    assert chroma(images, labels) < 30


def car_instance_colours(domain, n=12):
    """Median colour of each car's body: its pixels within 80 % of its brightest (not glass, wheels)."""
    colours = []
    for index in range(n):
        image, labels, instances = syn.render_layers("class", 1.0, domain, "train", index, SMALL)
        for slot in np.unique(instances[labels == syn.CAR]):
            pixels = image[(instances == slot) & (labels == syn.CAR)].astype(np.float64)
            brightness = pixels.sum(axis=1)
            colours.append(np.median(pixels[brightness >= 0.8 * brightness.max()], axis=0))
    return np.array(colours)


@pytest.mark.parametrize("domain, palette", [("source", syn.SOURCE_INSTANCE_COLOURS[syn.CAR]),
                                             ("target", syn.TARGET_INSTANCE_COLOURS[syn.CAR])])
def test_each_car_takes_one_of_its_domains_instance_colours(domain, palette):
    colours = car_instance_colours(domain)
    distance = np.abs(colours[:, None, :] - np.array(palette)[None]).max(axis=2)
    assert len(colours) >= 8
    assert (distance.min(axis=1) < 30).all()
    assert len(set(distance.argmin(axis=1).tolist())) >= 3


def test_appearance_grows_continuously_with_strength():
    base = render_set("class", 0.0, "target", 4)[0]
    distances = [np.abs(render_set("class", s, "target", 4)[0] - base).mean() for s in (0.25, 0.5, 1.0, 2.0)]
    assert 0 < distances[0] < distances[1] < distances[2] < distances[3]


def test_only_the_full_preset_shifts_the_layout():
    _, base = render_set("full", 0.0, "target", 30)
    for preset in ("global", "class"):
        assert np.array_equal(render_set(preset, 2.0, "target", 30)[1], base)
    _, shifted = render_set("full", 1.0, "target", 30)
    assert fraction(shifted, syn.VEGETATION) > 1.5 * fraction(base, syn.VEGETATION)
    assert fraction(shifted, syn.CAR) > fraction(base, syn.CAR)
    ground = (syn.ROAD, syn.SIDEWALK, syn.TERRAIN)
    assert np.isin(shifted, ground).mean() < np.isin(base, ground).mean() - 0.03


@pytest.mark.parametrize("args, match", [
    (("fancy", None, "target", "train", 0), "unknown preset 'fancy'"),
    (("full", -0.1, "target", "train", 0), r"strength must lie in \[0, 2.0\]"),
    (("full", 2.5, "target", "train", 0), "strength"),
    (("full", None, "real", "train", 0), "unknown domain 'real'"),
    (("full", None, "target", "dev", 0), "unknown split 'dev'"),
    (("full", None, "target", "train", -1), "index must be >= 0"),
])
def test_bad_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        syn.render_sample(*args, SMALL)


def test_bad_size_is_named():
    with pytest.raises(ValueError, match="at least 16x16"):
        syn.render_sample("full", None, "target", "train", 0, (8, 64))


# ----------------------------------------------------------------------------- files


def test_synthia_ids_of_hand_picked_label_ids():
    label_ids = np.array([[7, 8, 11, 26], [22, 27, 0, 4]], dtype=np.uint8)
    expected = np.array([[3, 4, 2, 8], [16, 18, 0, 0]], dtype=np.uint16)
    assert np.array_equal(syn.to_synthia_ids(label_ids), expected)


def test_written_files_round_trip_through_the_format_readers(tmp_path):
    manifest = small_benchmark(tmp_path, synthia=True)
    assert manifest["layouts"] == {"source": "GTA5", "target": "Cityscapes",
                                   "source_synthia": "SYNTHIA-RAND-CITYSCAPES"}
    strength = manifest["parameters"]["strength"]
    for index in range(3):
        image, labels = syn.render_sample("full", strength, "source", "train", index, SMALL)
        image_path, label_path = syn.source_paths(tmp_path, index)
        assert label_path.name == f"0000{index + 1}.png"
        with Image.open(label_path) as im:
            assert im.mode == "P"
            assert im.getpalette()[: 3 * 34] == label_id_palette()[: 3 * 34]
            assert np.array_equal(np.asarray(im.convert("RGB"))[labels == syn.ROAD][0], (128, 64, 128))
        assert np.array_equal(io.read_index_label(label_path), labels)
        assert np.array_equal(io.read_image(image_path), image)
        rgb_path, gt_path = syn.synthia_paths(tmp_path, index)
        assert gt_path.name == f"000000{index}.png"
        assert np.array_equal(io.read_image(rgb_path), image)
        assert np.array_equal(io.read_synthia_label(gt_path), syn.to_synthia_ids(labels))
    for split, count in (("train", 2), ("val", 2), ("test", 1)):
        for index in range(count):
            image, labels = syn.render_sample("full", strength, "target", split, index, SMALL)
            image_path, label_path = syn.target_paths(tmp_path, split, index)
            assert image_path == tmp_path / f"target/leftImg8bit/{split}/synth/synth_000000_{index:06d}_leftImg8bit.png"
            with Image.open(label_path) as im:
                assert im.mode == "L"
            assert np.array_equal(io.read_index_label(label_path, allowed_modes=("L",)), labels)
            assert np.array_equal(io.read_image(image_path), image)


def test_synthia_instance_channel_marks_things_only(tmp_path):
    import cv2

    small_benchmark(tmp_path, preset="full", strength=1.0, n_source=4, synthia=True)
    things = stuff = 0
    for index in range(4):
        _, labels = syn.render_sample("full", 1.0, "source", "train", index, SMALL)
        instances = cv2.imread(str(syn.synthia_paths(tmp_path, index)[1]), cv2.IMREAD_UNCHANGED)[..., 1]
        is_thing = np.isin(labels, (syn.PERSON, syn.CAR, syn.TRUCK))
        things += int(is_thing.sum())
        assert (instances[is_thing] > 0).all() and (instances[~is_thing] == 0).all()
    assert things > 0


# ----------------------------------------------------------------------------- manifest


def test_manifest_records_parameters_and_counts(tmp_path):
    manifest = small_benchmark(tmp_path)
    on_disk = json.loads((tmp_path / syn.MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["complete"] is True and manifest["format_version"] == syn.FORMAT_VERSION
    assert manifest["parameters"] == {"preset": "full", "strength": syn.PRESETS["full"].default_strength,
                                      "size": list(SMALL), "n_source": 3, "n_target_train": 2,
                                      "n_target_val": 2, "n_target_test": 1, "synthia": False}
    assert manifest["counts"] == {"source": 3, "target_train": 2, "target_val": 2, "target_test": 1}
    fractions = manifest["label_fractions"]["target_val"]
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-3)


def test_matching_manifest_skips_work(tmp_path, monkeypatch):
    small_benchmark(tmp_path)
    image_path = syn.source_paths(tmp_path, 0)[0]
    stamp = image_path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although the manifest matches")

    monkeypatch.setattr(syn, "write_sample", fail)
    small_benchmark(tmp_path)
    assert image_path.stat().st_mtime_ns == stamp


def test_other_parameters_or_missing_files_regenerate(tmp_path):
    small_benchmark(tmp_path, n_source=3, strength=0.2)
    first = io.read_image(syn.target_paths(tmp_path, "val", 0)[0])
    manifest = small_benchmark(tmp_path, n_source=2, strength=0.9)
    assert manifest["parameters"]["strength"] == 0.9
    assert not np.array_equal(io.read_image(syn.target_paths(tmp_path, "val", 0)[0]), first)
    assert not syn.source_paths(tmp_path, 2)[0].exists()
    os.remove(syn.target_paths(tmp_path, "test", 0)[1])
    small_benchmark(tmp_path, n_source=2, strength=0.9)
    assert syn.target_paths(tmp_path, "test", 0)[1].exists()


def test_an_interrupted_generation_is_redone(tmp_path):
    manifest = small_benchmark(tmp_path)
    (tmp_path / syn.MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    (tmp_path / "source" / "images" / "stale.png").write_bytes(b"")
    assert small_benchmark(tmp_path)["complete"] is True
    assert not (tmp_path / "source" / "images" / "stale.png").exists()


def test_unclaimed_folders_are_not_overwritten(tmp_path):
    (tmp_path / "target").mkdir()
    with pytest.raises(OutputError, match="no benchmark.json"):
        small_benchmark(tmp_path)


def test_command_line(tmp_path, capsys):
    assert syn.main(["--out", str(tmp_path), "--preset", "global", "--strength", "0.5", "--size", "16x32",
                     "--n-source", "1", "--n-target-train", "1", "--n-target-val", "1",
                     "--n-target-test", "1", "--synthia", "--quiet"]) == 0
    manifest = json.loads((tmp_path / syn.MANIFEST).read_text())
    assert manifest["parameters"]["size"] == [16, 32] and manifest["parameters"]["preset"] == "global"
    assert syn.synthia_paths(tmp_path, 0)[1].exists()
    assert "4 samples" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        syn.main(["--out", str(tmp_path), "--size", "64by128"])
    assert "--size must look like 64x128" in capsys.readouterr().err


# ----------------------------------------------------------------------------- loaders and figure


def test_the_dataset_loaders_read_the_benchmark(tmp_path):
    data = pytest.importorskip("cag.data", reason="cag.data loaders not available")
    if not hasattr(data, "GTA5"):
        pytest.skip("cag.data.GTA5 / Cityscapes not written yet")
    small_benchmark(tmp_path, synthia=True)
    source, target = data.GTA5(tmp_path / "source"), data.Cityscapes(tmp_path / "target", split="val")
    assert (len(source), len(target)) == (3, 2)
    strength = syn.PRESETS["full"].default_strength
    image, labels = syn.render_sample("full", strength, "target", "val", 1, SMALL)
    item = target[1]
    assert item["name"] == "synth/synth_000000_000001_leftImg8bit.png"
    assert torch.equal(item["image"], torch.from_numpy(image).permute(2, 0, 1))
    assert torch.equal(item["label"], torch.from_numpy(cityscapes_lut(19)[labels].astype(np.int64)))
    assert (item["label"] == 255).any()
    assert source[0]["name"] == "00001.png"
    assert len(data.Synthia(tmp_path / "source_synthia")) == 3


def domain_items(domain, n, as_float):
    items = []
    for index in range(n):
        image, labels = syn.render_sample("class", None, domain, "val", index, SMALL)
        tensor = torch.from_numpy(image).permute(2, 0, 1)
        items.append({"image": tensor.float() / 255 if as_float else tensor,
                      "label": torch.from_numpy(cityscapes_lut(19)[labels].astype(np.int64))})
    return items


def test_show_domains_draws_images_and_coloured_labels():
    from cag.figures import show_domains

    source, target = domain_items("source", 3, False), domain_items("target", 2, True)
    fig = show_domains(source, target, n=4)
    axes = fig.get_axes()
    assert len(axes) == 2 * 4
    assert "Source" in fig.get_suptitle() and "target" in fig.get_suptitle()
    assert [ax.get_title() for ax in axes[:4]] == ["source image", "source label", "target image", "target label"]
    assert not any(ax.axison for ax in axes)
    row = [np.asarray(ax.get_images()[0].get_array()) for ax in axes[4:]]
    assert np.array_equal(row[0], source[1]["image"].permute(1, 2, 0).numpy())
    assert np.array_equal(row[1], colorize(source[1]["label"]))
    assert np.array_equal(row[2], np.rint(target[1]["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    assert np.array_equal(row[3], colorize(target[1]["label"]))


def test_source_frames_of_other_sizes(tmp_path):
    """``source_sizes``: some source frames at another size, as GTA5's 1914x1046 among 1914x1052
    (docs/data.md §2); recorded in the manifest, so an unchanged call does no work."""
    manifest = small_benchmark(tmp_path, synthia=True, source_sizes={1: (30, 64)})
    assert manifest["parameters"]["source_sizes"] == {"1": [30, 64]}
    for i, size in ((0, SMALL), (1, (30, 64)), (2, SMALL)):
        image, label = syn.source_paths(tmp_path, i)
        assert io.read_image(image).shape[:2] == size and io.read_index_label(label).shape == size
        rgb, gt = syn.synthia_paths(tmp_path, i)
        assert io.read_image(rgb).shape[:2] == size and io.read_synthia_label(gt).shape == size
    assert io.read_image(syn.target_paths(tmp_path, "val", 0)[0]).shape[:2] == SMALL
    assert syn.is_current(tmp_path, manifest["parameters"])
    assert "source_sizes" not in small_benchmark(tmp_path / "plain")["parameters"]
    with pytest.raises(ValueError, match=r"source_sizes: indices \[3\] are not source samples"):
        small_benchmark(tmp_path / "bad", source_sizes={3: (30, 64)})
