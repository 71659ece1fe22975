"""Resumable runs on the built-in benchmark: the runs, the jobs that score them, their scheduling.

``python -m cag experiments configs/experiments/calibration_v2.yaml`` (``kind: calibration``,
:mod:`cag.calibration`) and ``python -m cag experiments configs/experiments/benchmark_v2.yaml``
(``kind: benchmark_v2``, :mod:`cag.benchmark_table`) plan their work as the :class:`Run` and
:class:`Job` objects of this module; :mod:`cag.experiments` reads the file and dispatches. What a
job produces are scored units of the committed score cache (:mod:`cag.score_cache`).

Design
------
**Runs and their chain.** One source-only model per seed (``source-seed<s>``, trained on the
strength-0 data of the first preset: the source domain does not depend on the preset or
strength) feeds everything else of that seed. A run that starts from another run's model reads it
through an *exported* copy, ``<runs_dir>/inits/<run>-<stage>-<digest>.pt`` whose name holds the
digest of the upstream stage's fingerprint and data identity, passed as ``model.init``. So the
downstream pipeline fingerprint changes whenever anything upstream changes, and the pipeline's
own ``done.json`` skip stays correct. Each run folder records the data identity it was trained on
(``data-identity.json``); a folder trained on other data is moved aside (``<run>.stale-<time>``).

**Skipping.** Before a job trains anything it lists the units it would produce; when all are in
the cache with matching values, nothing is trained or even loaded. Checkpoints (``runs_dir``,
not committed) are needed only for units that are missing: a run whose scores were cached but
whose model a later run needs is retrained (CPU training is deterministic, so it reproduces the
same weights).

**Scheduling.** ``jobs: N`` runs independent tasks in N ``spawn`` worker processes with one
torch thread each (``jobs: 1``: in this process, with one thread too, so the models do not
depend on ``jobs``). All data folders are generated first (a session in a fresh clone
regenerates them: their manifests are the data identity the cache is checked against). The
result CSVs are rebuilt from the cache while the tasks run, so an interrupted command leaves
partial but valid files, and the same command resumes (pipeline checkpoints and the cache).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config, ConfigError, load_config
from .score_cache import (ScoreCache, Unit, announce, current_commit, data_identity, scoring_digest, short_digest,
                          weights_digest)

#: Checkpoints of a training stage that the benchmark scores (``best_val`` only when it differs).
CHECKPOINTS = ("last", "best_val")
_POLL_SECONDS = 2.0
_REWRITE_SECONDS = 30.0


# ----------------------------------------------------------------------------- runs


@dataclass
class Run:
    """A training run of the plan: a pipeline run up to ``until`` or (``until="target_oracle"``)
    the target-trained model; ``upstream`` = (run, stage) whose model it starts from."""

    spec: dict
    name: str
    seed: int
    preset: str
    strength: float
    extra: tuple = ()
    until: str = "source_only"
    upstream: tuple | None = None
    cfg: Config = field(init=False, repr=False)
    fingerprints: dict = field(init=False, repr=False)

    def __post_init__(self):
        self.cfg = self._config(provisional=True)
        self.fingerprints = self.fingerprints_of(self.cfg)

    @property
    def oracle(self) -> bool:
        return self.until == "target_oracle"

    @property
    def root(self) -> Path:
        from .experiments import data_root

        return data_root(self.spec, self.preset, self.strength)

    def roots(self) -> list[Path]:
        """Every data folder the run's models depend on (its own and its upstream runs')."""
        own = [self.root]
        return sorted(set(own + (self.upstream[0].roots() if self.upstream else [])), key=str)

    def init_path(self) -> Path | None:
        return None if self.upstream is None else self.upstream[0].export_path(self.upstream[1])

    def _config(self, provisional: bool) -> Config:
        """The run's configuration; ``model.init`` is the upstream export.

        While the export does not exist yet (its run may never need to train when the cache holds
        everything), the configuration is validated with the base file standing in for
        ``model.init`` and the export's path is then written in: only the fingerprints are read
        from such a configuration; :meth:`config` rebuilds it fully before any training.
        """
        from .experiments import run_config

        init = self.init_path()
        extra = list(self.extra)
        if init is None:
            return run_config(self.spec, name=self.name, seed=self.seed, preset=self.preset, strength=self.strength,
                              extra=extra)
        if init.is_file() or not provisional:
            return run_config(self.spec, name=self.name, seed=self.seed, preset=self.preset, strength=self.strength,
                              extra=[f"model.init={init}", *extra])
        cfg = run_config(self.spec, name=self.name, seed=self.seed, preset=self.preset, strength=self.strength,
                         extra=[f"model.init={self.spec['base']}", *extra])
        cfg.model.init = str(init)
        return cfg

    def config(self) -> Config:
        """The fully validated configuration (the upstream export must exist)."""
        cfg = self._config(provisional=False)
        if self.fingerprints_of(cfg) != self.fingerprints:
            raise RuntimeError(f"{self.name}: the validated configuration has other fingerprints than the planned one")
        return cfg

    @staticmethod
    def fingerprints_of(cfg: Config) -> dict:
        from .experiments import oracle_fingerprint
        from .pipeline import fingerprints

        return {**fingerprints(cfg), "target_oracle": oracle_fingerprint(cfg)}

    def fingerprint(self, stage: str) -> str:
        return self.fingerprints[stage]

    def identity(self) -> dict:
        """:func:`cag.score_cache.data_identity` of every data folder of :meth:`roots`."""
        return {str(root): data_identity(root) for root in self.roots()}

    def lineage(self) -> str | None:
        """The :func:`cag.score_cache.weights_digest` of the source-only model this run descends from
        (:mod:`cag.score_cache`, *Lineage*): the one its upstream export records when that exists
        (what this run starts from), else the root run's trained ``source_only/last.pt``; None for
        the oracle and while that model is not trained on the current data in this checkout."""
        if self.upstream is not None:
            upstream, stage = self.upstream
            export = upstream.export_path(stage)
            return (export_lineage(export) if export.is_file() else None) or upstream.lineage()
        if self.oracle:
            return None
        stage_dir = self.stage_dir("source_only")
        done, last, marker = stage_dir / "done.json", stage_dir / "last.pt", self.cfg.run_dir / "data-identity.json"
        if not (last.is_file() and done.is_file() and marker.is_file()
                and json.loads(done.read_text()).get("fingerprint") == self.fingerprint("source_only")
                and json.loads(marker.read_text()) == self.identity()):
            return None
        return weights_digest(last)

    def export_path(self, stage: str) -> Path:
        """Where the model of ``stage`` is exported for the runs that start from it (module docstring)."""
        digest = short_digest(self.fingerprint(stage), self.identity())
        return Path(self.spec["runs_dir"]) / "inits" / f"{self.name}-{stage}-{digest}.pt"

    def stage_dir(self, stage: str) -> Path:
        return self.cfg.run_dir / stage


@dataclass
class Job:
    """Work that produces units: ``train`` (score stages of ``run``), ``transfer`` (score the source
    run's model on another target), ``adabn``, ``gap`` (smallest anchor gap of ``run``) or
    ``pending`` (a Delta_d sweep point whose value waits for the gap)."""

    kind: str
    label: str
    preset: str
    strength: float
    seed: int
    split: str
    run: Run
    stages: dict = field(default_factory=dict)
    target: Config | None = None
    checkpoints: tuple = CHECKPOINTS
    labellers: bool = False
    arm: str = ""
    fraction: float | None = None
    gap: float | None = None

    def units(self) -> list[Unit]:
        """Every unit the job produces (empty for a pending sweep point)."""
        if self.kind == "pending":
            return []
        run = self.run
        lineage = run.lineage()
        if self.kind in ("transfer", "adabn"):
            data = {**run.identity(), str(self._target_root()): data_identity(self._target_root())}
            out = []
            for stage, arm in self.stages.items():
                base = run.fingerprint(stage)
                for checkpoint in self.checkpoints:
                    fp = base if self.kind == "transfer" else self.adabn_fingerprint(base, checkpoint)
                    out.append(Unit(self.label, f"{arm}-{checkpoint}-{self.split}", fp,
                                    scoring_digest(self.target, self.split), data, self.seed, stage, checkpoint,
                                    lineage))
            return out
        data = run.identity()
        if self.kind == "gap":
            return [Unit(self.label, "anchors-gap-source", run.fingerprint("anchors"), "gap/1", data, self.seed,
                         "anchors", "gap", lineage)]
        out = [Unit(self.label, f"{stage}-{checkpoint}-{self.split}", run.fingerprint(stage),
                    scoring_digest(run.cfg, self.split), data, self.seed, stage, checkpoint, lineage)
               for stage in self.stages for checkpoint in self.checkpoints]
        if self.labellers:
            out += [Unit(self.label, f"stage{k}-labeller-train", run.fingerprint(f"stage{k}"), "labeller/1", data,
                         self.seed, f"stage{k}", "labeller", lineage) for k in range(1, run.cfg.cag.stages + 1)]
        return out

    def _target_root(self) -> Path:
        return Path(self.target.data.synthetic.root)

    def adabn_fingerprint(self, source_fingerprint: str, checkpoint: str) -> str:
        """AdaBN's unit fingerprint: the source stage's, the checkpoint, the target configuration
        (data, evaluation transform, batch size; not the run name or folders) and the split adapted on."""
        target = self.target.to_dict()
        for key in ("name", "out_dir", "quiet", "device"):  # as cag.pipeline leaves them out of its fingerprints
            target.pop(key)
        target["data"].pop("num_workers")
        for key in ("log_interval", "checkpoint_interval"):
            target["train"].pop(key)
        return short_digest("adabn/1", source_fingerprint, checkpoint, target, "train")


class Context:
    """What one process needs to execute jobs: the spec, the cache and the runs already made
    sure of in this process."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.quiet = spec.get("quiet", True)
        self.cache = ScoreCache(spec["results_dir"], quiet=self.quiet)
        self.ready: set = set()
        self.no_training: set = set()  # run names this process must find trained (phase 2: the source runs)

    # -- runs -----------------------------------------------------------------------------
    def _marker(self, run: Run) -> Path:
        return run.cfg.run_dir / "data-identity.json"

    def _marker_ok(self, run: Run) -> bool:
        marker = self._marker(run)
        return marker.is_file() and json.loads(marker.read_text()) == run.identity()

    def is_trained(self, run: Run) -> bool:
        """The run's final stage is done for its fingerprint, on the current data."""
        if not self._marker_ok(run):
            return False
        if run.oracle:
            done = run.stage_dir("target_oracle") / "done.json"
            return done.is_file() and json.loads(done.read_text()).get("fingerprint") == run.fingerprint("target_oracle")
        from .pipeline import Pipeline

        return Pipeline(run.cfg).done(run.until) is not None

    def ensure_trained(self, run: Run) -> None:
        """Train ``run`` (resuming, skipping done stages), its upstream exports first."""
        key = (run.name, run.until)
        if key in self.ready:
            return
        if not self.is_trained(run):
            if run.name in self.no_training:
                raise RuntimeError(f"{run.cfg.run_dir}: expected trained by phase 1 of the benchmark, but it is not")
            if run.upstream is not None:
                self.export(*run.upstream)
            cfg = run.config()
            self._claim(run)
            started = time.time()
            if run.oracle:
                from .experiments import train_oracle

                train_oracle(cfg)
            else:
                from .pipeline import Pipeline

                Pipeline(cfg).run(until=run.until)
            announce(self.quiet, f"[experiments] trained {cfg.run_dir} up to {run.until} in {time.time() - started:.0f} s")
        self.ready.add(key)

    def _claim(self, run: Run) -> None:
        """Move aside a run folder trained on other data; record the current data's identity."""
        run_dir, marker = run.cfg.run_dir, self._marker(run)
        identity = run.identity()
        if run_dir.exists() and not (marker.is_file() and json.loads(marker.read_text()) == identity):
            if any(run_dir.iterdir()):
                aside = run_dir.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(str(run_dir), str(aside))
                announce(self.quiet, f"[experiments] {run_dir} was trained on other data (or before data identities "
                                 f"were recorded); moved to {aside}")
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
        os.replace(tmp, marker)

    def export(self, run: Run, stage: str) -> Path:
        """The exported model of ``run``'s ``stage`` (the one the pipeline hands on), made if missing."""
        from .checkpoint import save_checkpoint
        from .pipeline import Pipeline
        from .stages import read_model_state

        path = run.export_path(stage)
        if path.is_file():
            recorded, current = export_lineage(path), run.lineage()
            if None not in (recorded, current) and recorded != current:
                raise RuntimeError(f"{path}: exported from source-only model {recorded}, but {run.cfg.run_dir} now "
                                   f"descends from {current} (retrained?); delete {path} and the runs trained from it")
            return path
        self.ensure_trained(run)
        source = Pipeline(run.cfg).model_of(stage)
        save_checkpoint(path, {"format": "cag-model/1", "model": read_model_state(source), "exported_from": str(source),
                               "fingerprint": run.fingerprint(stage), "lineage": run.lineage()})
        return path

    # -- jobs -----------------------------------------------------------------------------
    def missing(self, job: Job) -> bool:
        """True when some unit of ``job`` is not validly cached (always for a pending sweep point)."""
        return job.kind == "pending" or any(self.cache.status(u) != "valid" for u in job.units())

    def needed_runs(self, job: Job) -> list[Run]:
        """The runs that must be trained (not only read) for ``job``'s missing units, upstream last."""
        if not self.missing(job):
            return []
        run = job.run
        if job.kind in ("transfer", "adabn"):
            return [] if self.is_trained(run) else [run]
        needed = []
        if job.kind == "pending" or not self.is_trained(run):
            needed.append(run)
            while run.upstream is not None:
                upstream, stage = run.upstream
                if upstream.export_path(stage).is_file():
                    break
                if self.is_trained(upstream):
                    break
                needed.append(upstream)
                run = upstream
        return needed

    def execute(self, job: Job) -> int:
        """Produce the job's missing units (training what they need); returns how many were written."""
        units = job.units()
        todo = [u for u in units if self.cache.status(u, report=True) != "valid"]
        if not todo:
            return 0
        self.ensure_trained(job.run)
        # trained now: the lineage is known, and a unit recorded from another source-only model is stale too
        todo = [u for u in job.units() if self.cache.status(u, report=True) != "valid"]
        for unit in todo:
            started = time.time()
            payload, wall = self._measure(job, unit)
            record = self.cache.put(unit, payload, wall, time.time() - started)
            shown = f"mIoU {record['miou']:.4f}" if record.get("miou") is not None else \
                ", ".join(f"{k} {record[k]}" for k in ("same_as", "smallest_gap") if k in record) or "counts"
            announce(self.quiet, f"[experiments] {self.cache.path(unit)}: {shown}")
            if _IN_PROCESS_PROGRESS:
                _IN_PROCESS_PROGRESS[0]()
        return len(todo)

    def _measure(self, job: Job, unit: Unit) -> tuple[dict, float | None]:
        from .experiments import score

        stage, checkpoint, split = unit.stage, unit.checkpoint, job.split
        if job.kind == "gap":
            return self._gap(job.run), None
        if checkpoint == "labeller":
            return self._labeller(job.run, int(stage[len("stage"):])), None
        # scoring reads the checkpoint, never model.init: the planned configuration serves
        stage_dir, cfg = job.run.stage_dir(stage), job.target if job.kind in ("transfer", "adabn") else job.run.cfg
        wall = _stage_wall_seconds(stage_dir)
        if checkpoint == "best_val" and _best_is_last(stage_dir):
            return {"same_as": "last"}, wall
        path = stage_dir / f"{checkpoint}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint not found although {stage_dir.name} is done; "
                                    f"delete {job.run.cfg.run_dir} and run the command again")
        if job.kind == "adabn":
            from .adabn import adapt_checkpoint

            started = time.time()
            path = adapt_checkpoint(cfg, path, Path(self.spec["runs_dir"]) / "adabn" / job.label / f"{checkpoint}.pt",
                                    split="train")
            wall = time.time() - started
        result = score(cfg, path, split)
        return {"miou": result["miou"], "per_class_iou": result["per_class_iou"], "checkpoint": str(path),
                **({"adapted_on": "train"} if job.kind == "adabn" else {})}, wall

    def _labeller(self, run: Run, k: int) -> dict:
        from .analysis import QUALITY_COUNTS, pseudo_label_counts, stage_labellers

        if k == 1 and run.upstream is not None:
            self.export(*run.upstream)  # stage 1's labeller is the model the run started from
        cfg = run.cfg
        _, labeller, anchors = stage_labellers(cfg)[k - 1]
        counts = pseudo_label_counts(cfg, labeller, anchors)
        return {"counts": {rule: {key: torch.as_tensor(c[key]).tolist() for key in QUALITY_COUNTS}
                           for rule, c in counts.items()},
                "delta_d": cfg.cag.delta_d, "prob_threshold": cfg.cag.prob_threshold, "labeller": str(labeller)}

    def _gap(self, run: Run) -> dict:
        from .anchors import load_anchors
        from .labels import class_names
        from .pseudo_labels import smallest_anchor_gap

        anchors, counts = load_anchors(run.stage_dir("anchors") / "anchors.pt")
        gap, (i, j) = smallest_anchor_gap(anchors, counts > 0)
        names = class_names(run.cfg.data.num_classes)
        return {"smallest_gap": gap, "pair": [names[i], names[j]], "valid_anchors": int((counts > 0).sum())}


