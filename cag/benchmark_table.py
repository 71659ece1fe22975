"""The second benchmark table (``kind: benchmark_v2``), resumable and cached.

``python -m cag experiments configs/experiments/benchmark_v2.yaml`` runs :func:`benchmark_v2`:
every arm of a seed from one source-only model (the runs and jobs of :mod:`cag.benchmark_runs`),
every CAG stage scored, Delta_d as fractions of the smallest anchor gap, stage-length settings
and the declared paired comparisons (:mod:`cag.comparisons`). It runs, in phase 1, the
source-only model of every seed that something missing needs; in phase 2 the (preset, seed)
groups, arms in sequence within a group (warm-up before the CAG arms). Every score is a unit of
the committed score cache (:mod:`cag.score_cache`), so the same command resumes where it
stopped. :func:`check_benchmark_spec` refuses a file before any work.
"""
from __future__ import annotations

import time
from pathlib import Path

from .benchmark_runs import (CHECKPOINTS, Context, Job, Run, cell_label, check_jobs, check_oracle, generate_data,
                             is_number, oracle_run, preset_names, run_tasks, runs_record, source_run, target_config)
from .config import ConfigError, load_config
from .score_cache import ScoreCache, check_lineage

#: Columns of ``delta_d.csv``.
DELTA_D_KEYS = ("preset", "seed", "fraction", "smallest_gap", "delta_d", "stage", "active_fraction",
                "active_precision", "miou")
#: Arms of a benchmark_v2 preset that are not pipeline CAG arms.
FIXED_V2_ARMS = ("source_only", "adabn", "target_oracle")
CAG_ARM = "cag"
#: Override prefixes an adapted arm or sweep setting may not change: they start from the shared
#: warm-up model, so these would be ignored or would change what they are compared with.
_FROZEN_FOR_ARMS = ("source_only.", "warmup.", "model.", "data.", "seed", "name", "out_dir")
_BENCHMARK_PRESET_KEYS = {"seeds", "arms", "strength"}
_SWEEP_KEYS = {"preset", "seeds", "delta_d_fractions", "settings"}


# ----------------------------------------------------------------------------- Delta_d sweep


def delta_d_value(fraction: float, gap: float) -> float:
    """``cag.delta_d`` of one sweep point: ``fraction x gap``, rounded to 6 significant digits (so that
    the last bits of a recomputed anchor never change a run's fingerprint)."""
    return float(f"{fraction * gap:.6g}")


def anchor_activity(counts: dict) -> tuple[float | None, float | None]:
    """(active fraction, precision) of anchor pseudo-labels from summed pseudo-label counts.

    active fraction = pixels with an anchor pseudo-label / pixels with a valid ground truth;
    precision = pixels whose pseudo-label is right / pixels with a pseudo-label (None if none).
    """
    active, evaluated = float(sum(_listed(counts["active"]))), float(sum(_listed(counts["evaluated"])))
    correct = float(sum(_listed(counts["correct"])))
    return (active / evaluated if evaluated else None, correct / active if active else None)


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


# ----------------------------------------------------------------------------- benchmark v2


def preset_strength(spec: dict, preset: str) -> float:
    """The strength a benchmark preset runs at: its ``strength`` key, else the preset's default."""
    from .experiments import spec_strength

    return spec_strength(spec, preset, spec["presets"][preset].get("strength"))


def in_sweeps(spec: dict, preset: str, seed: int) -> bool:
    """True when the sweeps run on this preset and seed."""
    sweeps = spec.get("sweeps") or {}
    return preset == sweeps.get("preset") and seed in sweeps.get("seeds", spec["presets"][preset]["seeds"])


def _adapted_names(spec: dict, preset: str) -> list[str]:
    return [a for a in spec["presets"][preset]["arms"] if a == CAG_ARM or a in (spec.get("arms") or {})]


def _pseudo_label_arms(spec: dict) -> list[str]:
    """The arms whose labellers are counted: ``pseudo_label_arms``, by default ``cag`` and, when it
    is an arm, ``self_training``."""
    if "pseudo_label_arms" in spec:
        return list(spec["pseudo_label_arms"])
    return [CAG_ARM] + (["self_training"] if "self_training" in (spec.get("arms") or {}) else [])


