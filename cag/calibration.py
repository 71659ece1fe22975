"""The calibration of the built-in benchmark's presets (``kind: calibration``; docs/data.md §7).

``python -m cag experiments configs/experiments/calibration_v2.yaml`` runs :func:`calibrate`:
per seed one source-only model scored on every grid cell (preset x strength), AdaBN, the target
oracle and the plateau check, on ``split`` (``val``). Its tasks are one per source-only model
(with its scores and AdaBN on every grid cell), per plateau model and per oracle, longest first,
run by :func:`cag.benchmark_runs.run_tasks`; every score is a unit of the committed score cache
(:mod:`cag.score_cache`), so the same command resumes where it stopped.
"""
from __future__ import annotations

import time
from pathlib import Path

from .benchmark_runs import (Context, Job, cell_label, check_jobs, check_oracle, generate_data, is_number,
                             oracle_from_source, oracle_run, preset_names, run_tasks, runs_record, source_run,
                             target_config)
from .config import ConfigError, load_config
from .score_cache import ScoreCache, check_lineage

#: Columns of ``calibration.csv``.
CALIBRATION_KEYS = ("preset", "strength", "seed", "split", "source_iters", "source_only", "adabn", "target_oracle",
                    "ratio", "closure")
#: Leading columns of ``calibration_classes.csv`` (one column per class follows).
CALIBRATION_CLASS_KEYS = ("preset", "strength", "seed", "split", "arm")


def ratio_and_closure(source_only, adabn, oracle) -> tuple[float | None, float | None]:
    """``ratio = source_only / oracle`` and ``closure = (adabn - source_only) / (oracle - source_only)``.

    The closure is the share of the source-only -> oracle gap that AdaBN closes (1 = all of it,
    0 = none, negative = AdaBN is worse than source-only). None where an input is missing, and
    for a zero denominator (an oracle of 0, or an oracle equal to source-only).
    """
    ratio = source_only / oracle if source_only is not None and oracle else None
    closure = None
    if None not in (source_only, adabn, oracle) and oracle != source_only:
        closure = (adabn - source_only) / (oracle - source_only)
    return ratio, closure


def check_calibration_spec(spec: dict) -> None:
    """Refuse a calibration file that would read the test split or name impossible cells."""
    where = spec.get("_file", "calibration")
    split = spec.get("split", "val")
    if split == "test":
        raise ConfigError("calibration.split: the held-out test split is never used for calibration")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{where}: grid: expected a mapping of preset -> list of strengths, got {grid!r}")
    presets = preset_names()
    for preset, strengths in grid.items():
        if preset not in presets:
            raise ConfigError(f"{where}: grid.{preset}: unknown preset; presets are {', '.join(presets)}")
        if not isinstance(strengths, list) or not strengths or not all(is_number(s) for s in strengths):
            raise ConfigError(f"{where}: grid.{preset}: expected a non-empty list of strengths, got {strengths!r}")
    for preset, strengths in (spec.get("oracle_grid") or {}).items():
        outside = [s for s in strengths or [] if s not in grid.get(preset, [])]
        if preset not in grid or outside:
            raise ConfigError(f"{where}: oracle_grid.{preset}: strengths {outside or strengths} are not in grid.{preset}")
    plateau = spec.get("plateau", [])
    if not isinstance(plateau, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 2
                                                for k in plateau):
        raise ConfigError(f"{where}: plateau: expected a list of whole multiples >= 2 of source_only.iters, "
                          f"got {plateau!r}")
    if not isinstance(spec.get("adabn", False), bool):
        raise ConfigError(f"{where}: adabn: expected true or false, got {spec.get('adabn')!r}")
    check_jobs(spec, where)
    check_oracle(spec, where)
    cfg = load_config(spec["base"], spec["overrides"])
    if split == cfg.data.test_split:
        raise ConfigError(f"{where}: split: {split!r} is the base configuration's held-out data.test_split")


