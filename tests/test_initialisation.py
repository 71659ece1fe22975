"""What a network starts from: ImageNet backbone weights required, and a start at stage 1.

A ResNet network that nothing initialises (no ``model.pretrained_backbone``, no ``model.init``)
is refused before any work, with the file it expects and how to get it; ``model.from_scratch``
is the explicit way to random weights. ``model.init=X source_only.iters=0 warmup.iters=0`` starts
CAG stage 1 from X itself (e.g. the authors' warm-up checkpoint): source-only and warm-up train
nothing, the anchors come from X, stage 1's student and pseudo-labeller hold exactly X's tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from cag import cli, stages
from cag.checkpoint import CheckpointError, load_checkpoint
from cag.config import ConfigError, load_config
from cag.models import DeepLabV3Plus
from cag.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = ["model.backbone=tiny", "model.output_stride=8", "model.feature_dim=8", "model.aspp_rates=[1,2,3]"]


def released(bench: Path, out: Path, *extra: str):
    """configs/gta5_to_cityscapes.yaml on the benchmark's files, as a user would start it."""
    return load_config(CONFIGS / "gta5_to_cityscapes.yaml", [
        f"data.source_root={bench / 'source'}", f"data.target_root={bench / 'target'}", f"out_dir={out}",
        "data.source_resize=null", "data.target_resize=null", "data.base_width=64", "data.crop=[64,32]",
        "data.num_workers=0", "anchors.resize=null", "quiet=true", "device=cpu", *extra])


# ----------------------------------------------------------------------------- backbone weights required


def test_a_resnet_run_without_backbone_weights_refuses_to_start(bench, tmp_path, capsys):
    cfg = released(bench, tmp_path)
    with pytest.raises(ConfigError) as err:
        Pipeline(cfg).run()
    message = str(err.value)
    for part in ("model.pretrained_backbone: not set", "resnet101 backbone would start from random weights",
                 "resnet101-63fe2227.pth", "resnet101-5d3b4d8f.pth",
                 "torchvision.models.resnet101(weights='IMAGENET1K_V1')", "torch hub cache",
                 "model.init=FILE", "model.from_scratch=true"):
        assert part in message, part
    assert not (tmp_path / "gta5_to_cityscapes").exists()  # refused before anything was written
    config_file = tmp_path / "gta.yaml"
    config_file.write_text((CONFIGS / "gta5_to_cityscapes.yaml").read_text())
    assert cli.main(["source_only", str(config_file), f"data.source_root={bench / 'source'}",
                     f"data.target_root={bench / 'target'}", f"out_dir={tmp_path}"]) == 2
    assert "model.pretrained_backbone: not set" in capsys.readouterr().err


@pytest.mark.parametrize("backbone, expected", [("resnet50", "resnet50-0676ba61.pth"),
                                                ("resnet18", "resnet18-f37072fd.pth")])
def test_every_resnet_needs_its_weights_to_build(backbone, expected):
    cfg = load_config(CONFIGS / "synthetic.yaml", [f"model.backbone={backbone}", "model.aspp_rates=null"])
    with pytest.raises(ConfigError, match=rf"model\.pretrained_backbone: not set, so the {backbone} backbone .*{expected}"):
        stages.make_model(cfg, torch.device("cpu"))


def test_tiny_from_scratch_and_init_need_no_backbone_file(tmp_path):
    tiny = load_config(CONFIGS / "synthetic.yaml")
    assert tiny.model.backbone == "tiny" and tiny.model.pretrained_backbone is None
    stages.check_initialisation(tiny)
    scratch = load_config(CONFIGS / "synthetic.yaml", ["model.backbone=resnet18", "model.from_scratch=true"])
    stages.make_model(scratch, torch.device("cpu"))
    resnet = load_config(CONFIGS / "gta5_to_cityscapes.yaml")
    stages.check_initialisation(resnet, init=tmp_path / "warmup.pt")


def test_from_scratch_and_a_backbone_file_contradict(tmp_path):
    weights = tmp_path / "resnet101-63fe2227.pth"
    weights.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model\.from_scratch: true contradicts model\.pretrained_backbone="):
        load_config(CONFIGS / "gta5_to_cityscapes.yaml", ["model.from_scratch=true", f"model.pretrained_backbone={weights}"])