_EXPORT_LINEAGES: dict = {}


def export_lineage(path: Path) -> str | None:
    """The lineage an exported model records (None for an export made before lineages were)."""
    from .checkpoint import load_checkpoint

    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _EXPORT_LINEAGES:
        _EXPORT_LINEAGES[key] = load_checkpoint(path).get("lineage")
    return _EXPORT_LINEAGES[key]


def _best_is_last(stage_dir: Path) -> bool:
    """True when the stage's ``best_val`` model is its last one: the best validation came at the
    last iteration, or the stage never validated (then the pipeline hands on ``last.pt`` too)."""
    summary = stage_dir / "summary.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{summary}: missing although the stage is done")
    record = json.loads(summary.read_text())
    return record.get("best_val_iter") == record.get("iters") or record.get("best_val_iter") in (None, -1)


def _stage_wall_seconds(stage_dir: Path) -> float | None:
    summary = stage_dir / "summary.json"
    return json.loads(summary.read_text()).get("wall_seconds") if summary.is_file() else None


# ----------------------------------------------------------------------------- scheduling


#: With ``jobs: 1`` the results writer, called (at most every 30 s) after each unit written.
_IN_PROCESS_PROGRESS: list = []


def _throttled(function, seconds: float):
    last = [time.time()]

    def call():
        if time.time() - last[0] >= seconds:
            function()
            last[0] = time.time()
    return call


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_tasks(function, spec: dict, tasks: list, jobs: int, on_progress=None) -> None:
    """Run ``function(spec, task)`` for every task: in this process for ``jobs == 1``, else in
    ``jobs`` spawn worker processes (a fresh process per task). Every task runs with one torch
    thread, in this process too, so that a model retrained in a later session with another
    ``jobs`` is the same model.

    ``on_progress()`` is called after each task and, while workers run, whenever the score cache
    changes (checked every 30 s). The first failure stops the pool (work in progress resumes on
    the next command) and is raised.
    """
    if not tasks:
        return
    if jobs == 1:
        if on_progress:
            _IN_PROCESS_PROGRESS[:] = [_throttled(on_progress, _REWRITE_SECONDS)]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a worker: the numbers do not depend on `jobs`
        try:
            for task in tasks:
                function(spec, task)
                if on_progress:
                    on_progress()
        finally:
            torch.set_num_threads(threads)
            _IN_PROCESS_PROGRESS.clear()
        return
    from multiprocessing import get_context

    cache = ScoreCache(spec["results_dir"])
    pool = get_context("spawn").Pool(min(jobs, len(tasks)), initializer=_worker_init, maxtasksperchild=1)
    try:
        pending = [pool.apply_async(function, (spec, task)) for task in tasks]
        seen, last_check = cache.snapshot(), time.time()
        while pending:
            time.sleep(_POLL_SECONDS)
            finished = [r for r in pending if r.ready()]
            for result in finished:
                pending.remove(result)
                result.get()  # raises the worker's exception
            changed = bool(finished)
            if time.time() - last_check > _REWRITE_SECONDS:
                now, last_check = cache.snapshot(), time.time()
                changed, seen = changed or now != seen, now
            if changed and on_progress:
                on_progress()
        pool.close()
        pool.join()
    except BaseException:
        pool.terminate()
        pool.join()
        raise


