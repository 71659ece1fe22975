"""One switch for the numerics (``train.precision``) and the measured effect of bf16 (``cag.precision``).

The released configurations run float32 with TF32 off, no channels-last and no torch.compile;
``train.precision=fast`` turns all four fast settings on; every place that reads them follows
the switch (config, ``python -m cag config``, the backend flags, the model, autocast, the stages).
The TF32 flags are process-wide and settable without a GPU, so ``seed_everything`` is checked with
a CUDA device argument on the CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cag import cli, stages
from cag.anchors import load_anchors, save_anchors
from cag.checkpoint import save_checkpoint
from cag.config import ConfigError, load_config
from cag.data.synthetic import generate
from cag.losses import cag_loss
from cag.pipeline import Pipeline
from cag.precision import bf16_effect
from cag.pseudo_labels import anchor_pseudo_labels, probability_pseudo_labels

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = {"amp": "bf16", "tf32": True, "channels_last": True, "compile": True}
RELEASED = {"amp": "none", "tf32": False, "channels_last": False, "compile": False}
TINY = {"model.backbone": "tiny", "model.output_stride": 8, "model.feature_dim": 8, "model.aspp_rates": [1, 2, 3],
        "data.num_classes": 19, "device": "cpu", "quiet": True}


def settings(train) -> dict:
    return {key: getattr(train, key) for key in FAST}


@pytest.fixture
def restore_backend_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = saved[:3]
    torch.use_deterministic_algorithms(saved[3], warn_only=saved[4])


# ----------------------------------------------------------------------------- the switch


@pytest.mark.parametrize("name", ["gta5_to_cityscapes", "synthia_to_cityscapes", "synthetic"])
def test_the_shipped_configurations_run_the_released_numerics(name):
    train = load_config(CONFIGS / f"{name}.yaml").train
    assert train.precision == "released"
    assert settings(train) == RELEASED


@pytest.mark.parametrize("name", ["gta5_to_cityscapes", "synthia_to_cityscapes"])
def test_fast_turns_on_every_fast_setting(name):
    assert settings(load_config(CONFIGS / f"{name}.yaml", ["train.precision=fast"]).train) == FAST


def test_custom_takes_the_keys_set_and_the_released_value_for_the_others():
    train = load_config(CONFIGS / "synthetic.yaml", ["train.precision=custom", "train.amp=bf16", "train.tf32=true"]).train
    assert settings(train) == {"amp": "bf16", "tf32": True, "channels_last": False, "compile": False}


@pytest.mark.parametrize("precision, key, value", [
    ("released", "amp", "bf16"), ("released", "tf32", "true"), ("released", "channels_last", "true"),
    ("released", "compile", "true"), ("fast", "compile", "false"), ("fast", "amp", "none"),
])
def test_a_key_that_contradicts_the_switch_is_refused(precision, key, value):
    with pytest.raises(ConfigError, match=rf"train\.{key}: .* contradicts train\.precision={precision} .*"
                                          r"train\.precision=custom"):
        load_config(CONFIGS / "gta5_to_cityscapes.yaml", [f"train.precision={precision}", f"train.{key}={value}"])


def test_a_key_equal_to_the_switch_is_accepted():
    assert settings(load_config(CONFIGS / "gta5_to_cityscapes.yaml", ["train.amp=none"]).train) == RELEASED


def test_an_unknown_precision_names_the_three_choices():
    with pytest.raises(ConfigError, match=r"train\.precision: 'bf16' is not one of released .* fast .* custom"):
        load_config(CONFIGS / "synthetic.yaml", ["train.precision=bf16"])


def test_python_m_cag_config_shows_the_settings_in_effect(capsys):
    assert cli.main(["config", str(CONFIGS / "gta5_to_cityscapes.yaml"), "train.precision=fast"]) == 0
    shown = json.loads(capsys.readouterr().out)["train"]
    assert {key: shown[key] for key in FAST} == FAST and shown["precision"] == "fast"
    assert cli.main(["config", str(CONFIGS / "gta5_to_cityscapes.yaml")]) == 0
    shown = json.loads(capsys.readouterr().out)["train"]
    assert {key: shown[key] for key in FAST} == RELEASED


# ----------------------------------------------------------------------------- what reads it


def test_seed_everything_leaves_tf32_off_on_cuda_unless_asked(restore_backend_flags):
    # PyTorch allows TF32 in cuDNN convolutions by default, and an earlier run may have left both on.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    flags = stages.seed_everything(0, torch.device("cuda"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    assert flags == {"cudnn.benchmark": True, "cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": False}
    stages.seed_everything(0, torch.device("cuda"), tf32=True)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)


def test_backend_flags_on_the_cpu_do_not_touch_tf32(restore_backend_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    assert stages.backend_flags("cpu", tf32=False) == {"deterministic_algorithms": True}
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)


def test_the_model_follows_the_switch(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    for precision, expected in (("released", False), ("fast", True)):
        cfg = load_config(CONFIGS / "synthetic.yaml", params={**TINY, "train.precision": precision})
        model = stages.make_model(cfg, torch.device("cpu"))
        weight = model.backbone.conv1.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) is expected and weight.shape[-1] > 1
        assert (model in compiled) is expected


def test_autocast_follows_the_switch():
    for precision, expected in (("released", False), ("fast", True)):
        cfg = load_config(CONFIGS / "synthetic.yaml", params={**TINY, "train.precision": precision})
        with stages.autocast(cfg, torch.device("cpu")):
            assert torch.is_autocast_enabled("cpu") is expected
            if expected:
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    generate(root, preset="class", size=(32, 64), n_source=4, n_target_train=4, n_target_val=2, n_target_test=0,
             progress=False)
    return root


def tiny_run(bench: Path, out: Path, **params):
    return load_config(params={
        **TINY, "name": "tiny", "out_dir": str(out), "data.source_root": str(bench / "source"),
        "data.target_root": str(bench / "target"), "data.source_resize": None, "data.target_resize": None,
        "data.base_width": 64, "data.scale": [1.0, 1.0], "data.crop": [64, 32], "data.num_workers": 0,
        "train.batch_size": 2, "train.val_interval": 1, "train.val_max_images": 1, "eval.batch_size": 1,
        "source_only.iters": 1, **params})


def test_the_stages_pass_the_switch_to_the_backend_flags(bench, tmp_path, monkeypatch, restore_backend_flags):
    calls = []
    real = stages.backend_flags
    monkeypatch.setattr(stages, "backend_flags", lambda device_type, tf32=False: calls.append(tf32) or real(device_type, tf32))
    Pipeline(tiny_run(bench, tmp_path / "custom", **{"train.precision": "custom", "train.tf32": True})).run(until="source_only")
    assert calls == [True]
    Pipeline(tiny_run(bench, tmp_path / "released")).run(until="source_only")
    assert calls == [True, False]


@pytest.mark.cuda
def test_on_cuda_the_model_sets_the_tf32_flags_of_the_switch(restore_backend_flags):
    for precision, expected in (("released", False), ("fast", True)):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not expected
        cfg = load_config(CONFIGS / "synthetic.yaml", params={**TINY, "train.precision": precision, "device": "cuda"})
        stages.make_model(cfg, torch.device("cuda"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (expected, expected)


# ----------------------------------------------------------------------------- the effect of bf16


@pytest.fixture
def measured_setup(tmp_path):
    """A tiny network, 19 anchors drawn from its own source features, 8 target and 8 source images."""
    cfg = load_config(CONFIGS / "synthetic.yaml", params={**TINY, "cag.min_pixels": 1, "cag.delta_d": 0.05})
    torch.manual_seed(0)
    model = stages.make_model(cfg, torch.device("cpu")).eval()
    checkpoint = tmp_path / "start.pt"
    save_checkpoint(checkpoint, {"model": model.state_dict()})
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(8, 3, 32, 64, generator=generator)
    source = torch.rand(8, 3, 32, 64, generator=generator)
    labels = torch.randint(0, 19, (8, 32, 64), generator=generator)
    with torch.no_grad():
        features, _ = model(source)
    pixels = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    anchors = pixels[torch.randperm(len(pixels), generator=generator)[:19]]
    counts = torch.full((19,), 10.0)
    counts[3] = 0  # a class without anchor: out of the active-target test
    save_anchors(tmp_path / "anchors.pt", anchors, counts)
    return cfg, model, checkpoint, tmp_path / "anchors.pt", target, source, labels


def test_bf16_effect_reports_what_cag_loss_and_the_pseudo_labellers_give(measured_setup):
    cfg, model, checkpoint, anchors_path, target, source, labels = measured_setup
    anchors, counts = load_anchors(anchors_path)
    report = bf16_effect(cfg, checkpoint, anchors_path, target, source, labels, batch_size=4)
    assert report["images"] == 8 and report["pixels"] == 8 * 8 * 16  # 32x64 images, features at stride 4
    expected_losses, maps, batch_totals = {}, {}, {}
    for name, context in (("fp32", torch.autocast("cpu", enabled=False)), ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        totals, maps[name], batch_totals[name] = {}, [], []
        for part in (slice(0, 4), slice(4, 8)):
            with torch.no_grad(), context:
                ft, lt = model(target[part])
                fs, ls = model(source[part])
            anchor_labels = anchor_pseudo_labels(ft.float(), anchors, cfg.cag.delta_d, valid=counts > 0)
            prob_labels = probability_pseudo_labels(lt.float(), cfg.cag.prob_threshold)
            maps[name].append((anchor_labels, prob_labels))
            losses = cag_loss(ls.float(), labels[part], fs.float(), lt.float(), ft.float(), anchors, anchor_labels,
                              prob_labels, lam=cfg.cag.lam, min_pixels=cfg.cag.min_pixels, anchor_valid=counts > 0)
            for term, value in losses.items():
                totals[term] = totals.get(term, 0.0) + float(value) / 2
            batch_totals[name].append(float(losses["total"]))
        expected_losses[name] = totals
    for name in ("fp32", "bf16"):
        for term, value in report["losses"][name].items():
            assert value == pytest.approx(expected_losses[name][term], rel=1e-5, abs=1e-7), (name, term)
    changed_anchor = sum(int((a[0] != b[0]).sum()) for a, b in zip(maps["fp32"], maps["bf16"]))
    changed_prob = sum(int((a[1] != b[1]).sum()) for a, b in zip(maps["fp32"], maps["bf16"]))
    assert report["anchor_label_changed"] == changed_anchor / 1024
    assert report["probability_label_changed"] == changed_prob / 1024
    fp32, bf16 = report["losses"]["fp32"]["total"], report["losses"]["bf16"]["total"]
    assert report["loss_relative_difference"]["total"] == pytest.approx(abs(bf16 - fp32) / abs(fp32))
    worst = max(abs(b - f) / abs(f) for f, b in zip(batch_totals["fp32"], batch_totals["bf16"]))
    assert worst > 0 and report["loss_max_batch_relative_difference"]["total"] == pytest.approx(worst, abs=1e-5)


def test_bf16_effect_of_a_precision_against_itself_is_zero(measured_setup, monkeypatch):
    import cag.precision

    cfg, _, checkpoint, anchors_path, target, source, labels = measured_setup
    same = cag.precision._numerics
    monkeypatch.setattr(cag.precision, "_numerics", lambda cfg, amp: same(cfg, "none"))
    report = bf16_effect(cfg, checkpoint, anchors_path, target, source, labels, batch_size=4)
    assert report["anchor_label_changed"] == report["probability_label_changed"] == 0.0
    assert set(report["loss_relative_difference"].values()) == {0.0}
    assert report["active_fraction"]["fp32"] == report["active_fraction"]["bf16"] > 0


def test_bf16_effect_refuses_fewer_images_than_a_batch(measured_setup):
    cfg, _, checkpoint, anchors_path, target, source, labels = measured_setup
    with pytest.raises(ValueError, match="need at least batch_size=16"):
        bf16_effect(cfg, checkpoint, anchors_path, target, source, labels, batch_size=16)
