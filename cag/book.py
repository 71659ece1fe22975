"""The book's notebooks as a tool: re-execute them in place, keep them clean, run them on real data.

    python -m cag.book execute [NOTEBOOK ...]     # in place, in _toc.yml order (make notebooks)
    python -m cag.book clean NOTEBOOK ...         # strip volatile metadata only
    python -m cag.book paper-run CONFIG [--stage STAGE] [--out DIR] [--controls] [key=value ...]   (make paper-run)

The chapters are committed with their outputs (the HTML build renders them and never executes
them). ``execute`` runs each chapter with papermill into a temporary file and
replaces the chapter only when every cell succeeded, then strips what changes from run to run
(papermill's and Jupyter's timing metadata), so re-executing on the same machine changes
nothing but what the cells themselves print. ``paper-run`` executes the chapters with
``profile="paper"`` on a configuration of your own and writes the executed notebooks and a
``run.json`` (parameters, commit, timings, every glued number) into the run directory.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import nbformat
import yaml

#: Notebook metadata keys that change on every execution.
VOLATILE_NOTEBOOK_KEYS = ("papermill", "widgets")
#: Cell metadata keys that change on every execution.
VOLATILE_CELL_KEYS = ("papermill", "execution", "ExecuteTime", "collapsed", "scrolled")


def chapters(root) -> list[Path]:
    """The notebooks of ``_toc.yml`` in reading order (root, then chapters and parts)."""
    toc = yaml.safe_load((Path(root) / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    walk(toc.get("chapters"))
    for part in toc.get("parts") or []:
        walk(part.get("chapters"))
    paths = [Path(root) / f"{name}.ipynb" for name in files]
    return [p for p in paths if p.is_file()]


def clean_notebook(nb):
    """Removes execution timings and papermill records from a notebook (outputs are kept).

    Execution counts are renumbered 1, 2, ... over the code cells that ran, as a straight
    top-to-bottom run numbers them; empty tag lists are dropped. Adjacent stream outputs of the
    same name are merged into one: the kernel splits a stream when a pause (a control run
    training in a fresh clone, say) separates two prints, so the split depends on timing, not
    on what the cell printed.
    """
    for key in VOLATILE_NOTEBOOK_KEYS:
        nb.metadata.pop(key, None)
    count = 0
    for cell in nb.cells:
        for key in VOLATILE_CELL_KEYS:
            cell.metadata.pop(key, None)
        if cell.metadata.get("tags") == []:
            del cell.metadata["tags"]
        if cell.cell_type == "code" and cell.execution_count is not None:
            count += 1
            cell.execution_count = count
            for output in cell.outputs:
                if "execution_count" in output:
                    output["execution_count"] = count
        if cell.cell_type == "code":
            cell.outputs = _merged_streams(cell.outputs)
    return nb


def _merged_streams(outputs: list) -> list:
    """``outputs`` with each run of adjacent stream outputs of one name (stdout, stderr) joined."""
    merged = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (output.get("output_type") == "stream" and previous is not None
                and previous.get("output_type") == "stream" and previous.get("name") == output.get("name")):
            previous["text"] = "".join(previous["text"]) + "".join(output["text"])
        else:
            merged.append(output)
    return merged


def execute(path, out=None, parameters: dict | None = None, cwd=None, log_output: bool = False) -> Path:
    """Executes one notebook with papermill and writes it, cleaned, to ``out`` (default: in place).

    The run goes to a temporary file first; a failing notebook is kept as ``<out>.failed.ipynb``
    for inspection, so a committed chapter is never overwritten by a broken run. A cell that
    fails raises a :class:`cag.errors.UserInputError` naming the chapter and cell when its error
    is one of the input errors of :mod:`cag.errors`, and :class:`ChapterFailed` with the kernel's
    traceback otherwise.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    path = Path(path)
    out = Path(out) if out is not None else path
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.with_name(f".{out.stem}.running.ipynb")
    try:
        papermill.execute_notebook(str(path), str(scratch), parameters=parameters or {}, cwd=str(cwd or path.parent),
                                   kernel_name="python3", progress_bar=False, log_output=log_output,
                                   request_save_on_cell_execute=False)
    except BaseException as err:
        if scratch.exists():
            scratch.replace(out.with_name(f"{out.stem}.failed.ipynb"))
        if isinstance(err, PapermillExecutionError):
            raise _chapter_failure(path, err) from None
        raise
    nb = clean_notebook(nbformat.read(scratch, as_version=4))
    nbformat.write(nb, out)
    scratch.unlink()
    return out


def clean(paths) -> None:
    """Strips volatile metadata from notebooks in place (:func:`clean_notebook`)."""
    for path in paths:
        nbformat.write(clean_notebook(nbformat.read(path, as_version=4)), path)


