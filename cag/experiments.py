"""Experiments on the built-in benchmark (results/README.md) and the calibration of its presets.

``python -m cag experiments configs/experiments/benchmark.yaml`` runs every arm of the
benchmark table; ``python -m cag experiments configs/experiments/calibration.yaml`` measures
source-only against the target-trained model for a grid of shift strengths. Both are plain
pipeline runs (:class:`cag.pipeline.Pipeline`) with configuration overrides:

* per seed and preset one *shared* run trains source-only and the warm-up and then the default
  CAG stages (arms ``source_only``, ``warmup``, ``cag_stage1..K``);
* every other adapted arm starts from that run's warm-up model (``model.init``,
  ``source_only.iters=0``, ``warmup.iters=0``) and differs only in its ``cag.*`` / ``anchors.*``
  overrides, so all adapted arms of a seed share one source checkpoint;
* ``target_oracle`` trains the same network with the source-only schedule on the target
  train labels (:func:`cag.stages.supervised_stage` with ``domain="target"``).

Headline numbers are on the held-out ``test`` split, which no run reads for pseudo-labels,
anchors or selection (``best_val`` checkpoints are selected on ``val``). Everything lands in
``results/``: ``summary.csv`` (one row per preset, arm, seed and checkpoint), ``ablations.csv``,
``pseudo_labels.csv``, ``runs.json`` and, for the calibration, ``calibration.csv``. The
functions at the end read those files back as tables and figures for the book's results chapter.

The calibration (``kind: calibration``; with ``jobs``, ``plateau`` and ``adabn`` for the
version-2 benchmark, ``configs/experiments/calibration_v2.yaml``) and the second benchmark table
(``kind: benchmark_v2``, ``configs/experiments/benchmark_v2.yaml``) run in
:mod:`cag.calibration` and :mod:`cag.benchmark_table` (their runs and jobs:
:mod:`cag.benchmark_runs`): resumable across sessions and machines through a committed cache of
scored units (``<results_dir>/scores/``, :mod:`cag.score_cache`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from .config import Config, ConfigError, load_config
from .labels import class_names

#: Arms that are not adapted runs: they come from the shared run or the oracle.
FIXED_ARMS = ("source_only", "warmup", "target_oracle")
#: The shared run's CAG stages are reported one row per stage under this prefix.
CAG_ARM = "cag"
SUMMARY_KEYS = ("preset", "arm", "seed", "checkpoint", "miou")
ABLATION_KEYS = ("preset", "setting", "seed", "stage", "checkpoint", "miou")
PSEUDO_LABEL_KEYS = ("preset", "arm", "seed", "stage", "rule", "class", "ground_truth_pixels", "assigned_pixels",
                     "correct_pixels", "labelled_pixels", "precision", "recall", "coverage")

_SPEC_KEYS = {
    "calibration": {"kind", "base", "runs_dir", "data_dir", "results_dir", "seeds", "overrides", "grid", "oracle_grid",
                    "split", "jobs", "plateau", "adabn", "oracle"},
    "benchmark": {"kind", "base", "runs_dir", "data_dir", "results_dir", "seeds", "overrides", "presets", "arms",
                  "ablations", "pseudo_label_arms", "eval_split", "jobs"},
    "benchmark_v2": {"kind", "base", "runs_dir", "data_dir", "results_dir", "eval_split", "jobs", "overrides", "presets",
                     "warmup_arms", "arms", "sweeps", "comparisons", "pseudo_label_arms", "oracle"},
}
_REQUIRED_KEYS = {
    "calibration": ("base", "runs_dir", "data_dir", "results_dir", "seeds", "grid"),
    "benchmark": ("base", "runs_dir", "data_dir", "results_dir", "seeds", "presets"),
    "benchmark_v2": ("base", "runs_dir", "data_dir", "results_dir", "presets", "warmup_arms"),
}


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
    if not isinstance(spec, dict) or spec.get("kind") not in _SPEC_KEYS:
        raise ConfigError(f"{path}: expected a mapping with kind: one of {', '.join(_SPEC_KEYS)}")
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


def check_arms(spec: dict) -> None:
    """Every arm a preset lists is a fixed arm, ``cag`` or a key of ``arms`` (benchmark files)."""
    known = set(FIXED_ARMS) | {CAG_ARM} | set(spec.get("arms") or {})
    for preset, arms in spec["presets"].items():
        missing = [a for a in arms if a not in known]
        if missing:
            raise ConfigError(f"presets.{preset}: unknown arms {missing}; known: {sorted(known)}")


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


def run_pipeline(cfg: Config, until: str) -> None:
    """Run (or skip, when done) the stages of one configuration up to and including ``until``."""
    from .pipeline import Pipeline

    Pipeline(cfg).run(until=until)


def record(spec: dict, cfg: Config, arm: str, started: float) -> dict:
    """One entry of ``results/runs.json``: configuration, seed, commit and time of a run."""
    from .stages import git_commit

    if not spec.get("quiet", True):
        print(f"[experiments] {cfg.run_dir} ({arm}) done in {time.time() - started:.0f} s", flush=True)
    return {"run": str(cfg.run_dir), "arm": arm, "seed": cfg.seed, "commit": git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "wall_seconds": round(time.time() - started, 1), "config": cfg.to_dict()}


# ----------------------------------------------------------------------------- calibration


def calibrate(spec: dict) -> list[dict]:
    """Source-only, AdaBN and the target-trained model on ``val`` for every preset x strength x seed.

    docs/data.md §7: a preset's strength is chosen where source-only reaches a set share of the
    target oracle's mIoU, before any adaptation runs and never on the held-out split. One
    source-only model per seed (the source domain does not depend on the preset or the
    strength) is scored on every target; the oracle is trained for the strengths in
    ``oracle_grid`` (default: all of ``grid``); ``adabn: true`` adds the source model with
    target BatchNorm statistics, ``plateau: [k, ...]`` source-only models trained k times as
    long. Cached and resumable; :func:`cag.calibration.calibrate` does the work and writes
    ``calibration.csv``, ``calibration_classes.csv`` and ``calibration_runs.json``.
    """
    from .calibration import calibrate as run_calibration

    return run_calibration(spec)


# ----------------------------------------------------------------------------- files


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


def read_csv(path) -> list[dict]:
    """Rows of a results CSV; numeric cells as floats (``seed`` as int), empty cells as None."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file; run `python -m cag experiments ...` first")
    with path.open(newline="") as f:
        return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(key: str, text: str):
    if text == "":
        return None
    if key in ("seed", "stage", "ground_truth_pixels", "assigned_pixels", "correct_pixels", "labelled_pixels"):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


