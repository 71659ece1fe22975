"""One command for the whole schedule (method-spec 8 item 12, section 9 "From-scratch pipeline").

source_only -> warmup -> anchors -> stage1 -> stage2 -> stage3 -> evaluate, each stage in its
own directory under ``runs/<name>/``. A stage is skipped when ``done.json`` records the same
fingerprint (its configuration and the fingerprints of its inputs); a stage interrupted midway
resumes from its ``last.pt``; a stage directory written for another configuration is moved
aside (``<stage>.stale-<time>``), never deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
import time
from pathlib import Path

from . import distributed as dist
from . import stages
from .config import Config, ConfigError

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
        """Move aside a directory written for another fingerprint; return the stage directory."""
        path = self.stage_dir(stage)
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
            raise RuntimeError(f"stage {stage!r} needs {', '.join(missing)} first: run `python -m cag run CONFIG` "
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
            return stages.supervised_stage(cfg, path, fp)
        if stage == "warmup":
            init = self.selected("source_only") if cfg.source_only.iters > 0 else cfg.model.init
            if cfg.warmup.iters == 0:
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
        """The model a stage hands on (a skipped warm-up hands on source-only's)."""
        record = self.done(stage) or {}
        if record.get("skipped"):
            return Path(record["model"])
        return self.selected(stage)

    def evaluate_all(self, path: Path) -> dict:
        """Score every stage's last and best-on-val checkpoints; write the run's ``summary.json``."""
        cfg = self.cfg
        splits = [cfg.data.val_split] + ([cfg.data.test_split] if cfg.data.test_split else [])
        results = []
        for stage in [s for s in stage_names(cfg) if s not in ("anchors", "evaluate")]:
            if (self.done(stage) or {}).get("skipped"):
                continue
            for kind in ("last", "best_val"):
                ckpt = self.stage_dir(stage) / f"{kind}.pt"
                if not ckpt.exists():
                    continue
                for split in splits:
                    r = stages.evaluate(cfg, ckpt, split)
                    results.append({"stage": stage, "checkpoint": kind, **r})
        final = f"stage{cfg.cag.stages}" if cfg.cag.stages > 0 else "warmup"
        headline_split = splits[-1]
        headline = next((r for r in results if r["stage"] == final and r["checkpoint"] == "last"
                         and r["split"] == headline_split), None)
        summaries = [json.loads((self.stage_dir(s) / "summary.json").read_text())
                     for s in stage_names(cfg) if (self.stage_dir(s) / "summary.json").exists()]
        device = stages.resolve_device(cfg.device)
        summary = {
            "miou": headline["miou"] if headline else None,
            "per_class_iou": headline["per_class_iou"] if headline else None,
            "headline": {"stage": final, "checkpoint": "last", "split": headline_split},
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

    def run(self, until: str | None = None) -> dict:
        """Run (or skip) every stage in order, up to and including ``until``."""
        names = stage_names(self.cfg)
        if until is not None and until not in names:
            raise ValueError(f"unknown stage {until!r}; stages are {', '.join(names)}")
        self.check_writable()
        self.prepare_data()
        self.check_data()
        record = {}
        for stage in names:
            record = self.run_stage(stage)
            if stage == until:
                break
        return record

    def check_writable(self) -> None:
        """Fail before any work when the run directory cannot be created or written (issue 9, item 6)."""
        probe = self.run_dir / f".write-test-{os.getpid()}"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"out_dir: cannot write the run directory {self.run_dir} "
                              f"({err.strerror or err})") from None

    def check_data(self) -> None:
        """Open every dataset the schedule reads, so that a wrong root, layout or split fails
        before the first stage trains rather than hours later (layout and pairing checks only)."""
        from .data import MissingFilesWarning

        cfg = self.cfg
        splits = [cfg.data.val_split] + ([cfg.data.test_split] if cfg.data.test_split else [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MissingFilesWarning)
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
                     n_target_test=syn.n_target_test, progress=not self.cfg.quiet)
        dist.barrier()
