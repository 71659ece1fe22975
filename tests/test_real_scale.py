"""The released configurations at the real frame sizes, on the CPU.

Generated data in the real sizes and formats (``cag.data.synthetic`` with the ``cag.data.io``
writers): GTA5 frames of 1914x1052 with one of 1914x1046 (palette PNG labels),
SYNTHIA-RAND-CITYSCAPES frames of 1280x760 (16-bit 3-channel PNG labels) and Cityscapes frames of
2048x1024 (``*_leftImg8bit.png`` / ``*_gtFine_labelIds.png``), and a ResNet-101 file in
torchvision's layout with random values, passed as ``model.pretrained_backbone``. The released
``configs/gta5_to_cityscapes.yaml`` and ``configs/synthia_to_cityscapes.yaml`` then run every
stage with the full DeepLab-v3+ ResNet-101: crops of 896x512 at output stride 16, the real
resizes and scale range, anchors at 1914x1052 (1280x760), full-resolution validation and
evaluation. Besides the data roots, the run directory and the backbone file only counts are
overridden (:data:`COUNTS`): one iteration per stage, batch 2 (DeepLab-v3+ trains with at least
2: the ASPP image-pooling BatchNorm), two anchor images, one validation image, and one
checkpoint scored by the evaluate stage (``eval.checkpoints``, ``eval.stages``: the final stage's
last; every stage's validation already scores its checkpoint at full resolution). ``make paper-run``'s command then executes
the chapters in the paper profile on the GTA5 run, and DeepLab-v2 (output stride 8) runs one
real-size CAG iteration.

Measured on the project's 2-core machine (AMD EPYC, AVX2, no AVX-512; float32 as released,
``OMP_NUM_THREADS=2``; wall seconds; the machine was shared, so times are upper bounds)::

    see benchmarks/NOTES.md, section "Real-scale run in make test", for the table

Select these tests alone with ``pytest -m real_scale``; plain ``make test`` runs them too.
"""
from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cag.anchors import load_anchors
from cag.config import load_config
from cag.data import io
from cag.data.synthetic import generate, source_paths, synthia_paths, target_paths
from cag.labels import CLASSES_16, CLASSES_19
from cag.models import DeepLabV2, DeepLabV3Plus
from cag.pipeline import Pipeline, stage_names

pytestmark = [pytest.mark.real_scale, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]

#: The only overrides besides data roots, run directory and backbone file: iteration and image
#: counts, the batch size and the checkpoints scored per stage.
COUNTS = ["source_only.iters=1", "warmup.iters=1", "cag.iters=1", "train.batch_size=2",
          "train.val_max_images=1", "anchors.num_images=2", "eval.checkpoints=[last]", "eval.stages=[stage3]"]
#: (H, W) of the generated frames: the datasets' real sizes, and GTA5's odd frame (index 1).
GTA5_HW, GTA5_ODD_HW, SYNTHIA_HW, CITYSCAPES_HW = (1052, 1914), (1046, 1914), (760, 1280), (1024, 2048)
CROP_HW = (512, 896)
TRAINING = ("source_only", "warmup", "stage1", "stage2", "stage3")


@pytest.fixture(scope="module")
def real_data(tmp_path_factory) -> Path:
    """GTA5 (2 frames, one odd), SYNTHIA (2), Cityscapes (2 train, 1 val) and a random ResNet-101 file."""
    import torchvision

    root = tmp_path_factory.mktemp("real_scale")
    none = {"n_target_train": 0, "n_target_val": 0, "n_target_test": 0, "progress": False}
    generate(root / "gta5", size=GTA5_HW, n_source=2, source_sizes={1: GTA5_ODD_HW}, **none)
    generate(root / "synthia", size=SYNTHIA_HW, n_source=2, synthia=True, **none)
    generate(root / "cityscapes", size=CITYSCAPES_HW, n_source=0, n_target_train=2, n_target_val=1, n_target_test=0,
             progress=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet101().state_dict(), root / "resnet101.pth")
    return root


