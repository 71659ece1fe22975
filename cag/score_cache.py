"""The committed cache of scored units under ``<results_dir>/scores/``.

The calibration (:mod:`cag.calibration`) and the second benchmark table
(:mod:`cag.benchmark_table`) measure everything as scored units; the jobs of
:mod:`cag.benchmark_runs` produce them, and a unit already here with matching values is never
produced again.

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
* ``lineage``: the :func:`weights_digest` of the source-only model the scored model descends
  from (none for the target-trained oracle);
* ``seed``, ``commit``, ``wall_seconds`` (training), ``score_seconds``.

A unit whose file holds other values than the current ones is re-run and its file replaced,
never reused. Files are written atomically (temporary file, then ``os.replace``).

**Lineage.** CPU training is deterministic on one machine, but not bit-identical across machines
(the float arithmetic of another CPU or library build differs in the last bits, and training
amplifies it). A source-only model retrained in another session may therefore differ from the one
that earlier units of its seed came from, and a paired difference must never mix the two. While
a seed's source-only model is trained in the checkout its digest is known, and a unit recorded
from another one is stale (re-run); the tables refuse records of one seed with two lineages
(:func:`check_lineage`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, ConfigError

#: Folder under ``results_dir`` that holds the score cache.
SCORES = "scores"


def short_digest(*parts) -> str:
    """16 hex digits of the SHA-256 of ``parts`` as sorted JSON (unit fingerprints, export names)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def announce(quiet: bool, text: str) -> None:
    """Print one line of progress (flushed) unless ``quiet``."""
    if not quiet:
        print(text, flush=True)


_COMMIT: list[str] = []


def current_commit() -> str:
    """The checkout's commit (``cag.stages.git_commit``), asked once per process."""
    from .stages import git_commit

    if not _COMMIT:
        _COMMIT.append(git_commit())
    return _COMMIT[0]


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
    #: :func:`weights_digest` of the source-only model the unit's model descends from; None when it
    #: is not known (that model is not trained in this checkout) or there is none (the oracle).
    lineage: str | None = None

    def matches(self, record: dict) -> bool:
        """The record holds this unit's fingerprint, scoring and data (and lineage, when known)."""
        return (record.get("fingerprint"), record.get("scoring"), record.get("data")) == \
            (self.fingerprint, self.scoring, self.data) and self.lineage in (None, record.get("lineage"))


class ScoreCache:
    """The committed cache of scored units under ``<results_dir>/scores/`` (module docstring)."""

    def __init__(self, results_dir, quiet: bool = True):
        self.root = Path(results_dir) / SCORES
        self.quiet = quiet

    def path(self, unit: Unit) -> Path:
        return self.root / unit.label / f"{unit.name}.json"

    def status(self, unit: Unit, report: bool = False) -> str:
        """``valid`` (present with the unit's fingerprint, scoring and data, and its lineage when
        known: :meth:`Unit.matches`), ``missing`` or ``stale``.

        With ``report`` a stale file is named in one line (when not quiet): it will be re-run."""
        record = self._read(self.path(unit))
        if record is None:
            return "missing"
        if unit.matches(record):
            return "valid"
        if report:
            what = [k for k, v in (("fingerprint", unit.fingerprint), ("scoring", unit.scoring), ("data", unit.data),
                                   ("lineage", unit.lineage)) if v is not None and record.get(k) != v]
            announce(self.quiet, f"[cache] {self.path(unit)}: recorded with another {' and '.join(what)}; re-running it")
        return "stale"

    def get(self, unit: Unit) -> dict | None:
        """The unit's record when it is valid (:meth:`status`), else None."""
        record = self._read(self.path(unit))
        return record if record is not None and unit.matches(record) else None

    def put(self, unit: Unit, payload: dict, wall_seconds: float | None, score_seconds: float) -> dict:
        """Write the unit's record atomically and return it."""
        record = {"run": unit.label, "unit": unit.name, "fingerprint": unit.fingerprint, "scoring": unit.scoring,
                  "data": unit.data, "seed": unit.seed, "commit": current_commit(),
                  **({"lineage": unit.lineage} if unit.lineage is not None else {}),
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
            announce(self.quiet, f"[cache] {path}: unreadable; it will be re-run and replaced")
            return None
        return record if isinstance(record, dict) else None


# ----------------------------------------------------------------------------- lineage


_WEIGHTS: dict = {}


def weights_digest(path) -> str:
    """A digest of the model weights in the checkpoint ``path`` (names, dtypes, shapes and bytes of
    every tensor of its ``model`` state; optimiser and loop state are left out)."""
    from .stages import read_model_state

    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _WEIGHTS:
        h = hashlib.sha256(b"weights/1")
        for name, tensor in sorted(read_model_state(path).items()):
            tensor = tensor.detach().cpu().contiguous()
            h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            h.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        _WEIGHTS[key] = h.hexdigest()[:16]
    return _WEIGHTS[key]


def check_lineage(records: dict, where: str) -> None:
    """Raise when the records of one paired group (``{file: record}``) descend from two source-only
    models (:func:`weights_digest`); records without a lineage are not compared."""
    seen: dict = {}
    for path, record in records.items():
        if record is not None and record.get("lineage") is not None:
            seen.setdefault(record["lineage"], []).append(str(path))
    if len(seen) > 1:
        listed = "; ".join(f"{digest}: {', '.join(sorted(paths)[:3])}" for digest, paths in sorted(seen.items()))
        raise RuntimeError(f"{where}: cached scores descend from {len(seen)} different source-only models ({listed}); "
                           "delete the files of the older one and run the command again with the source-only model "
                           "trained (a retrained model differs across machines)")


# ----------------------------------------------------------------------------- data identity


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


def scoring_digest(cfg: Config, split: str) -> str:
    """A unit's ``scoring``: the digest of the ``eval`` settings, the class count, AMP and ``split``."""
    return short_digest("score/1", cfg.to_dict()["eval"], cfg.data.num_classes, cfg.train.amp, split)