# ----------------------------------------------------------------------------- benchmark


def shared_run_name(preset: str, seed: int) -> str:
    return f"{preset}-seed{seed}"


def arm_config(spec: dict, shared: Config, name: str, overrides) -> Config:
    """An adapted arm: the shared run's warm-up model as its start, its own ``cag.*`` overrides.

    ``source_only.iters=0`` and ``warmup.iters=0`` make the pipeline skip both stages and hand
    ``model.init`` (the shared warm-up checkpoint the CAG stages of the shared run started from)
    to the anchors and the first CAG stage.
    """
    from .pipeline import Pipeline

    start = Pipeline(shared).model_of("warmup")
    return run_config(spec, name=name, seed=shared.seed, preset=shared.data.synthetic.preset,
                      strength=shared.data.synthetic.strength,
                      extra=[f"model.init={start}", "source_only.iters=0", "warmup.iters=0", *overrides])


def cached_score(cfg: Config, checkpoint: Path, split: str) -> dict:
    """:func:`score`, remembered in ``scores.json`` beside the checkpoint.

    The cache key is the checkpoint's bytes, the split and the ``eval`` settings, so a
    re-run of the command re-scores nothing that has not changed.
    """
    key = _digest(hashlib.sha256(checkpoint.read_bytes()).hexdigest(), split, cfg.to_dict()["eval"],
                  cfg.data.num_classes)
    cache_path = checkpoint.parent / "scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if key not in cache:
        cache[key] = score(cfg, checkpoint, split)
        cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True))
    return cache[key]