def overrides(config: str, data: Path, out: Path, *extra: str) -> list[str]:
    source = {"gta5_to_cityscapes": data / "gta5" / "source",
              "synthia_to_cityscapes": data / "synthia" / "source_synthia"}[config]
    return [f"data.source_root={source}", f"data.target_root={data / 'cityscapes' / 'target'}", f"out_dir={out}",
            f"model.pretrained_backbone={data / 'resnet101.pth'}", *COUNTS, *extra]


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_stages(config: str, data: Path, out: Path, *extra: str, until: str | None = None) -> dict:
    """Run the pipeline stage by stage, recording each stage's wall time and every forward pass
    of the network: (stage, train mode, input shape, features shape, logits shape)."""
    cfg = load_config(REPO / "configs" / f"{config}.yaml", overrides(config, data, out, *extra))
    pipeline = Pipeline(cfg)
    forwards, seconds, current = [], {}, {"stage": "checks"}

    def hook(module, args, output):
        if isinstance(module, (DeepLabV3Plus, DeepLabV2)):
            forwards.append((current["stage"], module.training, tuple(args[0].shape), tuple(output[0].shape),
                             tuple(output[1].shape)))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        started, cpu_started = time.time(), cpu_seconds()
        pipeline.check_before_work()
        for stage in stage_names(cfg):
            current["stage"], t0, c0 = stage, time.time(), cpu_seconds()
            pipeline.run_stage(stage)
            seconds[stage] = (round(time.time() - t0, 1), round(cpu_seconds() - c0, 1))
            if stage == until:
                break
    finally:
        handle.remove()
    seconds["total"] = (round(time.time() - started, 1), round(cpu_seconds() - cpu_started, 1))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n{config} {' '.join(extra)}: (wall, CPU) seconds {seconds}, peak RSS of this process {rss:.2f} GiB")
    return {"cfg": cfg, "run": cfg.run_dir, "forwards": forwards, "seconds": seconds}


def drop_checkpoints(run: Path) -> None:
    """Delete a finished run's checkpoints (about 0.7 GB per stage); the records stay."""
    for path in run.rglob("*.pt"):
        path.unlink()


def inputs(record: dict, stage: str, training: bool) -> set:
    """The (H, W) of the inputs the network saw in ``stage`` in train or eval mode."""
    return {f[2][-2:] for f in record["forwards"] if f[0] == stage and f[1] == training}