def group_jobs(spec: dict, preset: str, seed: int, ctx: Context | None = None) -> list[Job]:
    """Every job of one (preset, seed) group of a benchmark_v2 file, in the order they run.

    source-only and AdaBN of the seed's source model on this preset's target; the oracle; the
    warm-up arms (``model.init`` = the source model, ``source_only.iters=0``); the adapted arms
    (``model.init`` = the ``warmup`` arm's model, both earlier stages 0 iterations), every CAG
    stage scored; on the sweep preset and seeds the smallest anchor gap, one run per Delta_d
    fraction (``pending`` until the gap is cached) and one per stage-length setting.
    """
    ctx = ctx or Context(spec)
    entry = spec["presets"][preset]
    arms = entry["arms"]
    strength = preset_strength(spec, preset)
    common = {"preset": preset, "strength": strength, "seed": seed, "split": spec.get("eval_split", "test")}
    label = cell_label(preset, strength, seed)
    source = source_run(spec, seed)
    jobs = []
    if "source_only" in arms or "adabn" in arms:
        target = target_config(spec, label, seed, preset, strength)
        for arm, kind in (("source_only", "transfer"), ("adabn", "adabn")):
            if arm in arms:
                jobs.append(Job(kind, label, run=source, stages={"source_only": arm}, target=target, arm=arm, **common))
    if "target_oracle" in arms:
        oracle = oracle_run(spec, label, seed, preset, strength)
        jobs.append(Job("train", label, run=oracle, stages={"target_oracle": "target_oracle"}, arm="target_oracle",
                        **common))
    adapted_arms = _adapted_names(spec, preset)
    sweeping = in_sweeps(spec, preset, seed)
    warmups = {}
    for name, overrides in (spec.get("warmup_arms") or {}).items():
        if name in arms or (name == "warmup" and (adapted_arms or sweeping)):
            run = Run(spec, f"{label}-{name}", seed, preset, strength, ("source_only.iters=0", *overrides),
                      until="warmup", upstream=(source, "source_only"))
            warmups[name] = run
            if name in arms:
                jobs.append(Job("train", run.name, run=run, stages={"warmup": name}, arm=name, **common))

    def adapted(name: str, overrides, prefix: str | None, labellers: bool = False, **extra) -> Job:
        run = Run(spec, f"{label}-{name}", seed, preset, strength, ("source_only.iters=0", "warmup.iters=0", *overrides),
                  upstream=(warmups["warmup"], "warmup"))
        run.until = f"stage{run.cfg.cag.stages}"
        stages = {f"stage{k}": None if prefix is None else f"{prefix}_stage{k}" for k in range(1, run.cfg.cag.stages + 1)}
        return Job("train", run.name, run=run, stages=stages, labellers=labellers, arm=name, **common, **extra)

    for arm in adapted_arms:
        jobs.append(adapted(arm, [] if arm == CAG_ARM else spec["arms"][arm], arm, arm in _pseudo_label_arms(spec)))
    if sweeping:
        sweeps = spec["sweeps"]
        gap_run = Run(spec, f"{label}-{CAG_ARM}", seed, preset, strength, ("source_only.iters=0", "warmup.iters=0"),
                      until="anchors", upstream=(warmups["warmup"], "warmup"))
        gap_job = Job("gap", gap_run.name, run=gap_run, arm="gap", **common)
        jobs.append(gap_job)
        record = ctx.cache.get(gap_job.units()[0])
        for fraction in sweeps.get("delta_d_fractions", []):
            if record is None:
                jobs.append(Job("pending", gap_run.name, run=gap_run, arm="delta_d", fraction=fraction, **common))
            else:
                gap = record["smallest_gap"]
                jobs.append(adapted(f"delta_d-{fraction:g}", [f"cag.delta_d={delta_d_value(fraction, gap)!r}"], None,
                                    labellers=True, fraction=fraction, gap=gap))
        for setting, overrides in (sweeps.get("settings") or {}).items():
            jobs.append(adapted(setting, overrides, setting))
    return jobs


def _job_cost(job: Job) -> float:
    """Training iterations a job would run if nothing were done (to order the groups, longest first)."""
    cfg = job.run.cfg
    if job.kind == "train" and job.run.oracle:
        return cfg.source_only.iters
    if job.kind == "train" and job.run.until == "warmup":
        return cfg.warmup.iters
    if job.kind in ("train", "pending"):
        return cfg.cag.iters * cfg.cag.stages
    return 0.0


def _benchmark_groups(spec: dict) -> list[tuple[str, int]]:
    return [(preset, seed) for preset, entry in spec["presets"].items() for seed in entry["seeds"]]