def stage_scores(cfg: Config, stage_dir: Path, split: str) -> dict[str, dict]:
    """{"last": result, "best_val": result} of one finished training stage on ``split``.

    When the best validation score came at the last iteration, ``best_val.pt`` holds the
    same weights as ``last.pt`` and is not scored twice.
    """
    summary = json.loads((stage_dir / "summary.json").read_text())
    out = {"last": cached_score(cfg, stage_dir / "last.pt", split)}
    if (stage_dir / "best_val.pt").exists():
        same = summary.get("best_val_iter") == summary.get("iters")
        out["best_val"] = out["last"] if same else cached_score(cfg, stage_dir / "best_val.pt", split)
    return out


def result_rows(cfg: Config, stage_dir: Path, split: str, **fields) -> list[dict]:
    """Rows ``{**fields, checkpoint, miou, <class name>: IoU}`` of one stage's checkpoints."""
    return [{**fields, "checkpoint": checkpoint, "miou": result["miou"], **result["per_class_iou"]}
            for checkpoint, result in stage_scores(cfg, stage_dir, split).items()]


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


def labeller_rows(cfg: Config, **fields) -> list[dict]:
    """Pseudo-label quality rows of every CAG stage of a finished run."""
    rows = []
    for k, labeller, anchors in stage_labellers(cfg):
        rows += pseudo_label_rows(pseudo_label_counts(cfg, labeller, anchors), cfg.data.num_classes, **fields, stage=k)
    return rows


class Collector:
    """The rows and run records of a benchmark (or of one preset and seed of it)."""

    def __init__(self, spec: dict):
        self.spec, self.results = spec, Path(spec["results_dir"])
        self.split = spec.get("eval_split", "test")
        self.rows, self.ablation_rows, self.label_rows, self.runs = [], [], [], []
        self.num_classes = 19

    def add_run(self, cfg: Config, arm: str, started: float) -> None:
        self.runs.append(record(self.spec, cfg, arm, started))
        self.num_classes = cfg.data.num_classes

    def merge(self, part: "Collector") -> None:
        for key in ("rows", "ablation_rows", "label_rows", "runs"):
            getattr(self, key).extend(getattr(part, key))
        self.num_classes = part.num_classes

    def write(self, wall_seconds: float | None = None) -> None:
        """``summary.csv``, ``ablations.csv``, ``pseudo_labels.csv`` and ``runs.json``."""
        classes = class_names(self.num_classes)
        write_csv(self.results / "summary.csv", self.rows, SUMMARY_KEYS, classes)
        if self.ablation_rows:
            write_csv(self.results / "ablations.csv", self.ablation_rows, ABLATION_KEYS, classes)
        if self.label_rows:
            write_csv(self.results / "pseudo_labels.csv", self.label_rows, PSEUDO_LABEL_KEYS)
        write_runs(self.results / "runs.json", {"complete": wall_seconds is not None, "wall_seconds": wall_seconds,
                                                "eval_split": self.split, "jobs": self.spec.get("jobs", 1),
                                                "runs": self.runs})


def benchmark(spec: dict) -> dict:
    """Run every preset x seed x arm of an experiment file and write ``results/``.

    Each preset and seed is an independent group (:func:`seed_group`); with ``jobs: N`` the
    groups run in N worker processes of one thread each (on 2 cores, two one-thread runs
    train faster than one two-thread run of this small network). Every preset's data are
    generated first, in this process. Finished runs and scores are skipped (pipeline
    fingerprints, ``scores.json``), so an interrupted command continues where it stopped.
    """
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial
    from multiprocessing import get_context

    from .pipeline import Pipeline

    check_arms(spec)
    started_all = time.time()
    for preset in spec["presets"]:
        Pipeline(run_config(spec, name="data", seed=0, preset=preset)).prepare_data()
    groups = [(preset, seed) for preset in spec["presets"] for seed in spec["seeds"]]
    jobs = int(spec.get("jobs", 1))
    out = Collector(spec)
    if jobs == 1:
        parts = map(partial(seed_group, spec), groups)
        for part in parts:
            out.merge(part)
            out.write()
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            for part in pool.map(partial(seed_group, spec), groups):
                out.merge(part)
                out.write()
    out.write(wall_seconds=time.time() - started_all)
    return {"results": str(out.results), "wall_seconds": round(time.time() - started_all, 1)}