def check_run(record: dict, classes: list[str], anchor_hw: tuple[int, int]) -> dict:
    """Assertions shared by both released configurations; returns the run's summary."""
    cfg, run = record["cfg"], record["run"]
    for stage in stage_names(cfg):
        done = json.loads((run / stage / "done.json").read_text())
        assert done["stage"] == stage and "skipped" not in done, stage
    for stage in TRAINING:
        summary = json.loads((run / stage / "summary.json").read_text())
        assert summary["iters"] == 1 and summary["peak_memory_gib"] > 0, stage
        assert (run / stage / "last.pt").exists() and (run / stage / "best_val.pt").exists(), stage
        val = [json.loads(l) for l in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert [l["iter"] for l in val if l["kind"] == "val"] == [1], stage
        # training crops of 896x512; validation on the full 2048x1024 frame (one image)
        assert inputs(record, stage, True) == {CROP_HW}, stage
        assert CITYSCAPES_HW in inputs(record, stage, False), stage
    for f in record["forwards"]:
        if f[0] in TRAINING and f[1]:
            batch, _, h, w = f[2]
            assert batch == 2 and f[3] == (2, 256, h // 4, w // 4) and f[4] == (2, len(classes), h // 4, w // 4)
    for k in (1, 2, 3):  # the frozen pseudo-labeller sees the same target crops
        assert inputs(record, f"stage{k}", False) == {CROP_HW, CITYSCAPES_HW}

    # anchors: two source frames at the released anchor size, in one batch of the released 4
    anchors_done = json.loads((run / "anchors" / "done.json").read_text())
    h, w = anchor_hw
    assert anchors_done["images"] == 2 and anchors_done["image_sizes_wh"] == [[w, h]]
    assert anchors_done["feature_sizes_wh"] == [[math.ceil(w / 4), math.ceil(h / 4)]]
    assert [f[2] for f in record["forwards"] if f[0] == "anchors"] == [(2, 3, h, w)]
    anchors, counts = load_anchors(run / "anchors" / "anchors.pt")
    assert anchors.shape == (len(classes), 256) and counts.shape == (len(classes),)
    assert torch.isfinite(anchors[counts > 0]).all() and (anchors[counts == 0] == 0).all()

    # evaluation: the final stage's last checkpoint (the headline), the validation image at full
    # resolution (every stage's checkpoint was already scored on it by its own validation)
    assert [f[2] for f in record["forwards"] if f[0] == "evaluate"] == [(1, 3, *CITYSCAPES_HW)]
    assert [f[4][-2:] for f in record["forwards"] if f[0] == "evaluate"] == [(256, 512)]
    summary = json.loads((run / "summary.json").read_text())
    assert [(r["stage"], r["checkpoint"], r["split"]) for r in summary["results"]] == [("stage3", "last", "val")]
    assert summary["headline"] == {"stage": "stage3", "checkpoint": "last", "split": "val"}
    assert sorted(summary["per_class_iou"]) == sorted(classes)  # summary.json sorts its keys
    for r in summary["results"]:
        assert sorted(r["per_class_iou"]) == sorted(classes) and 0.0 <= r["miou"] <= 1.0
    assert summary["peak_memory_gib"] > 1.0  # full-size activations, not a toy run
    assert summary["config"]["data"]["crop"] == [896, 512] and summary["config"]["model"]["output_stride"] == 16
    return summary


# ----------------------------------------------------------------------------- the data


def test_generated_data_has_the_real_sizes_and_formats(real_data):
    from PIL import Image
    import cv2

    gta5 = real_data / "gta5"
    assert [io.read_image(source_paths(gta5, i)[0]).shape[:2] for i in (0, 1)] == [GTA5_HW, GTA5_ODD_HW]
    for i in (0, 1):
        with Image.open(source_paths(gta5, i)[1]) as label:
            assert label.mode == "P" and label.size[::-1] == (GTA5_HW if i == 0 else GTA5_ODD_HW)
    raw = cv2.imread(str(synthia_paths(real_data / "synthia", 0)[1]), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape == (*SYNTHIA_HW, 3)
    assert io.read_image(synthia_paths(real_data / "synthia", 0)[0]).shape[:2] == SYNTHIA_HW
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            image, label = target_paths(real_data / "cityscapes", split, i)
            assert image.name.endswith("_leftImg8bit.png") and label.name.endswith("_gtFine_labelIds.png")
            assert io.read_image(image).shape[:2] == CITYSCAPES_HW
            assert io.read_index_label(label).shape == CITYSCAPES_HW


# ----------------------------------------------------------------------------- GTA5 -> Cityscapes


@pytest.fixture(scope="module")
def gta5_run(real_data, tmp_path_factory) -> dict:
    record = run_stages("gta5_to_cityscapes", real_data, tmp_path_factory.mktemp("runs"))
    yield record
    drop_checkpoints(record["run"])


def test_gta5_every_stage_at_real_size(gta5_run):
    summary = check_run(gta5_run, CLASSES_19, GTA5_HW)
    assert "miou13" not in summary["results"][0]


def test_paper_run_executes_the_chapters_on_the_finished_run(gta5_run, real_data):
    """``make paper-run``'s command on the same data and run directory: every stage is already
    done, so the chapters only read the run and analyse it in the paper profile."""
    run = gta5_run["run"]
    stamps = {s: (run / s / "done.json").stat().st_mtime_ns for s in stage_names(gta5_run["cfg"])}
    args = overrides("gta5_to_cityscapes", real_data, run.parent)
    started, cpu_started = time.time(), cpu_seconds()
    try:
        done = subprocess.run([sys.executable, "-m", "cag.book", "paper-run", "configs/gta5_to_cityscapes.yaml",
                               "--stage", "evaluate", *args], cwd=REPO, capture_output=True, text=True, timeout=3600)
    finally:
        drop_checkpoints(run)  # the last reader of the GTA5 run
    print(f"\npaper-run: {time.time() - started:.0f} s wall, {cpu_seconds() - cpu_started:.0f} s CPU")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    book = run / "book"
    record = json.loads((book / "run.json").read_text())
    print("chapters:", {n["name"]: n["seconds"] for n in record["notebooks"]})
    names = [n["name"] for n in record["notebooks"]]
    assert names == ["01_data.ipynb", "02_network.ipynb", "03_source_only_warmup.ipynb", "04_anchors.ipynb",
                     "05_pseudo_labels.ipynb", "06_losses.ipynb", "07_stages.ipynb"]
    assert record["profile"] == "paper" and record["until"] == "evaluate" and record["controls"] is False
    # no control run (chapter 3's warm-up without the adversarial term, chapter 6's stage 1
    # without the distance loss): the paper profile trains them only with --controls
    controls = [p.name for p in run.parent.iterdir() if p.name in (f"{run.name}-warmup-no-adv", f"{run.name}-stage1-no-distance")]
    assert not controls, controls
    assert record["overrides"]["eval.checkpoints"] == ["last"] and record["overrides"]["eval.stages"] == ["stage3"]
    assert not list(book.glob("*.failed.ipynb"))
    glued = {k: v for n in record["notebooks"] for k, v in n["glued"].items()}
    for key in ("miou_source_only", "miou_warmup", "anchor_dim", "val_stage3", "anchor_precision"):
        assert key in glued, key
    assert glued["anchor_dim"] == "256"
    import nbformat

    for name in names:
        nb = nbformat.read(book / name, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, name
    assert {s: (run / s / "done.json").stat().st_mtime_ns for s in stamps} == stamps  # nothing ran again


# ----------------------------------------------------------------------------- SYNTHIA -> Cityscapes


def test_synthia_every_stage_at_real_size(real_data, tmp_path):
    try:
        record = run_stages("synthia_to_cityscapes", real_data, tmp_path)
        summary = check_run(record, CLASSES_16, SYNTHIA_HW)
        for r in summary["results"]:
            assert 0.0 <= r["miou13"] <= 1.0
    finally:
        drop_checkpoints(tmp_path)


# ----------------------------------------------------------------------------- DeepLab-v2


def test_deeplabv2_runs_a_cag_iteration_at_real_size(real_data, tmp_path):
    """DeepLab-v2 (ResNet-101 at output stride 8, the paper's network): one real-size CAG
    iteration, started at stage 1 from a checkpoint as README's ``model.init`` recipe does
    (``source_only.iters=0 warmup.iters=0``; a random DeepLab-v2 state dict stands in for the
    authors' warm-up model): one anchor image, one CAG stage, batch 1 (no BatchNorm in its
    classifier)."""
    init = tmp_path / "deeplabv2_init.pth"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(DeepLabV2(num_classes=19).state_dict(), init)
    try:
        record = run_stages("gta5_to_cityscapes", real_data, tmp_path, "model.arch=deeplabv2", "model.output_stride=8",
                            f"model.init={init}", "source_only.iters=0", "warmup.iters=0", "cag.stages=1",
                            "eval.stages=[stage1]", "train.batch_size=1", "anchors.num_images=1", until="stage1")
        run = record["run"]
        for stage in ("source_only", "warmup"):
            assert json.loads((run / stage / "done.json").read_text())["skipped"], stage
        stage1 = json.loads((run / "stage1" / "summary.json").read_text())
        assert stage1["iters"] == 1 and stage1["peak_memory_gib"] > 0
        train = [json.loads(l) for l in (run / "stage1" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(l)["kind"] == "train"]
        assert len(train) == 1 and all(math.isfinite(train[0][k]) for k in ("total", "ce_source", "ce_target"))
        student = [f for f in record["forwards"] if f[0] == "stage1" and f[1]]
        assert [f[2] for f in student] == [(1, 3, *CROP_HW)] * 2  # source and target crop
        assert all(f[3] == (1, 2048, 64, 112) and f[4] == (1, 19, 64, 112) for f in student)
        assert [f[2] for f in record["forwards"] if f[0] == "anchors"] == [(1, 3, *GTA5_HW)]
        anchors, counts = load_anchors(run / "anchors" / "anchors.pt")
        assert anchors.shape == (19, 2048) and torch.isfinite(anchors[counts > 0]).all()
        assert not (run / "evaluate").exists()
    finally:
        drop_checkpoints(tmp_path)