def _source_task(spec: dict, seed: int) -> None:
    ctx = Context(spec)
    run = source_run(spec, seed)
    ctx.ensure_trained(run)
    ctx.export(run, "source_only")


def _group_task(spec: dict, group: tuple[str, int]) -> None:
    preset, seed = group
    ctx = Context(spec)
    ctx.no_training = {source_run(spec, seed).name}
    jobs = group_jobs(spec, preset, seed, ctx)
    for job in jobs:
        ctx.execute(job)
    if any(job.kind == "pending" for job in jobs):  # the gap is cached now: the sweep points can run
        for job in group_jobs(spec, preset, seed, ctx):
            if job.fraction is not None:
                ctx.execute(job)


def benchmark_v2(spec: dict) -> dict:
    """Run a ``kind: benchmark_v2`` experiment file (resumable, cached: :mod:`cag.benchmark_runs`) and write
    ``summary.csv``, ``pseudo_labels.csv``, ``delta_d.csv``, ``comparisons.csv`` and ``runs.json``."""
    check_benchmark_spec(spec)
    started = time.time()
    ScoreCache(spec["results_dir"]).remove_partial_writes()
    jobs = spec.get("jobs", 1)
    first = next(iter(spec["presets"]))
    generate_data(spec, [(first, 0.0), *[(p, preset_strength(spec, p)) for p in spec["presets"]]], jobs)
    ctx = Context(spec)
    plan = {group: group_jobs(spec, *group, ctx) for group in _benchmark_groups(spec)}
    sources = sorted({seed for (_, seed), group in plan.items() for job in group for run in ctx.needed_runs(job)
                      if run.name == source_run(spec, seed).name})
    write_benchmark(spec)
    run_tasks(_source_task, spec, sources, jobs, on_progress=lambda: write_benchmark(spec))
    todo = [(sum(_job_cost(j) for j in group if ctx.missing(j)), key) for key, group in plan.items()]
    todo = [key for cost, key in sorted(todo, key=lambda item: -item[0]) if any(ctx.missing(j) for j in plan[key])]
    run_tasks(_group_task, spec, todo, jobs, on_progress=lambda: write_benchmark(spec))
    outcome = write_benchmark(spec, wall_seconds=time.time() - started)
    return {"results": spec["results_dir"], "wall_seconds": round(time.time() - started, 1), **outcome}


def benchmark_tables(spec: dict, ctx: Context | None = None) -> dict:
    """The benchmark's rows from the valid cached units: ``summary``, ``pseudo_labels``, ``delta_d``,
    ``comparison_rows`` (summary rows plus a ``best_val`` copy of ``last`` wherever both are the same
    weights), ``runs`` (every run of the plan) and ``complete`` (no unit missing)."""
    from .analysis import pseudo_label_rows
    from .labels import class_names

    ctx = ctx or Context(spec)
    num_classes = load_config(spec["base"], spec["overrides"]).data.num_classes
    names = class_names(num_classes)
    summary, labels, deltas, extra, runs = [], [], [], [], {}
    arm_order: dict[str, int] = {}
    complete = True
    for preset, seed in _benchmark_groups(spec):
        group = group_jobs(spec, preset, seed, ctx)
        runs.setdefault(source_run(spec, seed).name, source_run(spec, seed))
        check_lineage({ctx.cache.path(u): ctx.cache.get(u) for job in group for u in job.units()},
                      f"preset {preset}, seed {seed}")
        for job in group:
            if job.kind not in ("pending", "gap") or job.run.name not in runs:
                runs[job.run.name] = job.run
            if ctx.missing(job):
                complete = False
            records = {(u.stage, u.checkpoint): ctx.cache.get(u) for u in job.units()}
            for stage, arm in job.stages.items():
                if arm is None:
                    continue
                arm_order.setdefault(arm, len(arm_order))
                last = records.get((stage, "last"))
                for checkpoint in job.checkpoints:
                    record = records.get((stage, checkpoint))
                    if record is None:
                        continue
                    if record.get("same_as") == "last":
                        if last is not None:
                            extra.append({**_summary_row(job, arm, "last", last, names), "checkpoint": checkpoint})
                        continue
                    summary.append(_summary_row(job, arm, checkpoint, record, names))
            if job.labellers and job.arm in _pseudo_label_arms(spec):
                for k in range(1, job.run.cfg.cag.stages + 1):
                    record = records.get((f"stage{k}", "labeller"))
                    if record is not None:
                        labels += pseudo_label_rows(record["counts"], num_classes, preset=preset, arm=job.arm,
                                                    seed=seed, stage=k)
            if job.fraction is not None and job.kind == "train":
                for k in range(1, job.run.cfg.cag.stages + 1):
                    counts, score = records.get((f"stage{k}", "labeller")), records.get((f"stage{k}", "last"))
                    if counts is None and score is None:
                        continue
                    active, precision = anchor_activity(counts["counts"]["anchor"]) if counts else (None, None)
                    deltas.append({"preset": preset, "seed": seed, "fraction": job.fraction, "smallest_gap": job.gap,
                                   "delta_d": job.run.cfg.cag.delta_d, "stage": k, "active_fraction": active,
                                   "active_precision": precision, "miou": score["miou"] if score else None})
    preset_index = {p: i for i, p in enumerate(spec["presets"])}
    summary.sort(key=lambda r: (preset_index[r["preset"]], arm_order[r["arm"]], r["seed"], CHECKPOINTS.index(r["checkpoint"])))
    return {"summary": summary, "pseudo_labels": labels, "delta_d": deltas, "comparison_rows": summary + extra,
            "runs": list(runs.values()), "complete": complete, "classes": names}