def seed_group(spec: dict, group: tuple[str, int]) -> Collector:
    """Every run of one preset and seed: the shared run, the oracle, the adapted arms and,
    on ``ablations.preset``, the ablation settings."""
    preset, seed = group
    out = Collector(spec)
    arms = spec["presets"][preset]
    shared = shared_seed(spec, out, preset, seed, arms)
    for arm in arms:
        if arm not in FIXED_ARMS and arm != CAG_ARM:
            adapted_arm(spec, out, shared, arm, spec["arms"][arm], seed)
    if in_ablations(spec, preset, seed):
        for setting, overrides in spec["ablations"]["settings"].items():
            adapted_arm(spec, out, shared, setting, overrides, seed, ablation=True)
    return out


def in_ablations(spec: dict, preset: str, seed: int) -> bool:
    ablations = spec.get("ablations") or {}
    return preset == ablations.get("preset") and seed in ablations.get("seeds", spec["seeds"])


def final_stage(cfg: Config) -> str:
    return f"stage{cfg.cag.stages}"


def shared_seed(spec: dict, out: Collector, preset: str, seed: int, arms) -> Config:
    """The shared run of one preset and seed (arms source_only, warmup, cag_stage1..K) and the oracle."""
    started = time.time()
    shared = run_config(spec, name=shared_run_name(preset, seed), seed=seed, preset=preset)
    run_pipeline(shared, until=final_stage(shared))
    fields = {"preset": preset, "seed": seed}
    stage_arms = {"source_only": "source_only", "warmup": "warmup",
                  **{f"stage{k}": f"{CAG_ARM}_stage{k}" for k in range(1, shared.cag.stages + 1)}}
    for stage, arm in stage_arms.items():
        if arm in arms or (CAG_ARM in arms and stage.startswith("stage")):
            out.rows += result_rows(shared, shared.run_dir / stage, out.split, **fields, arm=arm)
    if in_ablations(spec, preset, seed):
        for k in range(1, shared.cag.stages + 1):
            out.ablation_rows += result_rows(shared, shared.run_dir / f"stage{k}", out.split, **fields,
                                             setting="default", stage=k)
    if CAG_ARM in (spec.get("pseudo_label_arms") or []):
        out.label_rows += labeller_rows(shared, **fields, arm=CAG_ARM)
    out.add_run(shared, "shared", started)
    if "target_oracle" in arms:
        started = time.time()
        out.rows += result_rows(shared, train_oracle(shared), out.split, **fields, arm="target_oracle")
        out.add_run(shared, "target_oracle", started)
    return shared


def adapted_arm(spec: dict, out: Collector, shared: Config, arm: str, overrides, seed: int,
                ablation: bool = False) -> None:
    """One adapted arm (or ablation setting) from the shared warm-up model; its last stage is
    reported (every stage for an ablation)."""
    started = time.time()
    cfg = arm_config(spec, shared, f"{shared.name}-{arm}", overrides)
    run_pipeline(cfg, until=final_stage(cfg))
    fields = {"preset": shared.data.synthetic.preset, "seed": seed}
    if ablation:
        for k in range(1, cfg.cag.stages + 1):
            out.ablation_rows += result_rows(cfg, cfg.run_dir / f"stage{k}", out.split, **fields, setting=arm, stage=k)
    else:
        out.rows += result_rows(cfg, cfg.run_dir / final_stage(cfg), out.split, **fields, arm=arm)
    if arm in (spec.get("pseudo_label_arms") or []):
        out.label_rows += labeller_rows(cfg, **fields, arm=arm)
    out.add_run(cfg, f"ablation:{arm}" if ablation else arm, started)


# ----------------------------------------------------------------------------- tables


def _values(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample standard deviation (ddof 1; 0 for one value), count) over the non-NaN values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan, 0
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return float(values.mean()), std, int(values.size)


def select(rows: list[dict], **where) -> list[dict]:
    """The rows whose fields equal every ``key=value`` given."""
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def arm_order(rows: list[dict]) -> list[str]:
    """Arms in the order of the results table (source-only first, oracle last), then any others."""
    order = ["source_only", "warmup", "self_training", "cag_stage1", "cag_stage2", "cag_stage3",
             "cag_anchor_only", "cag_pixel_l2", "target_oracle"]
    present = list(dict.fromkeys(r["arm"] for r in rows))
    return [a for a in order if a in present] + [a for a in present if a not in order]