def test_the_backbone_file_is_checked_and_named(tmp_path):
    wrong = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wrong)
    cfg = load_config(CONFIGS / "synthetic.yaml", ["model.backbone=resnet18", "model.aspp_rates=null",
                                                    f"model.pretrained_backbone={wrong}"])
    with pytest.raises(CheckpointError) as err:
        stages.make_model(cfg, torch.device("cpu"))
    message = str(err.value)
    assert str(wrong) in message
    assert "layer1.0.conv3.weight" in message  # a resnet50 key the resnet18 does not have
    assert "conv1.weight (file [64, 64, 1, 1], model [64, 64, 3, 3])" in message
    assert "expected torchvision's ImageNet resnet18 weights (resnet18-f37072fd.pth or resnet18-5c106cde.pth)" in message


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_the_backbone_file_goes_through_the_safe_loader(tmp_path, capsys):
    crafted = tmp_path / "resnet18-f37072fd.pth"
    torch.save({"conv1.weight": _Exploit()}, crafted)
    cfg = load_config(CONFIGS / "synthetic.yaml", ["model.backbone=resnet18", "model.aspp_rates=null",
                                                    f"model.pretrained_backbone={crafted}"])
    with pytest.raises(CheckpointError, match=rf"{crafted}: refused to load"):
        stages.make_model(cfg, torch.device("cpu"))
    assert "this must never run" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- starting at stage 1


def test_no_source_only_no_warmup_and_no_init_is_refused():
    with pytest.raises(ConfigError, match=r"model\.init: source_only\.iters and warmup\.iters are both 0"):
        load_config(CONFIGS / "synthetic.yaml", ["source_only.iters=0", "warmup.iters=0"])


def test_stage1_starts_exactly_from_the_init_checkpoint(bench, tmp_path, monkeypatch):
    torch.manual_seed(7)
    warm = DeepLabV3Plus(19, output_stride=8, backbone="tiny", feature_dim=8, aspp_rates=(1, 2, 3))
    for module in warm.modules():  # BatchNorm statistics unlike a fresh network's, so a fresh start would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = tmp_path / "authors_warmup.pkl"  # the released format: {"DeepLab": {"model_state": ...}, ...}
    torch.save({"DeepLab": {"model_state": warm.state_dict(), "optimizer_state": {}, "iter": 20000},
                "best_iou": 0.4}, x)
    expected = {key: value.clone() for key, value in warm.state_dict().items()}
    cfg = released(bench, tmp_path / "runs", *TINY, f"model.init={x}", "source_only.iters=0", "warmup.iters=0",
                   "train.batch_size=2", "train.val_interval=1", "train.val_max_images=1", "eval.batch_size=2",
                   "anchors.num_images=4", "anchors.batch_size=2", "anchors.min_pixels=1", "cag.stages=1",
                   "cag.iters=1", "cag.min_pixels=1")
    seen = []
    real = stages.cag_train_step

    def spy(cfg, student, teacher, *args, **kwargs):
        if not seen:
            seen.append(({k: v.detach().clone() for k, v in student.state_dict().items()},
                         {k: v.detach().clone() for k, v in teacher.state_dict().items()}, teacher.training))
        return real(cfg, student, teacher, *args, **kwargs)

    monkeypatch.setattr(stages, "cag_train_step", spy)
    pipeline = Pipeline(cfg)
    pipeline.run()

    for stage, reason in (("source_only", "source_only.iters is 0"), ("warmup", "warmup.iters is 0")):
        record = json.loads((pipeline.stage_dir(stage) / "done.json").read_text())
        assert record["skipped"] == reason
        trained = sorted(p.name for p in pipeline.stage_dir(stage).iterdir() if p.name not in ("done.json", "fingerprint"))
        assert trained == [], f"{stage} wrote {trained}"
    assert pipeline.model_of("warmup") == x
    assert load_checkpoint(pipeline.stage_dir("anchors") / "anchors.pt")["meta"]["model"] == str(x)
    student, teacher, teacher_training = seen[0]
    for name, state in (("student", student), ("pseudo-labeller", teacher)):
        assert state.keys() == expected.keys(), name
        for key, value in expected.items():
            assert torch.equal(state[key], value), f"{name} {key}"
    assert teacher_training is False
    assert json.loads((pipeline.stage_dir("stage1") / "summary.json").read_text())["init"] == str(x)
    summary = json.loads((pipeline.run_dir / "summary.json").read_text())
    assert {r["stage"] for r in summary["results"]} == {"stage1"}  # nothing trained before stage 1 is scored
