"""Resumable calibration and benchmark runs on the built-in benchmark, with a committed score cache.

``python -m cag experiments configs/experiments/calibration_v2.yaml`` (``kind: calibration``) and
``python -m cag experiments configs/experiments/benchmark_v2.yaml`` (``kind: benchmark_v2``) run
here; :mod:`cag.experiments` reads the file and dispatches.

Design
------
The table is too long for one working session, and every session starts from a fresh clone in
which only committed files exist. So the unit of progress is a **scored unit**: one checkpoint of
one run scored on one split (or one other small measurement: a pseudo-labeller's counts, the
smallest distance between anchors). Each unit is a small JSON file,
``<results_dir>/scores/<run>/<stage>-<checkpoint>-<split>.json`` (:class:`ScoreCache`;
``stage<k>-labeller-train.json`` for a CAG stage's pseudo-label counts on the target train split,
``anchors-gap-source.json`` for the anchor gap), holding the numbers and what they were computed
from:

* ``fingerprint``: the stage's :func:`cag.pipeline.fingerprints` entry (configuration of the
  stage and of every stage it reads), or for units outside the pipeline (oracle, AdaBN) a digest
  of the resolved configuration;
* ``scoring``: a digest of how it was measured (the ``eval`` settings and the split);
* ``data``: the generator's identity of every data folder involved (``format_version`` and
  ``parameters`` of each ``<data root>/benchmark.json``), so a new generator never reuses old
  numbers;
* ``seed``, ``commit``, ``wall_seconds`` (training), ``score_seconds``.

A unit whose file holds other values than the current ones is re-run and its file replaced,
never reused. Files are written atomically (temporary file, then ``os.replace``).

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
calibration's tasks are one per source-only model (with its scores and AdaBN on every grid
cell), per plateau model and per oracle, longest first. The benchmark runs, in phase 1, the
source-only model of every seed that something missing needs; in phase 2 the (preset, seed)
groups, arms in sequence within a group (warm-up before the CAG arms). The result CSVs are
rebuilt from the cache while the tasks run, so an interrupted command leaves partial but valid
files, and the same command resumes (pipeline checkpoints and the cache).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config, ConfigError, load_config

#: Folder under ``results_dir`` that holds the score cache.
SCORES = "scores"
#: Checkpoints of a training stage that the benchmark scores (``best_val`` only when it differs).
CHECKPOINTS = ("last", "best_val")
#: Columns of ``calibration.csv``.
CALIBRATION_KEYS = ("preset", "strength", "seed", "split", "source_iters", "source_only", "adabn", "target_oracle",
                    "ratio", "closure")
#: Leading columns of ``calibration_classes.csv`` (one column per class follows).
CALIBRATION_CLASS_KEYS = ("preset", "strength", "seed", "split", "arm")
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
_POLL_SECONDS = 2.0
_REWRITE_SECONDS = 30.0


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


_COMMIT: list[str] = []


def _commit() -> str:
    from .stages import git_commit

    if not _COMMIT:
        _COMMIT.append(git_commit())
    return _COMMIT[0]


# ----------------------------------------------------------------------------- pure arithmetic


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


def smallest_anchor_gap(anchors: torch.Tensor, counts: torch.Tensor) -> tuple[float, tuple[int, int]]:
    """The smallest Euclidean distance between two valid anchors, and the pair of classes.

    Valid anchors are those with a count > 0 (the others take part in no active-target test).
    Distances are computed directly (no matrix-multiply shortcut), in float64. Raises ValueError
    with fewer than two valid anchors.
    """
    index = torch.nonzero(torch.as_tensor(counts) > 0).flatten()
    if index.numel() < 2:
        raise ValueError(f"smallest_anchor_gap: {index.numel()} valid anchor(s); at least two are needed")
    points = torch.as_tensor(anchors)[index].double()
    distances = torch.cdist(points.unsqueeze(0), points.unsqueeze(0), compute_mode="donot_use_mm_for_euclid_dist")[0]
    distances.fill_diagonal_(math.inf)
    flat = int(torch.argmin(distances))
    i, j = divmod(flat, distances.shape[1])
    return float(distances[i, j]), (int(index[i]), int(index[j]))


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


# ----------------------------------------------------------------------------- score cache


@dataclass
class Unit:
    """One cached measurement: ``scores/<label>/<name>.json`` and the values it must match."""

    label: str
    name: str
    fingerprint: str
    scoring: str
    data: dict
    seed: int
    stage: str = ""
    checkpoint: str = ""


class ScoreCache:
    """The committed cache of scored units under ``<results_dir>/scores/`` (module docstring)."""

    def __init__(self, results_dir, quiet: bool = True):
        self.root = Path(results_dir) / SCORES
        self.quiet = quiet

    def path(self, unit: Unit) -> Path:
        return self.root / unit.label / f"{unit.name}.json"

    def status(self, unit: Unit, report: bool = False) -> str:
        """``valid`` (present with the unit's fingerprint, scoring and data), ``missing`` or ``stale``.

        With ``report`` a stale file is named in one line (when not quiet): it will be re-run."""
        record = self._read(self.path(unit))
        if record is None:
            return "missing"
        if (record.get("fingerprint"), record.get("scoring"), record.get("data")) == \
                (unit.fingerprint, unit.scoring, unit.data):
            return "valid"
        if report:
            what = [k for k, v in (("fingerprint", unit.fingerprint), ("scoring", unit.scoring), ("data", unit.data))
                    if record.get(k) != v]
            _say(self.quiet, f"[cache] {self.path(unit)}: recorded with another {' and '.join(what)}; re-running it")
        return "stale"

    def get(self, unit: Unit) -> dict | None:
        """The unit's record when it is valid (:meth:`status`), else None."""
        record = self._read(self.path(unit))
        if record is None or (record.get("fingerprint"), record.get("scoring"), record.get("data")) != \
                (unit.fingerprint, unit.scoring, unit.data):
            return None
        return record

    def put(self, unit: Unit, payload: dict, wall_seconds: float | None, score_seconds: float) -> dict:
        """Write the unit's record atomically and return it."""
        record = {"run": unit.label, "unit": unit.name, "fingerprint": unit.fingerprint, "scoring": unit.scoring,
                  "data": unit.data, "seed": unit.seed, "commit": _commit(),
                  "wall_seconds": None if wall_seconds is None else round(float(wall_seconds), 1),
                  "score_seconds": round(float(score_seconds), 1),
                  "written": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload}
        path = self.path(unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return record

    def remove_partial_writes(self) -> None:
        """Delete the temporary files of writes that a killed process cut short."""
        for path in self.root.glob("*/.*.tmp") if self.root.exists() else []:
            path.unlink(missing_ok=True)

    def snapshot(self) -> tuple[int, float]:
        """(number of files, latest modification time): changes whenever a unit is written."""
        files = list(self.root.glob("*/*.json")) if self.root.exists() else []
        return len(files), max((f.stat().st_mtime for f in files), default=0.0)

    def _read(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            _say(self.quiet, f"[cache] {path}: unreadable; it will be re-run and replaced")
            return None
        return record if isinstance(record, dict) else None


# ----------------------------------------------------------------------------- data


_IDENTITIES: dict = {}


def data_identity(root) -> dict:
    """``{"format_version", "parameters"}`` of the benchmark manifest ``<root>/benchmark.json``.

    Raises ConfigError naming the file when it is missing, unreadable or not complete (the
    data must be generated before anything is looked up in the cache).
    """
    path = Path(root) / "benchmark.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no benchmark manifest; the data folder has not been generated")
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key in _IDENTITIES:
        return _IDENTITIES[key]
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable benchmark manifest ({err})") from None
    if manifest.get("complete") is not True or "parameters" not in manifest or "format_version" not in manifest:
        raise ConfigError(f"{path}: incomplete benchmark manifest (generation was interrupted?); "
                          "run the command again to regenerate")
    _IDENTITIES[key] = {"format_version": manifest["format_version"], "parameters": manifest["parameters"]}
    return _IDENTITIES[key]


def _score_digest(cfg: Config, split: str) -> str:
    return _digest("score/1", cfg.to_dict()["eval"], cfg.data.num_classes, cfg.train.amp, split)


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
        """:func:`data_identity` of every data folder of :meth:`roots`."""
        return {str(root): data_identity(root) for root in self.roots()}

    def export_path(self, stage: str) -> Path:
        """Where the model of ``stage`` is exported for the runs that start from it (module docstring)."""
        digest = _digest(self.fingerprint(stage), self.identity())
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
        if self.kind in ("transfer", "adabn"):
            data = {**run.identity(), str(self._target_root()): data_identity(self._target_root())}
            out = []
            for stage, arm in self.stages.items():
                base = run.fingerprint(stage)
                for checkpoint in self.checkpoints:
                    fp = base if self.kind == "transfer" else self.adabn_fingerprint(base, checkpoint)
                    out.append(Unit(self.label, f"{arm}-{checkpoint}-{self.split}", fp,
                                    _score_digest(self.target, self.split), data, self.seed, stage, checkpoint))
            return out
        data = run.identity()
        if self.kind == "gap":
            return [Unit(self.label, "anchors-gap-source", run.fingerprint("anchors"), "gap/1", data, self.seed,
                         "anchors", "gap")]
        out = [Unit(self.label, f"{stage}-{checkpoint}-{self.split}", run.fingerprint(stage),
                    _score_digest(run.cfg, self.split), data, self.seed, stage, checkpoint)
               for stage in self.stages for checkpoint in self.checkpoints]
        if self.labellers:
            out += [Unit(self.label, f"stage{k}-labeller-train", run.fingerprint(f"stage{k}"), "labeller/1", data,
                         self.seed, f"stage{k}", "labeller") for k in range(1, run.cfg.cag.stages + 1)]
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
        return _digest("adabn/1", source_fingerprint, checkpoint, target, "train")


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
            _say(self.quiet, f"[experiments] trained {cfg.run_dir} up to {run.until} in {time.time() - started:.0f} s")
        self.ready.add(key)

    def _claim(self, run: Run) -> None:
        """Move aside a run folder trained on other data; record the current data's identity."""
        run_dir, marker = run.cfg.run_dir, self._marker(run)
        identity = run.identity()
        if run_dir.exists() and not (marker.is_file() and json.loads(marker.read_text()) == identity):
            if any(run_dir.iterdir()):
                aside = run_dir.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(str(run_dir), str(aside))
                _say(self.quiet, f"[experiments] {run_dir} was trained on other data (or before data identities "
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
            return path
        self.ensure_trained(run)
        source = Pipeline(run.cfg).model_of(stage)
        save_checkpoint(path, {"format": "cag-model/1", "model": read_model_state(source), "exported_from": str(source),
                               "fingerprint": run.fingerprint(stage)})
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
        for unit in todo:
            started = time.time()
            payload, wall = self._measure(job, unit)
            record = self.cache.put(unit, payload, wall, time.time() - started)
            shown = f"mIoU {record['miou']:.4f}" if record.get("miou") is not None else \
                ", ".join(f"{k} {record[k]}" for k in ("same_as", "smallest_gap") if k in record) or "counts"
            _say(self.quiet, f"[experiments] {self.cache.path(unit)}: {shown}")
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
        from .analysis import QUALITY_COUNTS
        from .experiments import pseudo_label_counts, stage_labellers

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

        anchors, counts = load_anchors(run.stage_dir("anchors") / "anchors.pt")
        gap, (i, j) = smallest_anchor_gap(anchors, counts)
        names = class_names(run.cfg.data.num_classes)
        return {"smallest_gap": gap, "pair": [names[i], names[j]], "valid_anchors": int((counts > 0).sum())}


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


# ----------------------------------------------------------------------------- calibration


def check_calibration_spec(spec: dict) -> None:
    """Refuse a calibration file that would read the test split or name impossible cells."""
    where = spec.get("_file", "calibration")
    split = spec.get("split", "val")
    if split == "test":
        raise ConfigError("calibration.split: the held-out test split is never used for calibration")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{where}: grid: expected a mapping of preset -> list of strengths, got {grid!r}")
    presets = _preset_names()
    for preset, strengths in grid.items():
        if preset not in presets:
            raise ConfigError(f"{where}: grid.{preset}: unknown preset; presets are {', '.join(presets)}")
        if not isinstance(strengths, list) or not strengths or not all(_is_number(s) for s in strengths):
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
    _check_jobs(spec, where)
    cfg = load_config(spec["base"], spec["overrides"])
    if split == cfg.data.test_split:
        raise ConfigError(f"{where}: split: {split!r} is the base configuration's held-out data.test_split")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _preset_names() -> tuple:
    from .config import CHOICES

    return CHOICES["data.synthetic.preset"]


def _check_jobs(spec: dict, where: str) -> None:
    jobs = spec.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"{where}: jobs: expected a whole number >= 1, got {jobs!r}")


def _cells(spec: dict) -> list[tuple[str, float]]:
    return [(preset, float(strength)) for preset, strengths in spec["grid"].items() for strength in strengths]


def _cell_label(preset: str, strength: float, seed: int) -> str:
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


def _target_config(spec: dict, label: str, seed: int, preset: str, strength: float) -> Config:
    from .experiments import run_config

    return run_config(spec, name=label, seed=seed, preset=preset, strength=strength)


def calibration_tasks(spec: dict) -> list[tuple]:
    """The calibration's independent tasks, longest first: ``("plateau", seed, k)``,
    ``("source", seed)`` and ``("oracle", seed, preset, strength)``."""
    oracle_grid = spec.get("oracle_grid") or spec["grid"]
    tasks = [("plateau", seed, k) for k in sorted(spec.get("plateau", []), reverse=True) for seed in spec["seeds"]]
    tasks += [("source", seed) for seed in spec["seeds"]]
    tasks += [("oracle", seed, preset, float(strength)) for seed in spec["seeds"]
              for preset, strengths in oracle_grid.items() for strength in strengths]
    return tasks


def calibration_jobs(spec: dict, task: tuple) -> list[Job]:
    """The jobs of one calibration task (every checkpoint scored is ``last``, on ``split``)."""
    split = spec.get("split", "val")
    kind, seed = task[0], task[1]
    if kind == "oracle":
        preset, strength = task[2], task[3]
        label = _cell_label(preset, strength, seed)
        run = Run(spec, label, seed, preset, strength, until="target_oracle")
        return [Job("train", label, preset, strength, seed, split, run, {"target_oracle": "target_oracle"},
                    checkpoints=("last",), arm="target_oracle")]
    multiple = task[2] if kind == "plateau" else 1
    source = source_run(spec, seed, multiple)
    arm = "source_only" if multiple == 1 else f"source_only_x{multiple}"
    jobs = []
    for preset, strength in _cells(spec):
        label = _cell_label(preset, strength, seed)
        target = _target_config(spec, label, seed, preset, strength)
        jobs.append(Job("transfer", label, preset, strength, seed, split, source, {"source_only": arm}, target,
                        checkpoints=("last",), arm=arm))
        if kind == "source" and spec.get("adabn", False):
            jobs.append(Job("adabn", label, preset, strength, seed, split, source, {"source_only": "adabn"}, target,
                            checkpoints=("last",), arm="adabn"))
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
    for task in calibration_tasks(spec):
        for job in calibration_jobs(spec, task):
            for unit in job.units():
                record = ctx.cache.get(unit)
                if record is not None:
                    found[(job.seed, job.preset, job.strength, job.arm)] = record
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
    write_runs(results / "calibration_runs.json", _runs_record(spec, ctx, runs.values(), wall_seconds))


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


def _runs_record(spec: dict, ctx: Context, runs, wall_seconds: float | None) -> dict:
    """``runs.json``: every run of the plan with its configuration, and the command's wall time."""
    entries = []
    for run in runs:
        entries.append({"run": str(run.cfg.run_dir), "until": run.until, "seed": run.seed, "preset": run.preset,
                        "strength": run.strength, "checkpoints_here": ctx.is_trained(run),
                        "config": run.cfg.to_dict()})
    return {"complete": wall_seconds is not None, "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1),
            "jobs": spec.get("jobs", 1), "commit": _commit(), "runs": entries}


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
    label = _cell_label(preset, strength, seed)
    source = source_run(spec, seed)
    jobs = []
    if "source_only" in arms or "adabn" in arms:
        target = _target_config(spec, label, seed, preset, strength)
        for arm, kind in (("source_only", "transfer"), ("adabn", "adabn")):
            if arm in arms:
                jobs.append(Job(kind, label, run=source, stages={"source_only": arm}, target=target, arm=arm, **common))
    if "target_oracle" in arms:
        oracle = Run(spec, label, seed, preset, strength, until="target_oracle")
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
    """Run a ``kind: benchmark_v2`` experiment file (resumable, cached; module docstring) and write
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
    from .experiments import pseudo_label_rows
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
    record = _runs_record(spec, ctx, tables["runs"], wall_seconds if tables["complete"] else None)
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

    _check_jobs(spec, where)
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
        if preset not in _preset_names():
            fail(f"presets.{preset}", f"unknown preset; presets are {', '.join(_preset_names())}")
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
        if not isinstance(fractions, list) or not all(_is_number(f) and f > 0 for f in fractions) or \
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
