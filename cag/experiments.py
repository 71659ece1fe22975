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
:mod:`cag.score_cache`); their results files (``results/``, ``results/README.md``) are
read back by :mod:`cag.results` and shown in the book's chapter 8. This module holds what both
runners use: a run's configuration (:func:`run_config`), the target-trained oracle
(:func:`train_oracle`), scoring (:func:`score`) and the writers of the results files
(:func:`write_csv`, :func:`write_runs`). The pseudo-label counts of a run's stage labellers
(``pseudo_labels.csv``) are measured by :func:`cag.analysis.pseudo_label_counts`; the paper's
published tables are in :mod:`cag.paper_tables`.

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

import yaml

from .config import Config, ConfigError, load_config

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
    """Train the target-trained reference (the oracle) into ``<run>/target_oracle`` (skipped when done).

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
    """Write the record of an experiment's runs (configuration, commit, time) as sorted JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=1, sort_keys=True, default=str))


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