def _summary_row(job: Job, arm: str, checkpoint: str, record: dict, names) -> dict:
    return {"preset": job.preset, "arm": arm, "seed": job.seed, "checkpoint": checkpoint, "miou": record["miou"],
            **{n: record["per_class_iou"].get(n) for n in names}}


def comparison_results(spec: dict, rows: list[dict], final: bool = False) -> list[dict]:
    """The declared comparisons (:func:`cag.comparisons.compare`) that ``rows`` can answer.

    Each runs on its declared seeds, or on every seed both arms are produced for. Before the end
    (``final=False``) a comparison whose rows are not all there yet is left out; at the end
    (``final=True``) that is an error naming it.
    """
    from .comparisons import compare

    out = []
    for index, entry in enumerate(spec.get("comparisons") or []):
        preset, arm_a, arm_b, checkpoint = entry[:4]
        seeds = entry[4] if len(entry) > 4 else _comparison_seeds(spec, preset, arm_a, arm_b)
        try:
            out.append(compare(rows, preset, arm_a, arm_b, checkpoint=checkpoint, seeds=seeds))
        except ValueError as err:
            if final:
                raise RuntimeError(f"comparisons[{index}] {entry}: {err}") from None
    return out


def write_benchmark(spec: dict, wall_seconds: float | None = None) -> dict:
    """Rewrite the benchmark's results files from the score cache; returns row counts."""
    from .comparisons import write_comparisons
    from .experiments import PSEUDO_LABEL_KEYS, SUMMARY_KEYS, write_csv, write_runs

    results = Path(spec["results_dir"])
    ctx = Context(spec)
    tables = benchmark_tables(spec, ctx)
    write_csv(results / "summary.csv", tables["summary"], SUMMARY_KEYS, tables["classes"])
    write_csv(results / "pseudo_labels.csv", tables["pseudo_labels"], PSEUDO_LABEL_KEYS)
    write_csv(results / "delta_d.csv", tables["delta_d"], DELTA_D_KEYS)
    final = wall_seconds is not None
    comparisons = comparison_results(spec, tables["comparison_rows"], final=final and tables["complete"])
    write_comparisons(results / "comparisons.csv", comparisons)
    record = runs_record(spec, ctx, tables["runs"], wall_seconds if tables["complete"] else None)
    record["eval_split"] = spec.get("eval_split", "test")
    write_runs(results / "runs.json", record)
    return {"summary_rows": len(tables["summary"]), "comparisons": len(comparisons), "complete": tables["complete"]}


# ----------------------------------------------------------------------------- benchmark v2: checks


def _override_key(text) -> str:
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"expected key=value, got {text!r}")
    return text.split("=", 1)[0].strip()


def stage_count(spec: dict, overrides) -> int:
    """``cag.stages`` of the base configuration with the file's and ``overrides``."""
    return load_config(spec["base"], [*spec["overrides"], *overrides]).cag.stages


