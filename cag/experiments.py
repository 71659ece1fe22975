"""Experiment files (``configs/experiments/*.yaml``): reading, checking and dispatching them, and
what their runners share.

``python -m cag experiments FILE [key=value ...]`` runs one file through :func:`run`. Its ``kind``
says what it is:

* ``kind: calibration`` (``configs/experiments/calibration_v2.yaml``): the calibration of the
  built-in benchmark's presets on target val, :mod:`cag.calibration`;
* ``kind: benchmark_v2`` (``configs/experiments/benchmark_v2.yaml``): the benchmark table on the
  held-out test split, :mod:`cag.benchmark_table`.

Both plan their runs and jobs with :mod:`cag.benchmark_runs` and are resumable across sessions
and machines through a committed cache of scored units (``<results_dir>/scores/``,
:mod:`cag.score_cache`); their results files (``results/benchmark/``, ``results/README.md``) are
read back by :mod:`cag.results` and shown in the book's chapter 8. This module holds what both
runners use: a run's configuration (:func:`run_config`), the target-trained oracle
(:func:`train_oracle`), scoring (:func:`score`), the writers of the results files
(:func:`write_csv`, :func:`write_runs`), the pseudo-label counts of a run's stage labellers
(``pseudo_labels.csv``); and the paper's published tables.

Version 1 of the benchmark (``kind: benchmark`` and its ``kind: calibration`` file, results in
``results/*.csv``) was removed; it lives in git history (``results/README.md`` names the commit).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import yaml

from .config import Config, ConfigError, load_config
from .labels import class_names

#: Leading columns of ``summary.csv`` (one column per class follows) and of ``pseudo_labels.csv``.
SUMMARY_KEYS = ("preset", "arm", "seed", "checkpoint", "miou")
PSEUDO_LABEL_KEYS = ("preset", "arm", "seed", "stage", "rule", "class", "ground_truth_pixels", "assigned_pixels",
                     "correct_pixels", "labelled_pixels", "precision", "recall", "coverage")

_SPEC_KEYS = {
    "calibration": {"kind", "base", "runs_dir", "data_dir", "results_dir", "seeds", "overrides", "grid", "oracle_grid",
                    "split", "jobs", "plateau", "adabn", "oracle"},
    "benchmark_v2": {"kind", "base", "runs_dir", "data_dir", "results_dir", "eval_split", "jobs", "overrides", "presets",
                     "warmup_arms", "arms", "sweeps", "comparisons", "pseudo_label_arms", "oracle"},
}
_REQUIRED_KEYS = {
    "calibration": ("base", "runs_dir", "data_dir", "results_dir", "seeds", "grid"),
    "benchmark_v2": ("base", "runs_dir", "data_dir", "results_dir", "presets", "warmup_arms"),
}
#: Kinds that existed once, with what replaced them.
_REMOVED_KINDS = {"benchmark": "the version-1 benchmark table was removed (results/README.md says where it lives in "
                               "git history); kind: benchmark_v2 (configs/experiments/benchmark_v2.yaml) replaces it"}


# ----------------------------------------------------------------------------- specification


def load_spec(path) -> dict:
    """Read and check an experiment file (``configs/experiments/*.yaml``); paths stay as written.

    Unknown keys and a missing base configuration are refused with the file and key named. The
    file's path is kept as ``spec["_file"]`` for the messages of the kind-specific checks
    (:func:`cag.calibration.check_calibration_spec`, :func:`cag.benchmark_table.check_benchmark_spec`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    kinds = ", ".join(_SPEC_KEYS)
    if isinstance(spec, dict) and spec.get("kind") in _REMOVED_KINDS:
        raise ConfigError(f"{path}: kind: {spec['kind']}: {_REMOVED_KINDS[spec['kind']]}; the kinds are: {kinds}")
    if not isinstance(spec, dict) or spec.get("kind") not in _SPEC_KEYS:
        raise ConfigError(f"{path}: expected a mapping with kind: one of {kinds}")
    unknown = set(spec) - _SPEC_KEYS[spec["kind"]]
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS[spec['kind']])}")
    for key in _REQUIRED_KEYS[spec["kind"]]:
        if key not in spec:
            raise ConfigError(f"{path}: missing key {key!r}")
    if not Path(spec["base"]).is_file():
        raise ConfigError(f"{path}: base configuration not found: {spec['base']}")
    if "seeds" in spec and (not isinstance(spec["seeds"], list) or not spec["seeds"]
                            or not all(isinstance(s, int) for s in spec["seeds"])):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers, got {spec['seeds']!r}")
    spec.setdefault("overrides", [])
    if not isinstance(spec["overrides"], list):
        raise ConfigError(f"{path}: overrides: expected a list of key=value, got {spec['overrides']!r}")
    spec["_file"] = str(path)
    return spec


def data_root(spec: dict, preset: str, strength: float) -> Path:
    """Where the benchmark of one preset and strength is generated: ``<data_dir>/<preset>-<strength>``."""
    return Path(spec["data_dir"]) / f"{preset}-{strength:g}"


def spec_strength(spec: dict, preset: str, strength: float | None) -> float:
    """``strength``, or the default of ``preset`` in the scene version of the experiment's base
    configuration (``data.synthetic.version``: the two versions calibrate their presets apart)."""
    from .data.synthetic import strength_of

    if strength is not None:
        return strength_of(preset, strength, 1)  # an explicit value: only its range is checked
    version = load_config(spec["base"], spec["overrides"]).data.synthetic.version
    return strength_of(preset, None, version)


def run_config(spec: dict, *, name: str, seed: int, preset: str, strength: float | None = None,
               extra=()) -> Config:
    """The base configuration with the benchmark's data, a run name, a seed and ``extra`` overrides.

    The preset's default strength (``cag.data.synthetic.PRESETS``) is written out explicitly,
    so every recorded configuration names the strength it ran with.
    """
    strength = spec_strength(spec, preset, strength)
    root = data_root(spec, preset, strength)
    overrides = [
        f"name={name}", f"out_dir={spec['runs_dir']}", f"seed={seed}", "quiet=true",
        f"data.synthetic.root={root}", f"data.synthetic.preset={preset}", f"data.synthetic.strength={strength}",
        f"data.source_root={root / 'source'}", f"data.target_root={root / 'target'}",
        *spec["overrides"], *extra,
    ]
    return load_config(spec["base"], overrides)


# ----------------------------------------------------------------------------- runs


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def oracle_fingerprint(cfg: Config) -> str:
    """The target oracle's fingerprint: the source-only stage's plus the domain it trains on."""
    from .pipeline import fingerprints

    return _digest(fingerprints(cfg)["source_only"], "target")


def train_oracle(cfg: Config) -> Path:
    """Train the target-trained upper bound into ``<run>/target_oracle`` (skipped when done).

    Same network, schedule and seed as source-only, but on the target train labels, which no
    adaptation arm ever reads. Its fingerprint is :func:`oracle_fingerprint`.
    """
    from . import stages
    from .pipeline import Pipeline

    fingerprint = oracle_fingerprint(cfg)
    stage_dir = cfg.run_dir / "target_oracle"
    done = stage_dir / "done.json"
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
        return stage_dir
    Pipeline(cfg).prepare_data()
    marker = stage_dir / "fingerprint"
    if stage_dir.exists() and not (marker.exists() and marker.read_text() == fingerprint):
        stage_dir.rename(stage_dir.with_name(f"target_oracle.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    result = stages.supervised_stage(cfg, stage_dir, fingerprint, domain="target")
    done.write_text(json.dumps({"fingerprint": fingerprint, "stage": "target_oracle", **result}, default=str))
    return stage_dir


def score(cfg: Config, checkpoint: Path, split: str) -> dict:
    """mIoU and per-class IoU of one checkpoint on one target split (:func:`cag.stages.evaluate`)."""
    from . import stages

    return stages.evaluate(cfg, checkpoint, split)


# ----------------------------------------------------------------------------- results files


def _cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return value


def write_csv(path: Path, rows: list[dict], keys, extra_columns=()) -> None:
    """Write ``rows`` with the columns ``keys`` then ``extra_columns``; None and NaN become empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [*keys, *extra_columns]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})
    tmp.replace(path)


def write_runs(path: Path, runs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=1, sort_keys=True, default=str))


# ----------------------------------------------------------------------------- pseudo-labels


def stage_labellers(cfg: Config) -> list[tuple[int, Path, Path]]:
    """(stage k, frozen pseudo-labeller checkpoint, anchor file) of every CAG stage of a finished run."""
    from .pipeline import Pipeline

    pipeline = Pipeline(cfg)
    out = []
    for k in range(1, cfg.cag.stages + 1):
        labeller = pipeline.model_of("warmup" if k == 1 else f"stage{k - 1}")
        anchors = pipeline.stage_dir("anchors") / "anchors.pt"
        if cfg.anchors.recompute_per_stage and k > 1:
            anchors = pipeline.stage_dir(f"stage{k}") / "anchors" / "anchors.pt"
        out.append((k, labeller, anchors))
    return out


def pseudo_label_counts(cfg: Config, labeller: Path, anchors_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per-class pseudo-label counts of a frozen labeller over the target train split.

    Both rules of docs/method.md §3 at the stage's settings, ``anchor`` (eq. 1-2, margin
    ``cag.delta_d``) and ``probability`` (softmax > ``cag.prob_threshold``), each a
    :func:`cag.pseudo_labels.pseudo_label_quality` dict summed over the split by
    :func:`cag.analysis.split_pseudo_label_quality` (whole images, labels downsampled by
    nearest). The labels exist on disk for this measurement only; no training run reads them.
    """
    from .analysis import split_pseudo_label_quality
    from .anchors import load_anchors
    from .stages import eval_dataset, make_model, resolve_device

    device = resolve_device(cfg.device)
    anchors, anchor_counts = load_anchors(anchors_path)
    quality = split_pseudo_label_quality(make_model(cfg, device, labeller), eval_dataset(cfg, "train"), anchors,
                                         anchor_counts, cfg.data.num_classes, device, delta_ds=(cfg.cag.delta_d,),
                                         prob_threshold=cfg.cag.prob_threshold, batch_size=cfg.eval.batch_size)
    return {"anchor": quality["anchor"][cfg.cag.delta_d], "probability": quality["probability"]}


def pseudo_label_rows(counts: dict[str, dict[str, torch.Tensor]], num_classes: int, **fields) -> list[dict]:
    """One row per rule and class present in the ground truth or the pseudo-labels.

    precision = correct / assigned, recall = correct / ground truth, coverage = labelled /
    ground truth (the share of the class's pixels that get any pseudo-label, right or wrong).
    """
    rows = []
    for rule, c in counts.items():
        for index, name in enumerate(class_names(num_classes)):
            gt, assigned = int(c["ground_truth"][index]), int(c["assigned"][index])
            correct, labelled = int(c["correct"][index]), int(c["labelled"][index])
            if gt == 0 and assigned == 0:
                continue
            rows.append({**fields, "rule": rule, "class": name, "ground_truth_pixels": gt,
                         "assigned_pixels": assigned, "correct_pixels": correct, "labelled_pixels": labelled,
                         "precision": correct / assigned if assigned else None,
                         "recall": correct / gt if gt else None, "coverage": labelled / gt if gt else None})
    return rows


def pseudo_label_overall(label_rows: list[dict], preset: str, arm: str = "cag", rule: str = "anchor") -> list[dict]:
    """pseudo_labels.csv per CAG stage for one preset, arm and rule: dicts ``{stage, precision,
    recall, coverage}`` pooled over classes and seeds (pixel counts summed, then the rates of
    :func:`cag.pseudo_labels.quality_rates`; None where a denominator is 0)."""
    rows = [r for r in label_rows if (r["preset"], r["arm"], r["rule"]) == (preset, arm, rule)]

    def rate(numerator: int, denominator: int) -> float | None:
        return numerator / denominator if denominator else None

    table = []
    for stage in sorted({r["stage"] for r in rows}):
        correct, assigned, labelled, truth = (sum(r[key] for r in rows if r["stage"] == stage) for key in
                                              ("correct_pixels", "assigned_pixels", "labelled_pixels",
                                               "ground_truth_pixels"))
        table.append({"stage": stage, "precision": rate(correct, assigned), "recall": rate(correct, truth),
                      "coverage": rate(labelled, truth)})
    return table


# ----------------------------------------------------------------------------- the paper's tables

#: Published per-class IoU (%) quoted verbatim from the CAG-UDA poster (``QimingZHANG-NIPS_UDA.pdf`` in the release); never
#: mixed with our numbers. DeepLab-v3+ / ResNet-101 on GTA5 -> Cityscapes val, 19 classes.
PAPER_GTA5 = {
    "source": "CAG-UDA poster, Table 1 (GTA5 -> Cityscapes, 19 classes), transcribed from QimingZHANG-NIPS_UDA.pdf in RogerZhangzz/CAG_UDA (not re-read since)",
    "classes": ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                "motorcycle", "bicycle", "mIoU"],
    "rows": {
        "Source only": [75.8, 16.8, 77.2, 12.5, 21.0, 25.5, 30.1, 20.1, 81.3, 24.6, 70.3, 53.8, 26.4, 49.9,
                        17.2, 25.9, 6.5, 25.3, 36.0, 36.6],
        "AdaptSegNet": [86.5, 25.9, 79.8, 22.1, 20.0, 23.6, 33.1, 21.8, 81.8, 25.9, 75.9, 57.3, 26.2, 76.3,
                        29.8, 32.1, 7.2, 29.5, 32.5, 41.4],
        "CLAN": [87.0, 27.1, 79.6, 27.3, 23.3, 28.3, 35.5, 24.2, 83.6, 27.4, 74.2, 58.6, 28.0, 76.2, 33.1,
                 36.7, 6.7, 31.9, 31.4, 43.2],
        "BLF (BDL)": [91.0, 44.7, 84.2, 34.6, 27.6, 30.2, 36.0, 36.0, 85.0, 43.6, 83.0, 58.6, 31.6, 83.3,
                      35.3, 49.7, 3.3, 28.8, 35.6, 48.5],
        "CAG-UDA": [90.4, 51.6, 83.8, 34.2, 27.8, 38.4, 25.3, 48.4, 85.4, 38.2, 78.1, 58.6, 34.6, 84.7,
                    21.9, 42.7, 41.1, 29.3, 37.2, 50.2],
    },
}

#: SYNTHIA -> Cityscapes, 13 classes (poster Table 2). No source-only row.
PAPER_SYNTHIA13 = {
    "source": "CAG-UDA poster, Table 2 (SYNTHIA -> Cityscapes, 13 classes), transcribed from QimingZHANG-NIPS_UDA.pdf in RogerZhangzz/CAG_UDA (not re-read since)",
    "classes": ["road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation", "sky", "person",
                "rider", "car", "bus", "motorcycle", "bicycle", "mIoU13"],
    "rows": {
        "AdaptSegNet": [79.2, 37.2, 78.8, 9.9, 10.5, 78.2, 80.5, 53.5, 19.6, 67.0, 29.5, 21.6, 31.3, 45.9],
        "CLAN": [81.3, 37.0, 80.1, 16.1, 13.7, 78.2, 81.5, 53.4, 21.2, 73.0, 32.9, 22.6, 30.7, 47.8],
        "BLF": [86.0, 46.7, 80.3, 14.1, 11.6, 79.2, 81.3, 54.1, 27.9, 73.7, 42.2, 25.7, 45.3, 51.4],
        "CAG-UDA(13)": [84.8, 41.7, 85.5, 13.7, 23.0, 86.5, 78.1, 66.3, 28.1, 81.8, 21.8, 22.9, 49.0, 52.6],
    },
}


def paper_table(table: dict) -> str:
    """A published table as Markdown, numbers as printed (%), with its source underneath."""
    lines = ["| method | " + " | ".join(table["classes"]) + " |", "|" + "---|" * (len(table["classes"]) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |" for name, values in table["rows"].items()]
    return "\n".join(lines) + f"\n\nSource: {table['source']}."


# ----------------------------------------------------------------------------- entry point


def run(path, overrides=(), quiet: bool = False) -> dict:
    """``python -m cag experiments FILE [key=value ...]``: a calibration grid or a benchmark table.

    ``kind: calibration`` runs :func:`cag.calibration.calibrate` and ``kind: benchmark_v2``
    :func:`cag.benchmark_table.benchmark_v2` (any other kind is refused by :func:`load_spec`).
    ``overrides`` are appended to the file's own and apply to every run; ``quiet`` silences the
    one line printed per finished run.
    """
    spec = load_spec(path)
    spec["overrides"] = [*spec["overrides"], *overrides]
    spec["quiet"] = quiet
    if spec["kind"] == "calibration":
        from .calibration import calibrate

        rows = calibrate(spec)
        return {"calibration": str(Path(spec["results_dir"]) / "calibration.csv"), "rows": len(rows)}
    from .benchmark_table import benchmark_v2

    return benchmark_v2(spec)