def _cells(spec: dict) -> list[tuple[str, float]]:
    return [(preset, float(strength)) for preset, strengths in spec["grid"].items() for strength in strengths]


def calibration_tasks(spec: dict) -> list[tuple]:
    """The calibration's independent tasks, longest first: ``("plateau", seed, k)``,
    ``("source", seed)`` and ``("oracle", seed, preset, strength)``. An oracle fine-tuned from
    the source-only model (``oracle.init: source_only``) is no task of its own: it runs in its
    seed's source task, after the model it starts from (two processes never train one run)."""
    tasks = [("plateau", seed, k) for k in sorted(spec.get("plateau", []), reverse=True) for seed in spec["seeds"]]
    tasks += [("source", seed) for seed in spec["seeds"]]
    if not oracle_from_source(spec):
        tasks += [("oracle", seed, preset, strength) for seed in spec["seeds"] for preset, strength in _oracle_cells(spec)]
    return tasks


def _oracle_cells(spec: dict) -> list[tuple[str, float]]:
    oracle_grid = spec.get("oracle_grid") or spec["grid"]
    return [(preset, float(strength)) for preset, strengths in oracle_grid.items() for strength in strengths]


def _oracle_job(spec: dict, seed: int, preset: str, strength: float) -> Job:
    label = cell_label(preset, strength, seed)
    run = oracle_run(spec, label, seed, preset, strength)
    return Job("train", label, preset, strength, seed, spec.get("split", "val"), run,
               {"target_oracle": "target_oracle"}, checkpoints=("last",), arm="target_oracle")


def calibration_jobs(spec: dict, task: tuple) -> list[Job]:
    """The jobs of one calibration task (every checkpoint scored is ``last``, on ``split``)."""
    split = spec.get("split", "val")
    kind, seed = task[0], task[1]
    if kind == "oracle":
        return [_oracle_job(spec, seed, task[2], task[3])]
    multiple = task[2] if kind == "plateau" else 1
    source = source_run(spec, seed, multiple)
    arm = "source_only" if multiple == 1 else f"source_only_x{multiple}"
    jobs = []
    for preset, strength in _cells(spec):
        label = cell_label(preset, strength, seed)
        target = target_config(spec, label, seed, preset, strength)
        jobs.append(Job("transfer", label, preset, strength, seed, split, source, {"source_only": arm}, target,
                        checkpoints=("last",), arm=arm))
        if kind == "source" and spec.get("adabn", False):
            jobs.append(Job("adabn", label, preset, strength, seed, split, source, {"source_only": "adabn"}, target,
                            checkpoints=("last",), arm="adabn"))
    if kind == "source" and oracle_from_source(spec):
        jobs += [_oracle_job(spec, seed, preset, strength) for preset, strength in _oracle_cells(spec)]
    return jobs


def _calibration_task(spec: dict, task: tuple) -> None:
    ctx = Context(spec)
    for job in calibration_jobs(spec, task):
        ctx.execute(job)