def miou_table(rows: list[dict], checkpoint: str = "last", key: str = "arm") -> list[dict]:
    """Mean and standard deviation of mIoU over seeds for every (preset, ``key``) at one checkpoint."""
    rows = select(rows, checkpoint=checkpoint)
    table = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        group = select(rows, preset=preset)
        names = arm_order(group) if key == "arm" else list(dict.fromkeys(r[key] for r in group))
        for name in names:
            mean, std, n = mean_std(_values(select(group, **{key: name}), "miou"))
            table.append({"preset": preset, key: name, "checkpoint": checkpoint, "miou_mean": mean,
                          "miou_std": std, "seeds": n})
    return table


def per_class_table(rows: list[dict], preset: str, checkpoint: str = "last", num_classes: int = 19) -> list[dict]:
    """Per-class IoU mean over seeds for each arm of one preset; classes never evaluated are left out."""
    rows = select(rows, preset=preset, checkpoint=checkpoint)
    classes = [c for c in class_names(num_classes) if not np.all(np.isnan(_values(rows, c)))]
    table = []
    for arm in arm_order(rows):
        group = select(rows, arm=arm)
        table.append({"arm": arm, "miou": mean_std(_values(group, "miou"))[0],
                      **{c: mean_std(_values(group, c))[0] for c in classes}})
    return table


def per_class_mean_std(rows: list[dict], preset: str, checkpoint: str = "last", num_classes: int = 19) -> list[dict]:
    """As :func:`per_class_table`, each cell the text "mean ± std" in IoU points (%, over seeds)."""
    rows = select(rows, preset=preset, checkpoint=checkpoint)
    classes = [c for c in class_names(num_classes) if not np.all(np.isnan(_values(rows, c)))]

    def cell(values) -> str:
        mean, std, n = mean_std(100 * values)
        return "–" if n == 0 else f"{mean:.1f} ± {std:.1f}"

    return [{"arm": arm, **{name: cell(_values(select(rows, arm=arm), key))
                            for name, key in [("mIoU", "miou"), *[(c, c) for c in classes]]}}
            for arm in arm_order(rows)]


def targets(rows: list[dict], preset: str = "class", checkpoint: str = "last") -> dict:
    """The benchmark's targets on ``preset``: CAG stage 3 >= source-only + 5 points and >= warm-up + 2 points.

    Differences are of the means over seeds, in mIoU points (x 100, rounded to 1e-6 so that float
    noise never decides a tie); ``met`` is True only when both hold.
    """
    means = {r["arm"]: r["miou_mean"] for r in miou_table(select(rows, preset=preset), checkpoint)}
    final = max((a for a in means if a.startswith(CAG_ARM + "_stage")), key=lambda a: int(a.rsplit("stage", 1)[1]),
                default=None)
    if final is None or "source_only" not in means or "warmup" not in means:
        return {"met": False, "reason": "missing arms"}
    over_source = round(100 * (means[final] - means["source_only"]), 6)
    over_warmup = round(100 * (means[final] - means["warmup"]), 6)
    return {"arm": final, "over_source_only": over_source, "over_warmup": over_warmup,
            "source_only_target": 5.0, "warmup_target": 2.0,
            "met_source_only": over_source >= 5.0, "met_warmup": over_warmup >= 2.0,
            "met": over_source >= 5.0 and over_warmup >= 2.0}


def pseudo_label_table(label_rows: list[dict], preset: str, arm: str = CAG_ARM, rule: str = "anchor") -> list[dict]:
    """Per class and stage: precision and coverage of one rule, mean over seeds."""
    rows = select(label_rows, preset=preset, arm=arm, rule=rule)
    table = []
    for name in dict.fromkeys(r["class"] for r in rows):
        entry = {"class": name}
        for stage in sorted({r["stage"] for r in rows}):
            group = select(rows, **{"class": name, "stage": stage})
            entry[f"precision_{stage}"] = mean_std(_values(group, "precision"))[0]
            entry[f"coverage_{stage}"] = mean_std(_values(group, "coverage"))[0]
        table.append(entry)
    return table