def _generate(spec: dict, task: tuple) -> None:
    from .experiments import run_config
    from .pipeline import Pipeline

    preset, strength = task
    Pipeline(run_config(spec, name="data", seed=0, preset=preset, strength=strength)).prepare_data()


def _looks_current(spec: dict, preset: str, strength: float) -> bool:
    """True when the folder's manifest is complete and agrees with the configuration's generator
    settings (a cheap test that decides only whether a worker process is started for it)."""
    from .experiments import run_config

    syn = run_config(spec, name="data", seed=0, preset=preset, strength=strength).data.synthetic
    try:
        parameters = data_identity(syn.root)["parameters"]
    except ConfigError:
        return False
    wanted = {k: v for k, v in vars(syn).items() if k != "root"}
    return all(parameters[k] == v for k, v in wanted.items() if k in parameters)


def generate_data(spec: dict, cells, jobs: int) -> None:
    """Generate the data folder of every (preset, strength) in ``cells``: folders that look out of
    date in ``jobs`` worker processes, then every folder checked (and regenerated if need be)
    here by :meth:`cag.pipeline.Pipeline.prepare_data`."""
    cells = sorted(set(cells))
    run_tasks(_generate, spec, [c for c in cells if not _looks_current(spec, *c)], jobs)
    for cell in cells:
        _generate(spec, cell)