def produced_arms(spec: dict, preset: str) -> dict[str, list[int]]:
    """Every summary arm a benchmark_v2 file produces on ``preset``, with its seeds."""
    seeds = list(spec["presets"][preset]["seeds"])
    arms = spec["presets"][preset]["arms"]
    out = {arm: seeds for arm in arms if arm in FIXED_V2_ARMS or arm in (spec.get("warmup_arms") or {})}
    for arm in _adapted_names(spec, preset):
        overrides = [] if arm == CAG_ARM else spec["arms"][arm]
        out.update({f"{arm}_stage{k}": seeds for k in range(1, stage_count(spec, overrides) + 1)})
    sweeps = spec.get("sweeps") or {}
    if sweeps.get("preset") == preset:
        sweep_seeds = list(sweeps.get("seeds", seeds))
        for setting, overrides in (sweeps.get("settings") or {}).items():
            out.update({f"{setting}_stage{k}": sweep_seeds for k in range(1, stage_count(spec, overrides) + 1)})
    return out


def _comparison_seeds(spec: dict, preset: str, arm_a: str, arm_b: str) -> list[int]:
    produced = produced_arms(spec, preset)
    return sorted(set(produced[arm_a]) & set(produced[arm_b]))


def check_benchmark_spec(spec: dict) -> None:
    """Check a ``kind: benchmark_v2`` file before any work; errors name the file and the key.

    Refused: a preset, arm, warm-up arm, sweep or comparison that is unknown or will not be
    produced; an adapted arm or setting that overrides what it shares with the others (the
    source-only and warm-up schedules, the model, the data, the seed); the evaluation split used
    for model selection (``data.val_split``) or being the target train split; a comparison with
    fewer than two seeds (no interval) or seeds that one of its arms does not have; any override
    set that is not a valid configuration.
    """
    where = spec.get("_file", "benchmark_v2")

    def fail(key: str, message: str):
        raise ConfigError(f"{where}: {key}: {message}")

    check_jobs(spec, where)
    check_oracle(spec, where)
    split = spec.get("eval_split", "test")
    base = load_config(spec["base"], spec["overrides"])
    if split == base.data.val_split:
        fail("eval_split", f"{split!r} is the split model selection and validation read (data.val_split); "
                           "scores must come from a held-out split")
    if split == "train":
        fail("eval_split", "the target train split is read by the adaptation; scores must come from a held-out split")
    presets = spec.get("presets")
    if not isinstance(presets, dict) or not presets:
        fail("presets", f"expected a mapping of preset -> {{seeds, arms}}, got {presets!r}")
    warmup_arms = spec.get("warmup_arms") or {}
    arms = spec.get("arms") or {}
    if not isinstance(warmup_arms, dict) or not isinstance(arms, dict):
        fail("arms" if not isinstance(arms, dict) else "warmup_arms", "expected a mapping of name -> list of overrides")
    sweeps = spec.get("sweeps") or {}
    settings = sweeps.get("settings") or {}
    reserved = set(FIXED_V2_ARMS) | {CAG_ARM}
    for section, entries in (("warmup_arms", warmup_arms), ("arms", arms), ("sweeps.settings", settings)):
        for name, overrides in entries.items():
            if not isinstance(name, str) or not name or "/" in name or "_stage" in name or name.startswith("delta_d"):
                fail(f"{section}.{name}", "a plain name without '/', '_stage' or a 'delta_d' prefix is expected")
            if section != "warmup_arms" and (name in reserved or name in warmup_arms):
                fail(f"{section}.{name}", "the name of a fixed or warm-up arm; choose another")
            if section == "sweeps.settings" and name in arms:
                fail(f"{section}.{name}", "also an arm of `arms`; choose another name")
            if section == "warmup_arms" and name in reserved:
                fail(f"{section}.{name}", "the name of a fixed arm; choose another")
            if not isinstance(overrides, list):
                fail(f"{section}.{name}", f"expected a list of key=value overrides, got {overrides!r}")
            for text in overrides:
                try:
                    key = _override_key(text)
                except ValueError as err:
                    fail(f"{section}.{name}", str(err))
                if section == "warmup_arms" and not key.startswith("warmup."):
                    fail(f"{section}.{name}", f"{key}: a warm-up arm may only change warmup.* keys")
                if section != "warmup_arms" and key.startswith(_FROZEN_FOR_ARMS):
                    fail(f"{section}.{name}", f"{key}: adapted arms start from the shared warm-up model and may not "
                                              f"change {', '.join(_FROZEN_FOR_ARMS)}")
            try:
                cfg = load_config(spec["base"], [*spec["overrides"], *overrides])
            except ConfigError as err:
                fail(f"{section}.{name}", str(err))
            if cfg.data.val_split == split:
                fail(f"{section}.{name}", f"data.val_split is the evaluation split {split!r}")
    for preset, entry in presets.items():
        if preset not in preset_names():
            fail(f"presets.{preset}", f"unknown preset; presets are {', '.join(preset_names())}")
        if not isinstance(entry, dict) or set(entry) - _BENCHMARK_PRESET_KEYS or not {"seeds", "arms"} <= set(entry):
            fail(f"presets.{preset}", f"expected a mapping with seeds, arms (and optionally strength), got {entry!r}")
        seeds = entry["seeds"]
        if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) or \
                not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            fail(f"presets.{preset}.seeds", f"expected a non-empty list of distinct integers, got {seeds!r}")
        known = set(FIXED_V2_ARMS) | {CAG_ARM} | set(warmup_arms) | set(arms)
        listed = entry["arms"]
        if not isinstance(listed, list) or not listed or len(set(listed)) != len(listed):
            fail(f"presets.{preset}.arms", f"expected a non-empty list of distinct arms, got {listed!r}")
        unknown = [a for a in listed if a not in known]
        if unknown:
            fail(f"presets.{preset}.arms", f"unknown arms {unknown}; known: {sorted(known)}")
        if _adapted_names(spec, preset) and "warmup" not in warmup_arms:
            fail("warmup_arms", f"the adapted arms of presets.{preset} start from the `warmup` arm's model; "
                                "declare warmup_arms.warmup")
        if "strength" in entry:
            try:
                preset_strength(spec, preset)
            except ValueError as err:
                fail(f"presets.{preset}.strength", str(err))
    for arm in _pseudo_label_arms(spec):
        if arm != CAG_ARM and arm not in arms:
            fail("pseudo_label_arms", f"{arm!r} is not `cag` or a key of arms")
    if sweeps:
        if not isinstance(sweeps, dict) or set(sweeps) - _SWEEP_KEYS or "preset" not in sweeps:
            fail("sweeps", f"expected a mapping with preset and any of seeds, delta_d_fractions, settings; got {sweeps!r}")
        if sweeps["preset"] not in presets:
            fail("sweeps.preset", f"{sweeps['preset']!r} is not a key of presets")
        outside = [s for s in sweeps.get("seeds", []) if s not in presets[sweeps["preset"]]["seeds"]]
        if outside:
            fail("sweeps.seeds", f"seeds {outside} are not seeds of presets.{sweeps['preset']}")
        fractions = sweeps.get("delta_d_fractions", [])
        if not isinstance(fractions, list) or not all(is_number(f) and f > 0 for f in fractions) or \
                len(set(fractions)) != len(fractions):
            fail("sweeps.delta_d_fractions", f"expected distinct positive numbers, got {fractions!r}")
        if "warmup" not in warmup_arms:
            fail("warmup_arms", "the sweeps start from the `warmup` arm's model; declare warmup_arms.warmup")
    comparisons = spec.get("comparisons") or []
    if not isinstance(comparisons, list):
        fail("comparisons", f"expected a list of [preset, arm_a, arm_b, checkpoint(, seeds)], got {comparisons!r}")
    for index, entry in enumerate(comparisons):
        key = f"comparisons[{index}]"
        if not isinstance(entry, list) or len(entry) not in (4, 5):
            fail(key, f"expected [preset, arm_a, arm_b, checkpoint] or [..., seeds], got {entry!r}")
        preset, arm_a, arm_b, checkpoint = entry[:4]
        if preset not in presets:
            fail(key, f"preset {preset!r} is not a key of presets")
        produced = produced_arms(spec, preset)
        for arm in (arm_a, arm_b):
            if arm not in produced:
                fail(key, f"arm {arm!r} is not produced on preset {preset!r}; produced: {sorted(produced)}")
        if arm_a == arm_b:
            fail(key, "compares an arm with itself")
        if checkpoint not in CHECKPOINTS:
            fail(key, f"checkpoint {checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
        common = sorted(set(produced[arm_a]) & set(produced[arm_b]))
        if len(entry) == 5:
            seeds = entry[4]
            if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
                fail(key, f"seeds: expected a list of integers, got {seeds!r}")
            missing = [s for s in seeds if s not in common]
            if missing:
                fail(key, f"seeds {missing} are not produced for both {arm_a} and {arm_b} (common seeds: {common})")
        else:
            seeds = common
            if set(produced[arm_a]) != set(produced[arm_b]):
                fail(key, f"{arm_a} has seeds {produced[arm_a]} and {arm_b} {produced[arm_b]}; "
                          "declare the seeds to compare as a fifth element")
        if len(set(seeds)) < 2:
            fail(key, f"a paired interval needs at least two seeds, got {seeds}")