def pseudo_label_overall(label_rows: list[dict], preset: str, arm: str = CAG_ARM, rule: str = "anchor") -> list[dict]:
    """Per stage: precision, recall and coverage of one rule pooled over classes and seeds (pixel
    counts summed; the rates of :func:`cag.pseudo_labels.quality_rates`)."""
    rows = select(label_rows, preset=preset, arm=arm, rule=rule)
    table = []
    for stage in sorted({r["stage"] for r in rows}):
        group = select(rows, stage=stage)
        correct, assigned = sum(r["correct_pixels"] for r in group), sum(r["assigned_pixels"] for r in group)
        labelled, truth = sum(r["labelled_pixels"] for r in group), sum(r["ground_truth_pixels"] for r in group)
        table.append({"stage": stage, "precision": correct / assigned if assigned else math.nan,
                      "recall": correct / truth if truth else math.nan,
                      "coverage": labelled / truth if truth else math.nan})
    return table


def calibration_table(calibration_rows: list[dict]) -> list[dict]:
    """``calibration.csv`` for display: the strength as text, mIoU and ratio as fractions."""
    return [{"preset": r["preset"], "strength": f"{r['strength']:g}", "seed": r["seed"],
             "source-only val mIoU": r["source_only"], "oracle val mIoU": r["target_oracle"],
             "source-only / oracle": r["ratio"]} for r in calibration_rows]


def markdown(table: list[dict], digits: int = 1, percent: bool = True) -> str:
    """A Markdown table of ``table`` (:func:`cag.analysis.markdown_table`; floats x 100 when ``percent``)."""
    from .analysis import markdown_table

    if not table:
        return "(no rows)"
    columns = list(table[0])
    scale = 100.0 if percent else 1.0
    return markdown_table(columns, [[scale * v if isinstance(v, float) else v for v in map(row.get, columns)]
                                    for row in table], digits)


# ----------------------------------------------------------------------------- figures


def _figure(ncols: int = 1, width: float = 6.0, height: float = 3.5):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def plot_miou(rows: list[dict], checkpoint: str = "last"):
    """mIoU per arm (mean +- std over seeds, each seed a dot), one panel per preset."""
    rows = select(rows, checkpoint=checkpoint)
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = _figure(len(presets), width=5.5)
    for ax, preset in zip(axes, presets):
        group = select(rows, preset=preset)
        arms = arm_order(group)
        for x, arm in enumerate(arms):
            values = 100 * _values(select(group, arm=arm), "miou")
            mean, std, _ = mean_std(values)
            ax.bar(x, mean, yerr=std, color="tab:green" if arm.startswith(CAG_ARM) else "tab:grey", alpha=0.7, capsize=3)
            ax.plot(np.full(values.size, x), values, "k.", markersize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right")
        ax.set_ylabel("test mIoU (%)")
        ax.set_title(f"preset '{preset}', {checkpoint} checkpoint")
    return fig


def plot_per_class(rows: list[dict], preset: str, checkpoint: str = "last", num_classes: int = 19):
    """Heat map of per-class IoU (mean over seeds, %) with one row per arm."""
    table = per_class_table(rows, preset, checkpoint, num_classes)
    classes = [c for c in table[0] if c not in ("arm", "miou")]
    values = 100 * np.array([[np.nan if row[c] is None else row[c] for c in classes] for row in table])
    fig, (ax,) = _figure(1, width=1.0 + 0.6 * len(classes), height=0.8 + 0.4 * len(table))
    ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "–" if np.isnan(v) else f"{v:.0f}", ha="center", va="center",
                color="white" if v < 60 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(table)), [row["arm"] for row in table])
    ax.set_title(f"per-class test IoU (%), preset '{preset}', {checkpoint} checkpoint, mean over seeds")
    return fig


