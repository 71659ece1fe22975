"""Command line: ``python -m cag run CONFIG [key=value ...]`` and one subcommand per stage.

    python -m cag run configs/synthetic.yaml                 # the whole schedule
    python -m cag run configs/gta5_to_cityscapes.yaml data.source_root=/data/gta5 cag.delta_d=2.0
    python -m cag stage2 configs/synthetic.yaml              # one stage (its inputs must be done)
    python -m cag config configs/synthetic.yaml train.precision=fast   # the validated config, settings in effect
    torchrun --nproc_per_node=4 -m cag run configs/gta5_to_cityscapes.yaml
    python -m cag experiments configs/experiments/benchmark_v2.yaml   # the benchmark table in results/

Overrides use dotted keys and YAML values; unknown keys, wrong types and impossible values are
refused before any work starts. A mistake in the input (configuration, data, checkpoint,
anchors file, output location) ends with one line on stderr and exit status 2; ``--debug`` (or
``CAG_DEBUG=1``) adds its traceback. :mod:`cag.errors` lists every exit status.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import load_config
from .errors import cli_main

STAGES = ("source_only", "warmup", "anchors", "stage1", "stage2", "stage3", "evaluate")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="print the traceback of an input error too (or CAG_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in [("run", "run every stage (skipping finished ones, resuming interrupted ones)"),
                            ("config", "print the validated configuration as JSON"),
                            ("experiments", "run an experiment file (configs/experiments/*.yaml) into results/"),
                            *[(s, f"run the {s} stage alone") for s in STAGES]]:
        q = sub.add_parser(name, help=help_text)
        q.add_argument("config", help="YAML file, e.g. configs/synthetic.yaml")
        q.add_argument("overrides", nargs="*", help="key=value overrides, e.g. cag.delta_d=2.0")
        q.add_argument("--quiet", action="store_true", help="no progress bars (CI)")
        if name == "run":
            q.add_argument("--until", choices=STAGES, help="stop after this stage")
    return p


def main(argv=None) -> int:
    """``python -m cag ...``; failures caused by the input end in one line (:mod:`cag.errors`)."""
    return cli_main(_main, argv)


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    if args.command == "experiments":
        return _experiments(args)
    overrides = list(args.overrides) + (["quiet=true"] if args.quiet else [])
    cfg = load_config(args.config, overrides)
    if args.command == "config":
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from . import distributed as dist
    from .pipeline import Pipeline
    from .stages import resolve_device

    dist.init_from_env(resolve_device(cfg.device).type)
    pipeline = Pipeline(cfg)
    if args.command == "run":
        record = pipeline.run(until=args.until)
    else:
        pipeline.check_before_work()
        record = pipeline.run_stage(args.command)
    if dist.is_main() and not cfg.quiet:
        print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=2, default=str))
    return 0


def _experiments(args) -> int:
    """``python -m cag experiments FILE [key=value ...]``: overrides apply to every run of the file."""
    from .experiments import run

    outcome = run(args.config, args.overrides, quiet=args.quiet)
    print(json.dumps(outcome, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