def parameter_defaults(path) -> dict:
    """The literal assignments of a notebook's ``parameters`` cell (the papermill defaults)."""
    nb = nbformat.read(path, as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        return {}
    values = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def glued_values(nb) -> dict:
    """The values a notebook glued with ``myst_nb.glue``, as their plain-text form."""
    values = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            record = output.get("metadata", {}).get("scrapbook", {})
            if "name" in record:
                data = output.get("data", {})
                values[record["name"]] = data.get(record.get("mime_prefix", "") + "text/plain", data.get("text/plain"))
    return values


def repo_relative(path, root) -> str:
    """``path`` relative to ``root`` when it lies inside it, else absolute: the notebooks run with
    the repository root as working directory, so a relative path stays valid on another clone."""
    path = Path(path).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def paper_chapters(root, until: str, stage_order) -> list[Path]:
    """The chapters a paper run up to stage ``until`` executes: those with a ``stage`` parameter
    that is None (the chapter trains nothing) or comes at or before ``until`` in ``stage_order``;
    chapters without a ``stage`` parameter are not runs of the pipeline."""
    order = list(stage_order)
    if until not in order:
        raise ValueError(f"unknown stage {until!r}; stages are {', '.join(order)}")
    picked = []
    for path in chapters(root):
        defaults = parameter_defaults(path)
        stage = defaults.get("stage")
        if "stage" in defaults and (stage is None or (stage in order and order.index(stage) <= order.index(until))):
            picked.append(path)
    return picked


def paper_run(config, overrides=(), until: str = "evaluate", out=None, profile: str = "paper",
              controls: bool = False) -> Path:
    """Executes the chapters up to stage ``until`` on ``config`` (+ ``key=value`` overrides).

    ``controls`` also trains the chapters' control runs (:func:`cag.analysis.trains_controls`:
    one more warm-up in chapter 3, one more stage 1 in chapter 6), which the paper profile
    otherwise leaves out.

    Notebooks go to ``out`` (default ``<run dir>/book``) with ``run.json``: the parameters, the
    commit, each chapter's wall-clock seconds and glued numbers. The configuration is validated
    before anything runs; stages already done in the run directory are skipped by the pipeline.
    """
    from .analysis import repo_root
    from .config import load_config, parse_override
    from .pipeline import stage_names
    from .stages import git_commit

    root = repo_root()
    cfg = load_config(config, list(overrides))
    params = {"profile": profile, "config": repo_relative(config, root),
              "overrides": {".".join(keys): value for keys, value in map(parse_override, overrides)}}
    if controls:
        params["controls"] = True
    out = Path(out) if out is not None else cfg.run_dir / "book"
    record = {"config": params["config"], "overrides": params["overrides"], "profile": profile, "until": until,
              "controls": controls, "commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notebooks": []}
    for path in paper_chapters(root, until, stage_names(cfg)):
        started = time.time()
        # controls only where a chapter declares it (papermill warns about unknown parameters)
        own = {k: v for k, v in params.items() if k != "controls" or k in parameter_defaults(path)}
        executed = execute(path, out / path.name, own, cwd=root, log_output=True)
        record["notebooks"].append({"name": path.name, "seconds": round(time.time() - started, 1),
                                    "glued": glued_values(nbformat.read(executed, as_version=4))})
        (out / "run.json").write_text(json.dumps(record, indent=2))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cag.book", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("execute", help="re-execute notebooks in place (default: every chapter of _toc.yml)")
    q.add_argument("notebooks", nargs="*")
    q = sub.add_parser("clean", help="strip volatile metadata in place")
    q.add_argument("notebooks", nargs="+")
    q = sub.add_parser("paper-run", help="execute the chapters on a configuration of your own",
                       usage="python -m cag.book paper-run CONFIG [key=value ...] [--stage STAGE] [--out DIR] [--controls]")
    q.add_argument("config", help="YAML file, e.g. configs/gta5_to_cityscapes.yaml")
    q.add_argument("--stage", default="evaluate", help="run the chapters up to this pipeline stage")
    q.add_argument("--out", help="folder for the executed notebooks (default: <run dir>/book)")
    q.add_argument("--profile", default="paper", choices=("paper", "ci"))
    q.add_argument("--controls", action="store_true",
                   help="also train the chapters' control runs (one more warm-up, one more stage 1)")
    return p


class ChapterFailed(Exception):
    """A chapter stopped at a cell; carries papermill's error (name, value, cell)."""


def _chapter_failure(path, err) -> BaseException:
    """A one-line report of papermill's error in chapter ``path``: a user error in the chapter
    (its name is one of :mod:`cag.errors`' kinds) becomes a :class:`UserInputError`; anything
    else keeps the kernel's traceback, since it is a bug."""
    from .errors import UserInputError

    where = f"chapter {Path(path).name} failed at cell [{err.exec_count}]"
    if err.ename in _user_error_names():
        failed = UserInputError(f"{where}: {err.ename}: {err.evalue}")
        failed.kind = "chapter error"
        return failed
    return ChapterFailed(f"{where}: {err.ename}: {err.evalue}\n{''.join(err.traceback)}")


def _user_error_names() -> set[str]:
    from .errors import UserInputError

    names, todo = set(), [UserInputError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def main(argv=None) -> int:
    """``python -m cag.book ...``; a chapter that fails on an input error ends in one line naming
    the chapter, its cell and the error, with exit status 2 (:mod:`cag.errors`)."""
    from .errors import cli_main

    return cli_main(_main, argv)


def _main(argv) -> int:
    from .analysis import repo_root

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if args.command != "paper-run" or "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (paper-run takes key=value overrides)")
    missing = [p for p in getattr(args, "notebooks", []) if not Path(p).is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    if args.command == "clean":
        clean(args.notebooks)
    elif args.command == "execute":
        root = repo_root()
        for path in [Path(p) for p in args.notebooks] or chapters(root):
            started = time.time()
            print(f"executing {path} ...", flush=True)
            execute(path)
            print(f"  done in {time.time() - started:.0f} s", flush=True)
    else:
        out = paper_run(args.config, extra, args.stage, args.out, args.profile, args.controls)
        print(f"executed notebooks and run.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