def calibration_rows(spec: dict, ctx: Context | None = None) -> tuple[list[dict], list[dict]]:
    """(``calibration.csv`` rows, ``calibration_classes.csv`` rows) from the valid cached units.

    Per seed and grid cell one row at ``source_iters = source_only.iters`` with source-only,
    AdaBN, the oracle where one is trained, ``ratio`` and ``closure`` (:func:`ratio_and_closure`);
    then one row per plateau multiple k with ``source_iters = k x iters`` and its source-only
    score. Cells whose units are not cached yet are empty.
    """
    from .labels import class_names

    ctx = ctx or Context(spec)
    split = spec.get("split", "val")
    base = load_config(spec["base"], spec["overrides"])
    names = class_names(base.data.num_classes)
    found: dict = {}
    by_run: dict = {}  # every unit scored from one run's model must descend from one source-only model
    for task in calibration_tasks(spec):
        for job in calibration_jobs(spec, task):
            for unit in job.units():
                record = ctx.cache.get(unit)
                if record is not None:
                    found[(job.seed, job.preset, job.strength, job.arm)] = record
                    root = job.run
                    while root.upstream is not None:  # an oracle fine-tuned from the source model joins it
                        root = root.upstream[0]
                    by_run.setdefault(root.name, {})[ctx.cache.path(unit)] = record
    for name, records in by_run.items():
        check_lineage(records, f"calibration, run {name}")
    rows, class_rows = [], []
    for seed in spec["seeds"]:
        for preset, strength in _cells(spec):
            def value(arm):
                record = found.get((seed, preset, strength, arm))
                return None if record is None else record["miou"]

            so, ad, oracle = value("source_only"), value("adabn"), value("target_oracle")
            ratio, closure = ratio_and_closure(so, ad, oracle)
            common = {"preset": preset, "strength": strength, "seed": seed, "split": split}
            rows.append({**common, "source_iters": base.source_only.iters, "source_only": so, "adabn": ad,
                         "target_oracle": oracle, "ratio": ratio, "closure": closure})
            for k in spec.get("plateau", []):
                rows.append({**common, "source_iters": k * base.source_only.iters,
                             "source_only": value(f"source_only_x{k}")})
            for arm in ("source_only", "adabn", "target_oracle"):
                record = found.get((seed, preset, strength, arm))
                if record is not None:
                    class_rows.append({**common, "arm": arm, **{n: record["per_class_iou"].get(n) for n in names}})
    return rows, class_rows


def write_calibration(spec: dict, wall_seconds: float | None = None) -> None:
    """Rewrite ``calibration.csv``, ``calibration_classes.csv`` and ``calibration_runs.json`` from the cache."""
    from .experiments import write_csv, write_runs
    from .labels import class_names

    results = Path(spec["results_dir"])
    ctx = Context(spec)
    rows, class_rows = calibration_rows(spec, ctx)
    base = load_config(spec["base"], spec["overrides"])
    write_csv(results / "calibration.csv", rows, CALIBRATION_KEYS)
    write_csv(results / "calibration_classes.csv", class_rows, CALIBRATION_CLASS_KEYS,
              class_names(base.data.num_classes))
    runs = {}
    for task in calibration_tasks(spec):
        for job in calibration_jobs(spec, task):
            runs.setdefault(job.run.name, job.run)
    write_runs(results / "calibration_runs.json", runs_record(spec, ctx, runs.values(), wall_seconds))


def calibrate(spec: dict) -> list[dict]:
    """The calibration of ``kind: calibration`` files (docs/data.md §7), on ``split`` (val).

    Per seed: one source-only model scored on every grid cell (preset x strength); with
    ``adabn: true`` the same model with BatchNorm statistics re-estimated on each cell's target
    *train* images (:func:`cag.adabn.adapt_checkpoint`), scored on ``split``; the target oracle
    at the cells of ``oracle_grid``; and for each k of ``plateau`` a source-only model trained k
    times as long, scored on every cell. Writes ``calibration.csv`` (columns
    :data:`CALIBRATION_KEYS`), ``calibration_classes.csv`` (per-class IoU of source-only, AdaBN
    and the oracle) and ``calibration_runs.json``; returns the rows of ``calibration.csv``.
    """
    check_calibration_spec(spec)
    started = time.time()
    ScoreCache(spec["results_dir"]).remove_partial_writes()
    jobs = spec.get("jobs", 1)
    generate_data(spec, [(next(iter(spec["grid"])), 0.0), *_cells(spec)], jobs)
    ctx = Context(spec)
    tasks = [t for t in calibration_tasks(spec) if any(ctx.missing(j) for j in calibration_jobs(spec, t))]
    run_tasks(_calibration_task, spec, tasks, jobs, on_progress=lambda: write_calibration(spec))
    write_calibration(spec, wall_seconds=time.time() - started)
    return calibration_rows(spec)[0]