def plot_pseudo_labels(label_rows: list[dict], preset: str, arm: str = CAG_ARM):
    """Precision and coverage of each rule's pseudo-labels per class, one bar per CAG stage."""
    from matplotlib.figure import Figure

    rules = list(dict.fromkeys(r["rule"] for r in select(label_rows, preset=preset, arm=arm)))
    fig = Figure(figsize=(13.0, 3.2 * len(rules)), layout="constrained")
    axes = fig.subplots(len(rules), 2, squeeze=False)
    for i, rule in enumerate(rules):
        table = pseudo_label_table(label_rows, preset, arm, rule)
        stages = sorted({int(k.split("_")[1]) for k in table[0] if k.startswith("precision_")})
        for j, metric in enumerate(("precision", "coverage")):
            ax = axes[i][j]
            width = 0.8 / len(stages)
            for s, stage in enumerate(stages):
                values = 100 * np.nan_to_num(np.array([row[f"{metric}_{stage}"] for row in table], dtype=float))
                ax.bar(np.arange(len(table)) + s * width, values, width, label=f"stage {stage}")
            ax.set_xticks(np.arange(len(table)) + 0.4 - width / 2, [r["class"] for r in table], rotation=45, ha="right")
            ax.set_ylim(0, 100)
            ax.set_title(f"{rule} pseudo-labels: {metric} (%)")
        axes[i][0].legend(fontsize=7)
    return fig


def plot_ablation(ablation_rows: list[dict], checkpoint: str = "last"):
    """Test mIoU after each CAG stage per ablation setting (mean +- std over seeds)."""
    rows = select(ablation_rows, checkpoint=checkpoint)
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, (ax,) = _figure(1)
    for j, setting in enumerate(settings):
        stages = sorted({r["stage"] for r in select(rows, setting=setting)})
        stats = [mean_std(100 * _values(select(rows, setting=setting, stage=k), "miou")) for k in stages]
        offset = 0.06 * (j - (len(settings) - 1) / 2)
        ax.errorbar(np.array(stages) + offset, [m for m, _, _ in stats], yerr=[s for _, s, _ in stats], marker="o",
                    capsize=3, label=setting)
    ax.set_xlabel("CAG stage")
    ax.set_ylabel("test mIoU (%)")
    ax.set_xticks(sorted({r["stage"] for r in rows}))
    ax.legend(fontsize=8)
    ax.set_title(f"ablations, {checkpoint} checkpoint")
    return fig


def plot_calibration(calibration_rows: list[dict], band=(0.5, 0.65)):
    """Source-only and target-oracle val mIoU against shift strength, and their ratio, per preset."""
    presets = list(dict.fromkeys(r["preset"] for r in calibration_rows))
    fig, (left, right) = _figure(2, width=5.0)
    for i, preset in enumerate(presets):
        group = select(calibration_rows, preset=preset)
        strengths = sorted({r["strength"] for r in group})
        for key, style in (("source_only", "-o"), ("target_oracle", "s")):
            means = [mean_std(100 * _values(select(group, strength=s), key))[0] for s in strengths]
            left.plot(strengths, means, style, color=f"C{i}", label=f"{preset}: {key}")
        ratios = [mean_std(_values(select(group, strength=s), "ratio"))[0] for s in strengths]
        right.plot(strengths, ratios, "o", color=f"C{i}", label=preset)
    right.axhspan(*band, color="tab:green", alpha=0.15, label="target band")
    right.set_ylim(0, 1)
    left.set(xlabel="strength", ylabel="val mIoU (%)", title="source-only and target oracle")
    right.set(xlabel="strength", ylabel="source-only / oracle", title="calibration ratio")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    return fig


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

    ``kind: calibration`` runs :func:`calibrate`, ``kind: benchmark`` the first benchmark table
    (:func:`benchmark`), ``kind: benchmark_v2`` the cached, resumable one of
    :mod:`cag.benchmark_table`.

    ``overrides`` are appended to the file's own and apply to every run; ``quiet`` silences the
    one line printed per finished run.
    """
    spec = load_spec(path)
    spec["overrides"] = [*spec["overrides"], *overrides]
    spec["quiet"] = quiet
    if spec["kind"] == "calibration":
        rows = calibrate(spec)
        return {"calibration": str(Path(spec["results_dir"]) / "calibration.csv"), "rows": len(rows)}
    if spec["kind"] == "benchmark_v2":
        from .benchmark_table import benchmark_v2

        return benchmark_v2(spec)
    return benchmark(spec)