# ----------------------------------------------------------------------------- shared by calibration and benchmark


def is_number(value) -> bool:
    """True for an int or a float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def preset_names() -> tuple:
    """The built-in benchmark's preset names."""
    from .config import CHOICES

    return CHOICES["data.synthetic.preset"]


def check_jobs(spec: dict, where: str) -> None:
    """Refuse a ``jobs`` entry that is not a whole number >= 1."""
    jobs = spec.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"{where}: jobs: expected a whole number >= 1, got {jobs!r}")


def cell_label(preset: str, strength: float, seed: int) -> str:
    """The label of a (preset, strength, seed) cell: ``<preset>-<strength>-seed<seed>``."""
    return f"{preset}-{strength:g}-seed{seed}"


def source_run(spec: dict, seed: int, multiple: int = 1) -> Run:
    """The source-only run of a seed (``source-seed<s>``; ``multiple`` x the iterations: ``-x<k>``),
    trained on the strength-0 data of the first preset (source data do not depend on either)."""
    first = next(iter(spec["grid"] if "grid" in spec else spec["presets"]))
    extra = ()
    name = f"source-seed{seed}"
    if multiple != 1:
        base = load_config(spec["base"], spec["overrides"])
        extra = (f"source_only.iters={multiple * base.source_only.iters}",)
        if base.source_only.poly_horizon is not None:
            extra += (f"source_only.poly_horizon={multiple * base.source_only.poly_horizon}",)
        name += f"-x{multiple}"
    return Run(spec, name, seed, first, 0.0, extra, until="source_only")


