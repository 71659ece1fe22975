"""Typed run configuration: YAML files in ``configs/`` plus ``key=value`` overrides.

Every field has a type and a default; :func:`load_config` rejects unknown keys, wrong types and
impossible values before any work starts, naming the key and what is allowed. The released
schedule's values are in docs/method.md §9; ``configs/gta5_to_cityscapes.yaml`` spells
them out.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserInputError


class ConfigError(UserInputError, ValueError):
    """A configuration key is unknown, has the wrong type or an impossible value."""

    kind = "configuration error"
    same_on_every_rank = True


@dataclass
class SyntheticConfig:
    """The built-in benchmark (``cag.data.synthetic``), generated into ``root`` when it is set.

    The generator writes ``root/source`` in the GTA5 layout and ``root/target`` in the Cityscapes
    layout, so ``data.source_root``/``data.target_root`` point there and the real loaders read it.
    """

    root: typing.Optional[str] = None
    #: Scene version (cag.data.synthetic.VERSIONS): 1 = the book's 12-class benchmark, 2 = the
    #: benchmark table's 17 classes and five shift components (docs/data.md §7).
    version: int = 1
    preset: str = "class"
    strength: typing.Optional[float] = None
    size: list[int] = field(default_factory=lambda: [64, 128])
    n_source: int = 600
    n_target_train: int = 600
    n_target_val: int = 100
    n_target_test: int = 200


@dataclass
class DataConfig:
    """Datasets and the augmentation of docs/data.md §6."""

    source: str = "gta5"
    source_root: str = "data/gta5"
    source_list: typing.Optional[str] = None
    target: str = "cityscapes"
    target_root: str = "data/cityscapes"
    target_train_list: typing.Optional[str] = None
    val_split: str = "val"
    test_split: typing.Optional[str] = None
    #: Read the target train labels to log pseudo-label precision (monitoring only, never a loss).
    target_train_labels: bool = False
    num_classes: int = 19
    source_resize: typing.Optional[list[int]] = field(default_factory=lambda: [1914, 1052])
    target_resize: typing.Optional[list[int]] = field(default_factory=lambda: [2048, 1024])
    base_width: int = 2200
    scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    crop: list[int] = field(default_factory=lambda: [896, 512])
    flip: float = 0.5
    normalize: str = "none"
    num_workers: int = 4
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """The network (docs/method.md §11) and what its weights start from.

    A ResNet backbone starts from ``pretrained_backbone`` (torchvision's ImageNet weights, as the
    released code always does), or the whole network from ``init`` (a project or released
    checkpoint); a run refuses to start with neither (:func:`cag.stages.check_initialisation`) unless
    ``from_scratch`` asks for random weights on purpose. The ``tiny`` backbone of the built-in
    benchmark has no ImageNet weights and always starts from scratch.
    """

    arch: str = "deeplabv3plus"
    backbone: str = "resnet101"
    output_stride: int = 16
    feature_dim: int = 256
    aspp_rates: typing.Optional[list[int]] = None
    pretrained_backbone: typing.Optional[str] = None
    init: typing.Optional[str] = None
    from_scratch: bool = False


@dataclass
class TrainConfig:
    """Optimisation shared by every stage (docs/method.md §7 and §9)."""

    batch_size: int = 4
    momentum: float = 0.9
    weight_decay: float = 2e-4
    poly_power: float = 0.9
    val_interval: int = 1000
    val_max_images: typing.Optional[int] = None
    log_interval: int = 50
    checkpoint_interval: int = 1000
    grad_accum: int = 1
    #: The numerics of every stage, one switch (:data:`PRECISIONS`): ``released`` is float32 with
    #: TF32 off, NCHW and eager, as the released code ran; ``fast`` turns on bf16 autocast, TF32,
    #: channels-last and torch.compile together; ``custom`` lets the four keys below decide.
    precision: str = "released"
    #: Filled in from ``precision`` (``python -m cag config`` shows them); set only with ``custom``.
    amp: typing.Optional[str] = None
    tf32: typing.Optional[bool] = None
    channels_last: typing.Optional[bool] = None
    compile: typing.Optional[bool] = None
    select: str = "best_val"
    nan_policy: str = "stop"
    max_nan_skips: int = 10


@dataclass
class SourceOnlyConfig:
    """Step 2a of docs/method.md §8: supervised training on the source domain."""

    iters: int = 20000
    lr: float = 2.5e-4
    poly_horizon: typing.Optional[int] = None


@dataclass
class WarmupConfig:
    """Step 2b of docs/method.md §8: global output-space adversarial alignment (a reconstruction)."""

    iters: int = 20000
    lr: float = 2.5e-4
    head_lr_mult: float = 10.0
    poly_horizon: typing.Optional[int] = None
    lr_d: float = 1e-4
    lambda_adv: float = 0.01
    gan: str = "bce"
    disc_channels: int = 64
    freeze_bn: bool = False


@dataclass
class AnchorsConfig:
    """Category-anchor computation (docs/method.md §2)."""

    mode: str = "faithful"
    min_pixels: int = 10
    count_cap: int = 3000
    num_images: typing.Optional[int] = 11888
    batch_size: int = 4
    resize: typing.Optional[list[int]] = field(default_factory=lambda: [1914, 1052])
    recompute_per_stage: bool = False
    file: typing.Optional[str] = None


@dataclass
class CAGConfig:
    """The CAG stages (docs/method.md §3-§8)."""

    stages: int = 3
    iters: int = 62412
    poly_horizon: int = 90000
    lr: float = 1e-4
    delta_d: float = 2.5
    prob_threshold: float = 0.95
    pseudo_labels: str = "both"
    distance_loss: str = "faithful"
    lam: float = 0.7
    min_pixels: int = 10
    fuse_forward: bool = False


@dataclass
class EvalConfig:
    """Evaluation protocol (docs/method.md §12): full resolution, single scale by default.

    ``checkpoints`` names the checkpoints of each training stage that the ``evaluate`` stage
    scores: ``last`` and/or ``best_val`` (both by default; the headline is ``last`` when it is
    scored, else ``best_val``). ``stages`` names the training stages it scores (None: every one
    that trained); it must include the final one (the last CAG stage, or the warm-up when
    ``cag.stages`` is 0), whose score is the run's headline.
    """

    batch_size: int = 1
    flip: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0])
    resize: typing.Optional[list[int]] = None
    checkpoints: list[str] = field(default_factory=lambda: ["last", "best_val"])
    stages: typing.Optional[list[str]] = None


@dataclass
class Config:
    """A whole run: ``python -m cag run CONFIG [key=value ...]``."""

    name: str = "run"
    out_dir: str = "runs"
    seed: int = 1337
    device: str = "auto"
    quiet: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source_only: SourceOnlyConfig = field(default_factory=SourceOnlyConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    anchors: AnchorsConfig = field(default_factory=AnchorsConfig)
    cag: CAGConfig = field(default_factory=CAGConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """A short hash of the named top-level sections (or fields), for stage fingerprints."""
        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: The checkpoints of a training stage that ``eval.checkpoints`` can name.
CHECKPOINT_KINDS = ("last", "best_val")

CHOICES = {
    "data.source": ("gta5", "synthia"),
    "data.target": ("cityscapes",),
    "data.num_classes": (19, 16, 13),
    "data.normalize": ("none", "imagenet"),
    "data.synthetic.preset": ("global", "class", "full"),
    "data.synthetic.version": (1, 2),
    "model.arch": ("deeplabv3plus", "deeplabv2"),
    "model.backbone": ("resnet101", "resnet50", "resnet18", "tiny"),
    "model.output_stride": (8, 16),
    "train.amp": ("none", "bf16"),
    "train.nan_policy": ("stop", "skip"),
    "train.select": ("best_val", "last"),
    "warmup.gan": ("bce", "lsgan"),
    "anchors.mode": ("faithful", "global"),
    "cag.pseudo_labels": ("both", "anchor", "probability"),
    "cag.distance_loss": ("faithful", "pixel_l2"),
}

POSITIVE = {
    "train.batch_size", "train.val_interval", "train.log_interval", "train.checkpoint_interval",
    "train.grad_accum", "anchors.batch_size", "anchors.count_cap", "eval.batch_size",
    "model.feature_dim", "cag.poly_horizon", "data.synthetic.n_source",
    "data.synthetic.n_target_train", "data.synthetic.n_target_val",
}
NON_NEGATIVE = {
    "source_only.iters", "warmup.iters", "cag.iters", "cag.stages", "cag.delta_d", "cag.lam",
    "cag.min_pixels", "anchors.min_pixels", "data.num_workers", "warmup.lambda_adv",
    "train.weight_decay", "train.max_nan_skips", "data.synthetic.n_target_test",
}
POSITIVE_FLOAT = {"source_only.lr", "warmup.lr", "warmup.lr_d", "cag.lr"}
#: Optional counts: None means "the default" (the stage length, every image); a number must be > 0.
POSITIVE_IF_SET = {"source_only.poly_horizon", "warmup.poly_horizon", "train.val_max_images", "anchors.num_images"}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(inner)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{prefix}{key}': allowed keys are {', '.join(names)}{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    obj = cls(**kwargs)
    for name in names:
        if dataclasses.is_dataclass(hints[name]) and name not in values:
            setattr(obj, name, _build(hints[name], {}, prefix + name + "."))
    return obj


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


#: What each ``train.precision`` turns on; ``custom`` starts from ``released`` and takes the keys set.
PRECISIONS = {
    "released": {"amp": "none", "tf32": False, "channels_last": False, "compile": False},
    "fast": {"amp": "bf16", "tf32": True, "channels_last": True, "compile": True},
}
_PRECISION_WORDS = {"released": "float32, TF32 off, NCHW, no torch.compile",
                    "fast": "bf16 autocast, TF32 on, channels-last, torch.compile"}


def resolve_precision(cfg: Config) -> None:
    """Fill in ``train.amp``/``tf32``/``channels_last``/``compile`` from ``train.precision``.

    ``released`` and ``fast`` fix all four; a key set to another value than the preset's is
    refused (it would make the name lie). ``custom`` takes the keys that are set and the
    ``released`` value for the others.
    """
    train = cfg.train
    if train.precision not in (*PRECISIONS, "custom"):
        raise ConfigError(f"train.precision: {train.precision!r} is not one of released ({_PRECISION_WORDS['released']}), "
                          f"fast ({_PRECISION_WORDS['fast']}), custom (train.amp, train.tf32, train.channels_last, "
                          "train.compile one by one)")
    if train.amp is not None and train.amp not in ("none", "bf16"):
        raise ConfigError(f"train.amp: {train.amp!r} is not one of none, bf16")
    for key, value in PRECISIONS.get(train.precision, PRECISIONS["released"]).items():
        current = getattr(train, key)
        if current is None:
            setattr(train, key, value)
        elif train.precision != "custom" and current != value:
            raise ConfigError(
                f"train.{key}: {current!r} contradicts train.precision={train.precision} "
                f"({_PRECISION_WORDS[train.precision]}); set train.precision=fast for all the fast settings "
                "at once, or train.precision=custom to choose train.amp, train.tf32, train.channels_last and "
                "train.compile one by one")


def validate(cfg: Config) -> Config:
    """Reject impossible values (docs/method.md §9 gives the sensible ranges)."""
    resolve_precision(cfg)
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(map(str, allowed))}")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)}")
    for key in POSITIVE_FLOAT:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)}")
    for key in POSITIVE_IF_SET:
        if _get(cfg, key) is not None and _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0 when set, got {_get(cfg, key)}")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"train.grad_accum: {cfg.train.grad_accum} does not divide train.batch_size "
                          f"{cfg.train.batch_size} (each step accumulates equal micro-batches)")
    if not 0.0 < cfg.cag.prob_threshold < 1.0:
        raise ConfigError(f"cag.prob_threshold: must lie in (0, 1), got {cfg.cag.prob_threshold}")
    if not 0.0 <= cfg.data.flip <= 1.0:
        raise ConfigError(f"data.flip: a probability in [0, 1], got {cfg.data.flip}")
    for key in ("data.crop", "data.scale", "data.source_resize", "data.target_resize", "anchors.resize",
                "eval.resize", "data.synthetic.size"):
        value = _get(cfg, key)
        if value is not None and (len(value) != 2 or min(value) <= 0):
            raise ConfigError(f"{key}: expected two positive numbers, got {value}")
    low, high = cfg.data.scale
    if low > high:
        raise ConfigError(f"data.scale: expected [low, high] with low <= high, got {cfg.data.scale}")
    if not cfg.eval.scales or min(cfg.eval.scales) <= 0:
        raise ConfigError(f"eval.scales: expected positive scale factors, got {cfg.eval.scales}")
    kinds = cfg.eval.checkpoints
    if not kinds or any(k not in CHECKPOINT_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ConfigError(f"eval.checkpoints: expected one or both of {', '.join(CHECKPOINT_KINDS)} "
                          f"without repeats, got {kinds}")
    if cfg.eval.stages is not None:
        training = ["source_only", "warmup", *[f"stage{k}" for k in range(1, cfg.cag.stages + 1)]]
        final = training[-1]
        stages = cfg.eval.stages
        if not stages or any(s not in training for s in stages) or len(set(stages)) != len(stages) \
                or final not in stages:
            raise ConfigError(f"eval.stages: expected training stages among {', '.join(training)} without "
                              f"repeats, including the final one ({final}, the run's headline); got {stages}")
    crop_w, crop_h = cfg.data.crop
    widest = cfg.data.base_width * high
    if crop_w > widest:
        raise ConfigError(f"data.crop: width {crop_w} exceeds the widest scaled image "
                          f"(data.base_width {cfg.data.base_width} x data.scale {high} = {widest:g})")
    if cfg.warmup.iters > 0 and min(cfg.data.crop) < 32:
        raise ConfigError(f"data.crop: {cfg.data.crop} is too small for the warm-up discriminator, which "
                          "downsamples by 32; use a crop of at least 32 x 32 or warmup.iters=0")
    for key in ("data.source_resize", "data.target_resize"):
        size = _get(cfg, key)
        if size is not None and crop_h > widest * size[1] / size[0]:
            raise ConfigError(f"data.crop: height {crop_h} exceeds the tallest scaled image "
                              f"({widest:g} wide at the aspect of {key}={size})")
    if cfg.train.val_interval <= 0 or cfg.train.checkpoint_interval <= 0:
        raise ConfigError("train.val_interval and train.checkpoint_interval must be > 0")
    for key in ("model.pretrained_backbone", "model.init", "anchors.file"):
        path = _get(cfg, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{key}: file not found: {path}")
    if cfg.model.from_scratch and cfg.model.pretrained_backbone is not None:
        raise ConfigError(f"model.from_scratch: true contradicts model.pretrained_backbone="
                          f"{cfg.model.pretrained_backbone}; set one of them")
    if cfg.source_only.iters == 0 and cfg.warmup.iters == 0 and cfg.model.init is None:
        raise ConfigError("model.init: source_only.iters and warmup.iters are both 0, so nothing trains the model "
                          "that the anchors and CAG stage 1 start from; set model.init=CHECKPOINT (e.g. the "
                          "authors' warm-up checkpoint)")
    if cfg.model.arch == "deeplabv2" and cfg.model.output_stride != 8:
        raise ConfigError("model.output_stride: DeepLab-v2 runs at output stride 8; set model.output_stride=8")
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"name: a plain directory name is expected, got {cfg.name!r}")
    return cfg


def parse_override(text: str) -> tuple[list[str], object]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. cag.delta_d=2.0")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def merge(base: dict, path: list[str], value) -> None:
    node = base
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def from_dict(values: dict) -> Config:
    """Build and validate a :class:`Config` from nested plain values."""
    if not isinstance(values, dict):
        raise ConfigError(f"a configuration is a mapping of sections, got {type(values).__name__}")
    return validate(_build(Config, values))


def load_config(path=None, overrides=(), params: dict | None = None) -> Config:
    """Read a YAML file, apply ``key=value`` overrides and flat ``params`` (papermill), validate."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"configuration file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        merge(values, keys, value)
    for key, value in (params or {}).items():
        merge(values, key.split("."), value)
    try:
        return from_dict(values)
    except ConfigError as err:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{err}{where}") from None
