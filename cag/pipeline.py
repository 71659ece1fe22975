"""One command for the whole schedule (docs/method.md §8).

source_only -> warmup -> anchors -> stage1 -> stage2 -> stage3 -> evaluate, each stage in its
own directory under ``runs/<name>/``. A stage is skipped when ``done.json`` records the same
fingerprint (its configuration and the fingerprints of its inputs); a stage interrupted midway
resumes from its ``last.pt``; a stage directory written for another configuration is moved
aside (``<stage>.stale-<time>``), never deleted.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from . import distributed as dist
from . import stages
from .checkpoint import CheckpointError
from .config import Config
from .errors import UserInputError, writable_folder


class StageOrderError(UserInputError, RuntimeError):
    """A stage was asked for before the stages it reads."""

TRAINING_STAGES = ("source_only", "warmup")

#: Fields that change how a run is shown or scheduled, never its numbers.
_NOT_FINGERPRINTED = {("name",), ("out_dir",), ("quiet",), ("device",), ("data", "num_workers"),
                      ("train", "log_interval"), ("train", "checkpoint_interval")}


def stage_names(cfg: Config) -> list[str]:
    return ["source_only", "warmup", "anchors", *[f"stage{k}" for k in range(1, cfg.cag.stages + 1)], "evaluate"]


def _config_for_fingerprint(cfg: Config) -> dict:
    d = cfg.to_dict()
    for path in _NOT_FINGERPRINTED:
        node = d
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1], None)
    return d


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprints(cfg: Config) -> dict[str, str]:
    """Each stage's fingerprint: its own settings plus the fingerprints of what it reads."""
    d = _config_for_fingerprint(cfg)
    base = _hash(d["seed"], d["data"], d["model"], d["train"])
    fp = {"source_only": _hash(base, d["source_only"])}
    fp["warmup"] = _hash(fp["source_only"], d["warmup"])
    fp["anchors"] = _hash(fp["warmup"], d["anchors"])
    previous = fp["warmup"]
    for k in range(1, cfg.cag.stages + 1):
        fp[f"stage{k}"] = previous = _hash(previous, fp["anchors"], d["cag"], k)
    fp["evaluate"] = _hash(previous, d["eval"])
    return fp


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Pipeline:
    """Runs the stages of one configuration in ``runs/<name>/``."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.fp = fingerprints(cfg)

    # -- bookkeeping -------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def done(self, stage: str) -> dict | None:
        path = self.stage_dir(stage) / "done.json"
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        return record if record.get("fingerprint") == self.fp[stage] else None

    def _prepare(self, stage: str) -> Path:
        """Move aside a directory written for another fingerprint; return the stage directory.

        A stale directory without any checkpoint (a start that failed on bad input before its
        first ``last.pt``) holds nothing worth keeping and is replaced instead, so that a
        corrected rerun leaves no ``.stale-`` folder behind.
        """
        path = self.stage_dir(stage)
        if dist.is_main() and path.exists() and self._stale(stage) and not any(p.suffix in (".pt", ".json") for p in path.iterdir()):
            shutil.rmtree(path)  # a start that failed before its first checkpoint: nothing to keep
        if dist.is_main() and path.exists() and self._stale(stage):
            aside = path.with_name(f"{stage}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(path), str(aside))
            if not self.cfg.quiet:
                print(f"[{stage}] {path} was written for another configuration; moved to {aside}", flush=True)
        dist.barrier()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _stale(self, stage: str) -> bool:
        path = self.stage_dir(stage)
        done = path / "done.json"
        if done.exists():
            return json.loads(done.read_text()).get("fingerprint") != self.fp[stage]
        marker = path / "fingerprint"
        return marker.exists() and marker.read_text().strip() != self.fp[stage]

    def _finish(self, stage: str, result: dict) -> dict:
        record = {"fingerprint": self.fp[stage], "stage": stage, **result}
        if dist.is_main():
            _write_atomic(self.stage_dir(stage) / "done.json", json.dumps(record, indent=2, sort_keys=True, default=str))
        dist.barrier()
        return record

    def selected(self, stage: str) -> Path:
        """The checkpoint a later stage starts from: best on target val (released) or last."""
        path = self.stage_dir(stage)
        best = path / "best_val.pt"
        if self.cfg.train.select == "best_val" and best.exists():
            return best
        return path / "last.pt"

    # -- stages ------------------------------------------------------------------------
    def run_stage(self, stage: str) -> dict:
        record = self.done(stage)
        if record is not None:
            if not self.cfg.quiet and dist.is_main():
                trained_at = f" (trained at commit {record['commit'][:7]})" if record.get("commit") else ""
                print(f"[{stage}] already done for this configuration: {self.stage_dir(stage)}{trained_at}", flush=True)
            return record
        missing = [s for s in self._inputs(stage) if self.done(s) is None]
        if missing:
            raise StageOrderError(f"stage {stage!r} needs {', '.join(missing)} first: run `python -m cag run CONFIG` "
                               f"or `python -m cag {missing[0]} CONFIG` with the same settings")
        path = self._prepare(stage)
        if dist.is_main():
            _write_atomic(path / "fingerprint", self.fp[stage])
        return self._finish(stage, self._execute(stage, path))

    def _inputs(self, stage: str) -> list[str]:
        names = stage_names(self.cfg)
        if stage == "source_only":
            return []
        if stage == "evaluate":
            return names[:-1]
        if stage.startswith("stage"):
            return ["anchors", names[names.index(stage) - 1]]
        return [names[names.index(stage) - 1]]

    def _execute(self, stage: str, path: Path) -> dict:
        cfg, fp = self.cfg, self.fp[stage]
        if stage == "source_only":
            if cfg.source_only.iters == 0:  # nothing to train: the warm-up starts from model.init
                return {"skipped": "source_only.iters is 0",
                        "model": None if cfg.model.init is None else str(cfg.model.init)}
            return stages.supervised_stage(cfg, path, fp)
        if stage == "warmup":
            init = self.selected("source_only") if cfg.source_only.iters > 0 else cfg.model.init
            if cfg.warmup.iters == 0:  # config validation makes sure init is a checkpoint here
                return {"skipped": "warmup.iters is 0", "model": str(init)}
            return stages.warmup_stage(cfg, path, fp, init)
        if stage == "anchors":
            result = stages.compute_anchors(cfg, path, self.model_of("warmup")) if dist.is_main() else {}
            dist.barrier()
            return dist.broadcast_object(result)
        if stage.startswith("stage"):
            k = int(stage[len("stage"):])
            previous = "warmup" if k == 1 else f"stage{k - 1}"
            init = self.model_of(previous)
            anchors = self.stage_dir("anchors") / "anchors.pt"
            if cfg.anchors.recompute_per_stage and k > 1:
                if dist.is_main():
                    stages.compute_anchors(cfg, path / "anchors", init)
                dist.barrier()
                anchors = path / "anchors" / "anchors.pt"
            return stages.cag_stage(cfg, path, fp, init, anchors)
        return self.evaluate_all(path)

    def model_of(self, stage: str) -> Path:
        """The model a stage hands on (a skipped warm-up hands on source-only's, or ``model.init``).

        With ``model.init=X source_only.iters=0 warmup.iters=0`` both stages train nothing and
        ``model_of("warmup")`` is X: the anchors are computed with X, and CAG stage 1's student and
        frozen pseudo-labeller both start from X (e.g. the authors' warm-up checkpoint).
        """
        record = self.done(stage) or {}
        if record.get("skipped"):
            return Path(record["model"])
        return self.selected(stage)

    def evaluate_all(self, path: Path) -> dict:
        """Score the checkpoints named in ``eval.checkpoints`` (last and best-on-val by default) of
        the training stages named in ``eval.stages`` (by default every stage that trained); write
        the run's ``summary.json``. The headline is the final stage's ``last`` checkpoint, or its
        ``best_val`` one when only that is scored."""
        cfg = self.cfg
        splits = [cfg.data.val_split] + ([cfg.data.test_split] if cfg.data.test_split else [])
        results = []
        for stage in [s for s in stage_names(cfg) if s not in ("anchors", "evaluate")]:
            if (self.done(stage) or {}).get("skipped") or (cfg.eval.stages is not None and stage not in cfg.eval.stages):
                continue
            for kind in cfg.eval.checkpoints:
                ckpt = self.stage_dir(stage) / f"{kind}.pt"
                if not ckpt.exists():
                    continue
                for split in splits:
                    r = stages.evaluate(cfg, ckpt, split)
                    results.append({"stage": stage, "checkpoint": kind, **r})
        final = f"stage{cfg.cag.stages}" if cfg.cag.stages > 0 else "warmup"
        headline_split = splits[-1]
        headline_kind = "last" if "last" in cfg.eval.checkpoints else cfg.eval.checkpoints[0]
        headline = next((r for r in results if r["stage"] == final and r["checkpoint"] == headline_kind
                         and r["split"] == headline_split), None)
        summaries = [json.loads((self.stage_dir(s) / "summary.json").read_text())
                     for s in stage_names(cfg) if (self.stage_dir(s) / "summary.json").exists()]
        device = stages.resolve_device(cfg.device)
        summary = {
            "miou": headline["miou"] if headline else None,
            "per_class_iou": headline["per_class_iou"] if headline else None,
            "headline": {"stage": final, "checkpoint": headline_kind, "split": headline_split},
            "results": results,
            "config": cfg.to_dict(), "commit": stages.git_commit(), "seed": cfg.seed,
            **stages.environment(device),
            "wall_seconds": sum(s.get("wall_seconds", 0.0) for s in summaries),
            "images_per_s": {s["stage"]: s.get("images_per_s") for s in summaries},
            "peak_memory_gib": max([s.get("peak_memory_gib") or 0.0 for s in summaries] + [stages.peak_memory_gib(device)]),
        }
        if dist.is_main():
            text = json.dumps(summary, indent=2, sort_keys=True, default=str)
            (path / "results.json").write_text(text)
            (self.run_dir / "summary.json").write_text(text)
        return {"miou": summary["miou"], "summary": str(self.run_dir / "summary.json")}

    def adopt(self, other: "Pipeline", until: str) -> list[str]:
        """Copies ``other``'s finished stages, up to and including ``until``, into this run.

        For a control run: a configuration that differs from ``other``'s only in the settings of
        a later stage (``warmup.lambda_adv=0``, ``cag.lam=0``) gives the earlier stages the same
        fingerprints, so their directories are copied instead of trained again, and the
        control's first own stage starts from exactly the models ``other`` handed on. A stage
        this run has already finished is left as it is. Raises :class:`StageOrderError`, before
        copying anything, when ``other`` has not finished a stage, or finished it for another
        fingerprint (the control would then not share it). Returns the stages copied.
        """
        names = stage_names(self.cfg)
        if until not in names:
            raise ValueError(f"unknown stage {until!r}; stages are {', '.join(names)}")
        wanted = [stage for stage in names[:names.index(until) + 1] if self.done(stage) is None]
        for stage in wanted:  # every stage is checked before anything is copied
            if other.done(stage) is None or other.fp[stage] != self.fp[stage]:
                raise StageOrderError(f"stage {stage!r}: {other.run_dir} has not finished it for this "
                                      f"configuration's fingerprint; run it there first")
        for stage in wanted:
            path = self._prepare(stage)
            if dist.is_main():
                shutil.copytree(other.stage_dir(stage), path, dirs_exist_ok=True)
            dist.barrier()
        return wanted

    def run(self, until: str | None = None) -> dict:
        """Run (or skip) every stage in order, up to and including ``until``."""
        names = stage_names(self.cfg)
        if until is not None and until not in names:
            raise ValueError(f"unknown stage {until!r}; stages are {', '.join(names)}")
        self.check_before_work()
        record = {}
        for stage in names:
            record = self.run_stage(stage)
            if stage == until:
                break
        return record

    def check_writable(self) -> None:
        """Fail before any work when the run directory cannot be created or written."""
        writable_folder(self.run_dir, "out_dir: the run directory")

    def check_before_work(self) -> None:
        """Every check that can fail on the user's input, before the first stage trains.

        The run directory is writable; the built-in benchmark is generated if configured; every
        dataset the schedule reads opens (layout and pairing); ``model.init``,
        ``model.pretrained_backbone`` and ``anchors.file`` hold what they should. An error found
        here is the same on every rank, so under torchrun rank 0 alone reports it.
        """
        try:
            stages.check_initialisation(self.cfg, self.cfg.model.init)
            self.check_writable()
            self.prepare_data()
            self.check_data()
            self.check_inputs()
        except UserInputError as err:
            err.same_on_every_rank = True
            raise

    def check_inputs(self) -> None:
        """Load the files the configuration names and check them against the network.

        A checkpoint of another network, a truncated file, an anchors file of the wrong kind or
        shape fail here in seconds (CheckpointError / AnchorsError naming the key and file),
        rather than after hours of the stages before the one that reads them.
        """
        cfg = self.cfg
        stages.check_initialisation(cfg, cfg.model.init)
        if cfg.model.init is None and cfg.model.pretrained_backbone is None and cfg.anchors.file is None:
            return
        import torch

        try:
            model = stages.make_model(cfg, torch.device("cpu"), cfg.model.init)
        except CheckpointError as err:
            init = cfg.model.init is not None and str(cfg.model.init) in str(err)
            raise CheckpointError(f"{'model.init' if init else 'model.pretrained_backbone'}: {err}") from None
        if cfg.anchors.file is not None:
            from .anchors import AnchorsError, read_anchors_file

            try:
                anchors, _ = read_anchors_file(cfg.anchors.file)
            except AnchorsError as err:
                raise AnchorsError(f"anchors.file: {err}") from None
            expected = [cfg.data.num_classes, model.feature_dim]
            if list(anchors.shape) != expected:
                raise AnchorsError(f"anchors.file: {cfg.anchors.file} holds anchors of shape {list(anchors.shape)}; "
                                   f"this network needs [classes, feature channels] = {expected}")

    def check_data(self) -> None:
        """Open every dataset the schedule reads, so that a wrong root, layout or split fails
        before the first stage trains rather than hours later (layout and pairing checks only).
        Entries missing their image or label are named here, once per dataset and run
        (``MissingFilesWarning``); the stages that open the same datasets again stay silent."""
        cfg = self.cfg
        splits = [cfg.data.val_split] + ([cfg.data.test_split] if cfg.data.test_split else [])
        stages.source_dataset(cfg)
        stages.target_dataset(cfg, "train", labels=cfg.data.target_train_labels)
        for split in splits:
            stages.target_dataset(cfg, split, labels=True)

    def prepare_data(self) -> None:
        """Generate the built-in benchmark when ``data.synthetic.root`` is set (skipped if present)."""
        syn = self.cfg.data.synthetic
        if syn.root is None:
            return
        if dist.is_main():
            from .data.synthetic import generate

            generate(syn.root, preset=syn.preset, strength=syn.strength, size=tuple(syn.size), n_source=syn.n_source,
                     n_target_train=syn.n_target_train, n_target_val=syn.n_target_val,
                     n_target_test=syn.n_target_test, progress=not self.cfg.quiet, version=syn.version)
        dist.barrier()