#: ``oracle.init`` values: train the target oracle from scratch, or fine-tune the seed's source-only model.
ORACLE_INITS = ("scratch", "source_only")


def oracle_from_source(spec: dict) -> bool:
    """True when the experiment file's ``oracle.init`` is ``source_only``."""
    return (spec.get("oracle") or {}).get("init", "scratch") == "source_only"


def oracle_run(spec: dict, label: str, seed: int, preset: str, strength: float) -> Run:
    """The target-trained reference of a cell (``<label>/target_oracle``).

    ``oracle.init: scratch`` (the default): the network trained from scratch on the cell's target
    train labels with the source-only schedule. ``oracle.init: source_only``: the seed's
    source-only model (:func:`source_run`, the checkpoint its pipeline hands on: ``best_val``)
    fine-tuned on them: what the same network reaches with the target labels, a reference rather
    than a bound on unsupervised adaptation. ``oracle.overrides`` change its schedule (keys of
    ``source_only``, which :func:`cag.stages.supervised_stage` reads) and nothing else.
    """
    oracle = spec.get("oracle") or {}
    upstream = (source_run(spec, seed), "source_only") if oracle_from_source(spec) else None
    return Run(spec, label, seed, preset, strength, tuple(oracle.get("overrides", [])), until="target_oracle",
               upstream=upstream)


