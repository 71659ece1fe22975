"""GTA5, SYNTHIA and Cityscapes loaders and the dataset checker, on fixtures in the exact formats.

Expected train-id maps are written out by hand from docs/data.md §2-§4,
independently of ``cag.labels``.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cag.data import (
    GTA5,
    Cityscapes,
    DataError,
    MissingFilesWarning,
    Synthia,
    check_dataset,
    train_transform,
)
from cag.data import io
from formats import (
    cityscapes_entry,
    cityscapes_stem,
    fixture_image,
    id_cycle,
    make_cityscapes,
    make_gta5,
    make_synthia,
    truncate,
    write_list_file,
)

REPO = Path(__file__).resolve().parents[1]

# Cityscapes labelId -> trainId (docs/data.md §4; GTA5 uses the same ids).
CITYSCAPES_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# SYNTHIA protocols on Cityscapes GT: terrain 22, truck 27, train 31 ignored, the rest contiguous.
CITYSCAPES_16 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 23: 9, 24: 10, 25: 11,
                 26: 12, 28: 13, 32: 14, 33: 15}
CITYSCAPES_13 = {7: 0, 8: 1, 11: 2, 19: 3, 20: 4, 21: 5, 23: 6, 24: 7, 25: 8, 26: 9, 28: 10, 32: 11, 33: 12}
CITYSCAPES = {19: CITYSCAPES_19, 16: CITYSCAPES_16, 13: CITYSCAPES_13}
# SYNTHIA class id -> train id (docs/data.md §3-§4, ProDA's valid_classes).
SYNTHIA_16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12,
              19: 13, 12: 14, 11: 15}
SYNTHIA_13 = {3: 0, 4: 1, 2: 2, 15: 3, 9: 4, 6: 5, 1: 6, 10: 7, 17: 8, 8: 9, 19: 10, 12: 11, 11: 12}
SYNTHIA_19 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12,
              8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
SYNTHIA = {16: SYNTHIA_16, 13: SYNTHIA_13, 19: SYNTHIA_19}


def expected_map(ids: np.ndarray, table: dict[int, int]) -> torch.Tensor:
    out = np.full(ids.shape, 255, dtype=np.int64)
    for src, dst in table.items():
        out[ids == src] = dst
    return torch.from_numpy(out)


def caught_warnings(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build()
    return result, [w for w in caught if issubclass(w.category, MissingFilesWarning)]


# ---- exact train-id maps through each loader ------------------------------------------------------
@pytest.mark.parametrize("num_classes", [19, 16, 13])
def test_gta5_maps_every_label_id(tmp_path, num_classes):
    ids = id_cycle(35)
    make_gta5(tmp_path, {"00001.png": ids})
    item = GTA5(tmp_path, num_classes=num_classes)[0]
    assert item["label"].dtype == torch.int64
    assert torch.equal(item["label"], expected_map(ids, CITYSCAPES[num_classes]))
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 32)
    assert torch.equal(item["image"], torch.from_numpy(fixture_image(ids)).permute(2, 0, 1))
    assert item["name"] == "00001.png"


@pytest.mark.parametrize("num_classes", [19, 16, 13])
def test_cityscapes_maps_every_label_id(tmp_path, num_classes):
    ids = id_cycle(35)
    stem = cityscapes_stem("aachen", 0, 19)
    make_cityscapes(tmp_path, "val", {stem: ids})
    item = Cityscapes(tmp_path, split="val", num_classes=num_classes)[0]
    assert item["label"].dtype == torch.int64
    assert torch.equal(item["label"], expected_map(ids, CITYSCAPES[num_classes]))
    assert item["name"] == "aachen/aachen_000000_000019_leftImg8bit.png"


@pytest.mark.parametrize("num_classes", [16, 13, 19])
def test_synthia_maps_every_class_id(tmp_path, num_classes):
    ids = id_cycle(23)
    make_synthia(tmp_path, {"0000000.png": ids})
    label = Synthia(tmp_path, num_classes=num_classes)[0]["label"]
    assert label.dtype == torch.int64
    assert torch.equal(label, expected_map(ids, SYNTHIA[num_classes]))


def test_void_ids_become_ignore(tmp_path):
    void = np.array([[0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34]], dtype=np.uint8)
    make_gta5(tmp_path, {"00001.png": void})
    assert GTA5(tmp_path)[0]["label"].tolist() == [[255] * 16]


def test_synthia_labels_are_not_read_with_pillow(tmp_path):
    """Regression for the Pillow trap (docs/data.md §3): PIL reads the class channel as zeros."""
    ids = id_cycle(23)
    make_synthia(tmp_path, {"0000000.png": ids})
    label_file = tmp_path / "GT" / "LABELS" / "0000000.png"
    assert not np.asarray(Image.open(label_file))[..., 0].any()
    assert cv2.imread(str(label_file), cv2.IMREAD_UNCHANGED)[..., 1].min() > 255  # instance channel set
    assert np.array_equal(io.read_synthia_label(label_file), ids)
    assert torch.equal(Synthia(tmp_path)[0]["label"], expected_map(ids, SYNTHIA_16))


# ---- enumeration and list files -----------------------------------------------------------------
def test_entries_are_sorted(tmp_path):
    ids = id_cycle(35, (4, 4))
    make_gta5(tmp_path / "gta", {name: ids for name in ("00010.png", "00002.png", "00001.png")})
    assert GTA5(tmp_path / "gta").names == ["00001.png", "00002.png", "00010.png"]
    stems = [cityscapes_stem("zurich", 0, 1), cityscapes_stem("bremen", 0, 7), cityscapes_stem("bremen", 0, 3)]
    make_cityscapes(tmp_path / "city", "train", {stem: ids for stem in stems})
    assert Cityscapes(tmp_path / "city").names == [
        "bremen/bremen_000000_000003_leftImg8bit.png",
        "bremen/bremen_000000_000007_leftImg8bit.png",
        "zurich/zurich_000000_000001_leftImg8bit.png",
    ]


def test_list_files_select_and_order_samples(tmp_path):
    ids = id_cycle(35, (4, 4))
    make_gta5(tmp_path / "gta", {name: ids for name in ("00001.png", "00002.png", "00003.png")})
    listed = write_list_file(tmp_path / "gta.txt", ["00003.png", "", "00001.png"])
    assert GTA5(tmp_path / "gta", list_file=listed).names == ["00003.png", "00001.png"]

    stems = [cityscapes_stem("frankfurt", 0, 294), cityscapes_stem("lindau", 0, 0)]
    make_cityscapes(tmp_path / "city", "val", {stem: ids for stem in stems})
    city_list = write_list_file(tmp_path / "city.txt", ["lindau/lindau_000000_000000_leftImg8bit.png"])
    dataset = Cityscapes(tmp_path / "city", split="val", list_file=city_list)
    assert dataset.names == ["lindau/lindau_000000_000000_leftImg8bit.png"]
    assert dataset.samples[0].label.name == "lindau_000000_000000_gtFine_labelIds.png"

    make_synthia(tmp_path / "syn", {"0000000.png": id_cycle(23, (4, 4)), "0000001.png": id_cycle(23, (4, 4))})
    syn_list = write_list_file(tmp_path / "syn.txt", ["0000001.png"])
    assert Synthia(tmp_path / "syn", list_file=syn_list)[0]["name"] == "0000001.png"


def test_list_file_entry_without_files_is_dropped_with_a_warning(tmp_path):
    make_gta5(tmp_path / "gta", {"00001.png": id_cycle(35, (4, 4))})
    listed = write_list_file(tmp_path / "gta.txt", ["00001.png", "00099.png"])
    dataset, caught = caught_warnings(lambda: GTA5(tmp_path / "gta", list_file=listed))
    assert dataset.names == ["00001.png"]
    assert len(caught) == 1
    assert "dropped 1 of 2" in str(caught[0].message) and "00099.png" in str(caught[0].message)


def test_bad_list_files_are_errors(tmp_path):
    make_gta5(tmp_path / "gta", {"00001.png": id_cycle(35, (4, 4))})
    with pytest.raises(DataError, match="list file .*missing.txt does not exist"):
        GTA5(tmp_path / "gta", list_file=tmp_path / "missing.txt")
    bad = write_list_file(tmp_path / "bad.txt", ["00001.png", "../secret.png"])
    with pytest.raises(DataError, match=r"bad.txt:2: entry '../secret.png'"):
        GTA5(tmp_path / "gta", list_file=bad)
    no_suffix = write_list_file(tmp_path / "city.txt", ["frankfurt/frankfurt_000000_000294.png"])
    make_cityscapes(tmp_path / "city", "val", {cityscapes_stem("frankfurt", 0, 294): id_cycle(35, (4, 4))})
    with pytest.raises(DataError, match=r"city.txt:1: entry .* ending in '_leftImg8bit.png'"):
        Cityscapes(tmp_path / "city", split="val", list_file=no_suffix)
    none_present = write_list_file(tmp_path / "none.txt", ["00007.png"])
    with pytest.raises(DataError, match="none of the 1 entries"), warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingFilesWarning)
        GTA5(tmp_path / "gta", list_file=none_present)


# ---- known gaps and content errors -------------------------------------------------------------------
def test_missing_halves_give_one_warning_with_the_count(tmp_path):
    ids = id_cycle(35, (4, 4))
    names = [f"{i:05d}.png" for i in range(1, 7)]
    make_gta5(tmp_path, {n: ids for n in names}, skip_labels=("00002.png", "00005.png"), skip_images=("00006.png",))
    dataset, caught = caught_warnings(lambda: GTA5(tmp_path))
    assert dataset.names == ["00001.png", "00003.png", "00004.png"]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "dropped 3 of 6" in message
    assert "00002.png (no label labels/00002.png)" in message
    assert "00006.png (no image images/00006.png)" in message


def test_odd_size_frames_load_at_their_own_size(tmp_path):
    make_gta5(tmp_path, {"00001.png": id_cycle(35, (16, 32)), "00002.png": id_cycle(35, (13, 21))})
    dataset = GTA5(tmp_path)
    assert dataset[1]["label"].shape == (13, 21) and dataset[1]["image"].shape == (3, 13, 21)
    resized = GTA5(tmp_path, transform=train_transform(resize=(24, 12), base_width=None, crop=None, flip=0))
    assert [tuple(resized[i]["label"].shape) for i in range(2)] == [(12, 24), (12, 24)]


def test_image_label_size_mismatch_is_an_error_at_read(tmp_path):
    make_gta5(tmp_path, {"00001.png": id_cycle(35, (16, 30))}, images={"00001.png": fixture_image(id_cycle(35))})
    dataset = GTA5(tmp_path)
    with pytest.raises(DataError, match=r"00001.png: label is 30x16 \(WxH\) but its image .*00001.png is 32x16"):
        dataset[0]


def test_label_ids_out_of_range_are_errors_naming_the_values(tmp_path):
    make_gta5(tmp_path / "gta", {"00001.png": np.array([[7, 35, 90]], dtype=np.uint8)})
    with pytest.raises(DataError, match=r"labels.00001.png: label values 35, 90 are outside the GTA5 label ids 0..34"):
        GTA5(tmp_path / "gta")[0]
    make_synthia(tmp_path / "syn", {"0000000.png": np.array([[3, 23]], dtype=np.uint16)})
    with pytest.raises(DataError, match=r"label values 23 are outside the SYNTHIA label ids 0..22"):
        Synthia(tmp_path / "syn")[0]


def test_rgb_label_is_refused(tmp_path):
    ids = id_cycle(35, (4, 4))
    make_gta5(tmp_path, {"00001.png": ids})
    Image.fromarray(fixture_image(ids), "RGB").save(tmp_path / "labels" / "00001.png")
    with pytest.raises(DataError, match=r"labels.00001.png: label PNG has mode 'RGB'"):
        GTA5(tmp_path)[0]


def test_8bit_synthia_label_is_refused(tmp_path):
    make_synthia(tmp_path, {"0000000.png": id_cycle(23, (4, 4))})
    Image.fromarray(fixture_image(id_cycle(23, (4, 4))), "RGB").save(tmp_path / "GT" / "LABELS" / "0000000.png")
    with pytest.raises(DataError, match=r"0000000.png: SYNTHIA label is uint8, expected 16-bit"):
        Synthia(tmp_path)[0]


@pytest.mark.parametrize("part", ["images", "labels"])
def test_truncated_png_error_names_the_file(tmp_path, part):
    make_gta5(tmp_path, {"00001.png": id_cycle(35)})
    truncate(tmp_path / part / "00001.png")
    with pytest.raises(DataError, match=rf"{part}.00001.png: cannot read"):
        GTA5(tmp_path)[0]


def test_truncated_synthia_label_error_names_the_file(tmp_path):
    make_synthia(tmp_path, {"0000000.png": id_cycle(23)})
    truncate(tmp_path / "GT" / "LABELS" / "0000000.png")
    with pytest.raises(DataError, match=r"LABELS.0000000.png: cannot read SYNTHIA label"):
        Synthia(tmp_path)[0]


# ---- layout errors -------------------------------------------------------------------------------------
def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"GTA5 root .*nowhere does not exist"):
        GTA5(tmp_path / "nowhere")


def test_cityscapes_root_given_to_gta5_says_what_was_found(tmp_path):
    make_cityscapes(tmp_path, "train", {cityscapes_stem("aachen", 0, 0): id_cycle(35, (4, 4))})
    with pytest.raises(DataError) as err:
        GTA5(tmp_path)
    message = str(err.value)
    assert "expected the folders images/, labels/" in message
    assert "gtFine/, leftImg8bit/" in message
    assert "looks like a Cityscapes root" in message


def test_cityscapes_missing_split_lists_the_splits_found(tmp_path):
    make_cityscapes(tmp_path, "val", {cityscapes_stem("lindau", 0, 0): id_cycle(35, (4, 4))})
    with pytest.raises(DataError, match=r"leftImg8bit/train/ is missing; .*leftImg8bit holds: val/"):
        Cityscapes(tmp_path, split="train")


def test_synthia_root_given_to_cityscapes(tmp_path):
    make_synthia(tmp_path, {"0000000.png": id_cycle(23, (4, 4))})
    with pytest.raises(DataError, match="looks like a SYNTHIA root"):
        Cityscapes(tmp_path)


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataError, match=r"empty dataset.*found 0 images \(images/\*.png\), 0 labels"):
        GTA5(tmp_path)


# ---- unlabeled split and deterministic augmentation ------------------------------------------------
def test_cityscapes_without_labels(tmp_path):
    stems = [cityscapes_stem("aachen", 0, 0), cityscapes_stem("aachen", 0, 1)]
    make_cityscapes(tmp_path, "train", {stem: id_cycle(35, (4, 8)) for stem in stems}, skip_labels=stems)
    assert not (tmp_path / "gtFine").exists()
    dataset = Cityscapes(tmp_path, labels=False)
    item = dataset[1]
    assert set(item) == {"image", "name"}
    assert item["name"] == cityscapes_entry(stems[1])
    augmented = Cityscapes(tmp_path, labels=False, transform=train_transform(base_width=16, crop=(8, 4)))[0]
    assert set(augmented) == {"image", "name"} and augmented["image"].shape == (3, 4, 8)


def _augmented_dataset(root, seed=0):
    return GTA5(root, transform=train_transform(base_width=32, scale=(0.5, 1.5), crop=(12, 8)), seed=seed)


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    ids = id_cycle(35, (16, 32))
    make_gta5(tmp_path, {"00001.png": ids, "00002.png": ids})
    forward, backward = _augmented_dataset(tmp_path), _augmented_dataset(tmp_path)
    first = [forward[i] for i in (0, 1)]
    second = [backward[i] for i in (1, 0)][::-1]
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    draws = {forward[0]["image"].numpy().tobytes()}
    for epoch in range(1, 6):
        forward.set_epoch(epoch)
        draws.add(forward[0]["image"].numpy().tobytes())
    assert len(draws) > 1
    forward.set_epoch(0)
    assert torch.equal(forward[0]["image"], first[0]["image"])
    by_index = {_augmented_dataset(tmp_path, seed=s)[i]["image"].numpy().tobytes() for s in range(3) for i in (0, 1)}
    assert len(by_index) > 3
    other_seed = {_augmented_dataset(tmp_path, seed=s)[0]["image"].numpy().tobytes() for s in range(1, 6)}
    assert len(other_seed | {first[0]["image"].numpy().tobytes()}) > 1


# ---- check_dataset and the scripts ---------------------------------------------------------------
def _broken_gta5(root):
    """A GTA5 copy with one of each problem the checker must report."""
    ids = id_cycle(35)
    names = [f"{i:05d}.png" for i in range(1, 8)]
    make_gta5(root, {n: ids for n in names}, skip_labels=("00002.png",))
    truncate(root / "images" / "00003.png")
    io.write_gta5_label(root / "labels" / "00004.png", np.full((16, 30), 99, np.uint8))
    Image.fromarray(fixture_image(ids), "RGB").save(root / "labels" / "00005.png")
    io.write_gta5_label(root / "labels" / "00006.png", np.full((16, 32), 200, np.uint8))
    return root


def test_check_dataset_reports_every_problem_at_once(tmp_path):
    report = check_dataset("gta5", _broken_gta5(tmp_path))
    errors = sorted(Path(p.path).as_posix()[len(tmp_path.as_posix()) + 1:] for p in report.errors)
    assert errors == ["images/00003.png", "labels/00004.png", "labels/00004.png", "labels/00005.png", "labels/00006.png"]
    assert sum("00004.png: label is 30x16" in p.message or "00004.png: label values 99" in p.message
               for p in report.errors) == 2
    assert any("00006.png: label values 200" in p.message for p in report.errors)
    warned = [p.message for p in report.warnings]
    assert "00002.png: no label labels/00002.png" in warned
    assert any("6 complete samples, the full GTA5 has 24966" in m for m in warned)
    assert sum("GTA5 frames are usually 1914x1052" in m for m in warned) == 5
    assert report.pairs == 6 and report.checked == 6
    assert not report.usable


def test_check_dataset_accepts_a_clean_copy_with_warnings(tmp_path):
    stems = [cityscapes_stem("lindau", 0, i) for i in range(3)]
    make_cityscapes(tmp_path, "val", {s: id_cycle(35) for s in stems})
    report = check_dataset("cityscapes", tmp_path, split="val", max_files=2)
    assert report.usable and report.errors == []
    assert report.pairs == 3 and report.checked == 2
    assert any("the full Cityscapes val has 500" in p.message for p in report.warnings)


def test_check_dataset_layout_error_stops_with_one_problem(tmp_path):
    make_synthia(tmp_path, {"0000000.png": id_cycle(23, (4, 4))})
    report = check_dataset("gta5", tmp_path)
    assert len(report.problems) == 1 and "looks like a SYNTHIA root" in report.problems[0].message
    assert not report.usable


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "data_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_dataset_script_prints_every_problem_and_exit_code(tmp_path, capsys):
    main = _script("check_dataset").main
    assert main(["gta5", str(_broken_gta5(tmp_path / "broken"))]) == 1
    out = capsys.readouterr().out
    assert out.count("ERROR: ") == 5 and "00002.png: no label" in out
    assert "NOT usable" in out
    make_synthia(tmp_path / "syn", {"0000000.png": id_cycle(23)})
    assert main(["synthia", str(tmp_path / "syn")]) == 0
    assert "SYNTHIA at" in capsys.readouterr().out


def test_make_lists_script_round_trips_through_the_loader(tmp_path):
    ids = id_cycle(35, (4, 4))
    make_gta5(tmp_path / "gta", {n: ids for n in ("00002.png", "00001.png", "00003.png")}, skip_labels=("00003.png",))
    out = tmp_path / "lists" / "gta5_train.txt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingFilesWarning)
        assert _script("make_lists").main(["gta5", str(tmp_path / "gta"), str(out)]) == 0
    assert out.read_text() == "00001.png\n00002.png\n"
    assert GTA5(tmp_path / "gta", list_file=out).names == ["00001.png", "00002.png"]


# ----------------------------------------------------------------------------- loader workers


def test_loaders_never_start_more_workers_than_they_have_batches(monkeypatch):
    """``data.num_workers`` is a ceiling: a stream of 3 images at batch 2 hands out one batch per
    epoch, a validation over 3 images at batch 2 two; more workers than that only fork the
    training process (at real size on a CPU, gigabytes each). The batches are the same."""
    from cag.data.datasets import loader_workers
    from cag.evaluate import evaluate_model
    from cag.loop import Stream
    from test_evaluate import EchoModel, Items

    assert [loader_workers(8, b) for b in (0, 1, 2, 8, 9)] == [0, 1, 2, 8, 8]
    assert loader_workers(0, 5) == 0
    items = Items([{"image": torch.full((3, 4, 4), float(i % 3)), "label": torch.full((4, 4), i % 3)}
                   for i in range(3)])

    class Keyed(Items):  # a Stream asks for (epoch, index)
        def __getitem__(self, key):
            return self.items[key[1]]

    keyed = Keyed(items.items)
    streams = {workers: Stream(keyed, batch_size=2, seed=1, num_workers=workers) for workers in (0, 8)}
    assert streams[8].loader.num_workers == 1 and streams[0].loader.num_workers == 0
    batches = {w: [s.next()["image"] for _ in range(3)] for w, s in streams.items()}
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[8]))

    started = []
    real_loader = torch.utils.data.DataLoader

    class CountingLoader(real_loader):
        def __init__(self, *args, **kwargs):
            started.append(kwargs.get("num_workers", 0))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", CountingLoader)
    cm = evaluate_model(EchoModel(3), items, 3, "cpu", batch_size=2, quiet=True, num_workers=8)
    assert started == [2] and int(cm.matrix.sum()) == 3 * 16