def check_oracle(spec: dict, where: str) -> None:
    """Refuse an ``oracle`` entry other than ``{init: scratch|source_only, overrides: [source_only.*=...]}``."""
    oracle = spec.get("oracle")
    if oracle is None:
        return
    if not isinstance(oracle, dict) or set(oracle) - {"init", "overrides"}:
        raise ConfigError(f"{where}: oracle: expected a mapping with the keys init and overrides, got {oracle!r}")
    if oracle.get("init", "scratch") not in ORACLE_INITS:
        raise ConfigError(f"{where}: oracle.init: expected one of {', '.join(ORACLE_INITS)}, got {oracle.get('init')!r}")
    overrides = oracle.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) and o.startswith("source_only.") and "=" in o
                                                  for o in overrides):
        raise ConfigError(f"{where}: oracle.overrides: expected a list of source_only.KEY=VALUE (the oracle's "
                          f"schedule), got {overrides!r}")
    try:
        load_config(spec["base"], [*spec["overrides"], *overrides])
    except ConfigError as err:
        raise ConfigError(f"{where}: oracle.overrides: {err}") from None


def target_config(spec: dict, label: str, seed: int, preset: str, strength: float) -> Config:
    """The configuration of the cell's target data that ``transfer`` and ``adabn`` jobs score on."""
    from .experiments import run_config

    return run_config(spec, name=label, seed=seed, preset=preset, strength=strength)


def runs_record(spec: dict, ctx: Context, runs, wall_seconds: float | None) -> dict:
    """``runs.json``: every run of the plan with its configuration, and the command's wall time."""
    entries = []
    for run in runs:
        entries.append({"run": str(run.cfg.run_dir), "until": run.until, "seed": run.seed, "preset": run.preset,
                        "strength": run.strength, "checkpoints_here": ctx.is_trained(run),
                        "config": run.cfg.to_dict()})
    return {"complete": wall_seconds is not None, "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1),
            "jobs": spec.get("jobs", 1), "commit": current_commit(), "runs": entries}
