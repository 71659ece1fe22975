"""The book's notebooks: hygiene of the committed files, the cag.book tool, and nbval re-execution.

Hygiene (fast): every chapter of ``_toc.yml`` is committed executed, top to bottom, without
errors or warnings in its outputs, with exactly one ``parameters`` cell (the first code cell,
plain literals, ``profile = "ci"``), no papermill leftovers, no machine paths, alt text for every
figure and every glued number it quotes. Re-execution (slow, part of ``make test``): nbval runs
each chapter in a fresh kernel (``--nbval-lax``: it must run without error, and the cells
tagged ``nbval-check-output`` must print what is committed, after tests/nbval_sanitize.cfg).
The chapters share ``runs/synthetic``; the first one that needs a stage trains it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from cag import book
from cag.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = book.chapters(REPO)
GLUE_ROLE = re.compile(r"\{glue(?::[a-z]+)?\}`([^`:]+)")
MACHINE_PATHS = (str(REPO), "/home/", "/tmp/", "/root/")
MAX_NOTEBOOK_BYTES = 3_000_000


def ids(paths):
    return [p.stem for p in paths]


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def output_text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    return "\n".join(v for k, v in output.get("data", {}).items() if isinstance(v, str) and not k.startswith("image/"))


def test_the_toc_lists_every_chapter_notebook():
    listed = {p.name for p in NOTEBOOKS}
    on_disk = {p.name for p in (REPO / "book").glob("*.ipynb") if not p.name.startswith(".") and ".failed" not in p.name}
    assert on_disk == listed
    assert len(listed) >= 9


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_is_committed_clean_and_executed(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name}: {path.stat().st_size} bytes of outputs"
    assert "papermill" not in nb.metadata, f"{path.name}: papermill metadata (run python -m cag.book clean)"
    cells = code_cells(nb)
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [0], f"{path.name}: the first code cell, and only it, must be tagged 'parameters'"
    assert book.parameter_defaults(path).get("profile", "ci") == "ci", f"{path.name}: default profile must be 'ci'"
    for cell in cells:
        assert "injected-parameters" not in cell.metadata.get("tags", []), f"{path.name}: papermill injected a cell"
        assert not {"papermill", "execution", "ExecuteTime"} & set(cell.metadata), f"{path.name}: timing metadata"
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), f"{path.name}: not run top to bottom"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_outputs_have_no_errors_warnings_or_machine_paths(path):
    nb = nbformat.read(path, as_version=4)
    for n, cell in enumerate(code_cells(nb), start=1):
        for output in cell.outputs:
            assert output.output_type != "error", f"{path.name} cell [{n}]: {output.get('ename')}: {output.get('evalue')}"
            assert output.get("name") != "stderr", f"{path.name} cell [{n}] writes to stderr: {output.get('text', '')[:300]}"
            text = output_text(output)
            leaked = [p for p in MACHINE_PATHS if p in text]
            assert not leaked, f"{path.name} cell [{n}] shows a machine path {leaked}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_every_figure_has_alt_text_and_every_quoted_number_is_glued(path):
    nb = nbformat.read(path, as_version=4)
    glued = set(book.glued_values(nb))
    for n, cell in enumerate(code_cells(nb), start=1):
        if any("image/png" in o.get("data", {}) for o in cell.outputs):
            alt = cell.metadata.get("mystnb", {}).get("image", {}).get("alt", "")
            assert len(alt) > 20, f"{path.name} cell [{n}]: a figure without alt text (metadata mystnb.image.alt)"
    quoted = {key for c in nb.cells if c.cell_type == "markdown" for key in GLUE_ROLE.findall(c.source)}
    assert quoted <= glued, f"{path.name}: quotes numbers it never glued: {sorted(quoted - glued)}"


# ----------------------------------------------------------------------------- what Jupyter shows

GLUE_REFERENCE = re.compile(r"\{glue(?::text)?\}`([^`:]+)(?::([^`]*))?`")
#: Chapters whose quoted numbers nbval must compare: the training chapters.
NUMBERS_CHECKED = ("03_", "04_", "05_", "06_", "07_")


def formatted_glue(raw: str, spec: str | None) -> str:
    """A glued value as ``{glue:text}`key:spec``` renders it: myst-nb's own formatter."""
    from myst_nb.core.variables import format_plain_text

    return format_plain_text(raw, spec or "")


def shows_number(text: str, shown: str) -> bool:
    """``shown`` printed as a whole number in ``text`` (not "12" inside "0.125" or "2012")."""
    return re.search(rf"(?<![\d.]){re.escape(shown)}(?![\d])", text) is not None


def printed_outputs(cell) -> str:
    """What a code cell shows a Jupyter reader: its outputs, glue records excluded."""
    return "\n".join(output_text(o) for o in cell.outputs if "scrapbook" not in o.get("metadata", {}))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_a_chapter_opened_in_jupyter_shows_its_code_and_numbers(path):
    """No code that exists only through an include directive, no number only through glue: the
    .ipynb itself prints every glued number (in a cell nbval compares, for the training chapters)
    and shows the package's code as a ``cag.listing`` output that nbval compares."""
    nb = nbformat.read(path, as_version=4)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "{literalinclude}" not in markdown and "{include}" not in markdown, \
        f"{path.name}: code shown only in the HTML book (literalinclude); show it with cag.listing.listing(...)"
    glued = book.glued_values(nb)
    checked = path.name.startswith(NUMBERS_CHECKED)
    missing = []
    for key, spec in GLUE_REFERENCE.findall(markdown):
        if key not in glued:
            continue  # test_every_figure_has_alt_text_and_every_quoted_number_is_glued names it
        shown = formatted_glue(glued[key], spec or None)
        cells = [c for c in code_cells(nb) if shows_number(printed_outputs(c), shown)]
        if checked:
            cells = [c for c in cells if "nbval-check-output" in c.metadata.get("tags", [])]
        if not cells:
            missing.append(f"{key} = {shown}")
    assert not missing, (f"{path.name}: numbers the prose quotes but no cell prints"
                         f"{' (in a cell tagged nbval-check-output)' if checked else ''}: {missing}")
    for n, cell in enumerate(code_cells(nb), start=1):
        if "listing(" in cell.source:
            assert "nbval-check-output" in cell.metadata.get("tags", []), \
                f"{path.name} cell [{n}]: a cag.listing output that nbval does not compare"
            assert any(re.search(r"^# cag/\S+\.py, lines \d+-\d+", output_text(o), re.M) for o in cell.outputs), \
                f"{path.name} cell [{n}]: calls listing() but shows no package source"


def test_the_results_chapter_answers_every_question_once_the_table_is_complete():
    """Chapter 8 prints a placeholder for a comparison its results files lack; once the table it
    was executed on is complete (results/runs.json), a placeholder can only be a
    comparison that was never declared, such as a misspelt arm: the committed chapter holds none."""
    from cag.results import NO_RESULT

    path = next(p for p in NOTEBOOKS if p.name.startswith("08_"))
    nb = nbformat.read(path, as_version=4)
    record = json.loads((REPO / "results" / "runs.json").read_text())
    printed = "\n".join(printed_outputs(c) for c in code_cells(nb))
    assert f"benchmark: complete {record['complete']}" in printed, f"{path.name} was executed on other results than runs.json's"
    if record["complete"]:
        assert NO_RESULT not in printed, f"{path.name}: a question without its comparison on a complete table"


#: Each rule of the method, displayed as an equation in the markdown cell right before the cell
#: that lists the one public function implementing it (chapter prefix -> listed names).
RULES = {
    "03_": ("discriminator_loss", "generator_adversarial_loss"),             # the adversarial warm-up
    "04_": ("AnchorAccumulator",),                                           # both anchor rules
    "05_": ("anchor_pseudo_labels", "probability_pseudo_labels"),            # active targets, eq. (1)-(2)
    "06_": ("faithful_distance_loss", "pixel_l2_distance_loss", "target_pseudo_label_loss", "cag_loss"),
    "07_": ("cag_train_step",),                                              # the objective of a stage
}


@pytest.mark.parametrize("prefix", sorted(RULES))
def test_every_rule_is_an_equation_next_to_its_function(prefix):
    path = next(p for p in NOTEBOOKS if p.name.startswith(prefix))
    cells = nbformat.read(path, as_version=4).cells
    for name in RULES[prefix]:
        listed = [i for i, c in enumerate(cells) if c.cell_type == "code"
                  and re.search(rf"listing\([^)]*\b{name}\b", c.source)]
        assert listed, f"{path.name}: no cell lists {name}"
        before = cells[listed[0] - 1]
        assert before.cell_type == "markdown" and "$$" in before.source, \
            f"{path.name}: the cell before the listing of {name} displays no equation"
    if prefix == "07_":
        assert any("Algorithm" in c.source and ":::{admonition}" in c.source for c in cells if c.cell_type == "markdown"), \
            f"{path.name}: no algorithm box for the whole schedule"


def test_chapter_0_places_cag_in_its_field_with_a_sourced_table():
    """Chapter 0 opens the book; its table of the field names each number's source (a link a
    reader can open) and covers ProDA, DAFormer, HRDA, MIC and a foundation-model method."""
    assert NOTEBOOKS[0].name == "00_field.ipynb"
    markdown = "\n".join(c.source for c in nbformat.read(NOTEBOOKS[0], as_version=4).cells if c.cell_type == "markdown")
    header = next(line for line in markdown.splitlines() if line.startswith("| method |"))
    for column in ("year", "network", "GTA5", "SYNTHIA", "source"):
        assert column in header, column
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and line.count("|") == header.count("|")
            and not line.startswith(("| method", "|---"))]
    for method in ("ProDA", "DAFormer", "HRDA", "MIC", "DINOv2"):
        assert any(method in row for row in rows), f"no row for {method}"
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        numbers = [c for c in cells[3:5] if re.match(r"\d", c)]
        if numbers:
            assert "](https://" in cells[5], f"a number without a source a reader can open: {row[:80]}"


def test_formatted_glue_matches_myst_nb():
    assert formatted_glue("0.32517", ".3f") == "0.325"
    assert formatted_glue("0.1234", ".1%") == "12.3%"
    assert formatted_glue("12", None) == "12" and formatted_glue("'road'", None) == "road"
    assert shows_number("mIoU 0.325", "0.325") and not shows_number("mIoU 0.125", "12")
    assert not shows_number("in 2012", "12") and shows_number("12 classes", "12")


# ----------------------------------------------------------------------------- the cag.book tool


def make_notebook(sources, tags=None):
    cells = [nbformat.v4.new_code_cell(s, metadata={"tags": tags[i]} if tags and tags[i] else {})
             for i, s in enumerate(sources)]
    return nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                          "language": "python"}})


def test_clean_notebook_strips_timings_and_renumbers():
    nb = make_notebook(["1", "2", "3"])
    nb.metadata["papermill"] = {"duration": 1.5}
    counts = [4, None, 9]
    for cell, count in zip(nb.cells, counts):
        cell.execution_count = count
        cell.metadata.update({"papermill": {"status": "completed"}, "execution": {"iopub.status.busy": "now"}, "tags": []})
    nb.cells[2].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "3"}, execution_count=9)]
    cleaned = book.clean_notebook(nb)
    assert "papermill" not in cleaned.metadata
    assert [c.metadata for c in cleaned.cells] == [{}, {}, {}]
    assert [c.execution_count for c in cleaned.cells] == [1, None, 2]
    assert cleaned.cells[2].outputs[0]["execution_count"] == 2


def test_clean_notebook_merges_adjacent_streams_of_one_name():
    """A fresh clone's make book split one cell's stdout in two (a control run trained between
    two prints), so its notebook differed from the committed one: adjacent stdout outputs are
    joined, an stderr output between two stdout outputs keeps them apart."""
    nb = make_notebook(["print()"])
    stream = nbformat.v4.new_output
    nb.cells[0].execution_count = 1
    nb.cells[0].outputs = [stream("stream", name="stdout", text="a\n"), stream("stream", name="stdout", text="b\n"),
                           stream("stream", name="stderr", text="warn\n"), stream("stream", name="stdout", text="c\n"),
                           stream("execute_result", {"text/plain": "1"}, execution_count=1),
                           stream("stream", name="stdout", text="d\n")]
    outputs = book.clean_notebook(nb).cells[0].outputs
    assert [(o["output_type"], o.get("name"), o.get("text")) for o in outputs] == [
        ("stream", "stdout", "a\nb\n"), ("stream", "stderr", "warn\n"), ("stream", "stdout", "c\n"),
        ("execute_result", None, None), ("stream", "stdout", "d\n")]


def write_repo(root: Path, notebooks: dict) -> None:
    (root / "cag").mkdir()
    (root / "cag" / "__init__.py").write_text("")
    (root / "configs").mkdir()
    (root / "book").mkdir()
    (root / "book" / "intro.md").write_text("# intro")
    for name, source in notebooks.items():
        nbformat.write(make_notebook([source, "x = 1"], tags=[["parameters"], None]), root / "book" / f"{name}.ipynb")
    toc = ("format: jb-book\nroot: book/intro\nparts:\n  - caption: A\n    chapters:\n"
           + "".join(f"      - file: book/{name}\n" for name in notebooks) + "      - file: book/missing\n")
    (root / "_toc.yml").write_text(toc)


def test_chapters_follow_the_toc_and_skip_non_notebooks(tmp_path):
    write_repo(tmp_path, {"02_b": "profile = 'ci'", "01_a": "profile = 'ci'"})
    assert [p.name for p in book.chapters(tmp_path)] == ["02_b.ipynb", "01_a.ipynb"]


def test_parameter_defaults_reads_the_literals(tmp_path):
    write_repo(tmp_path, {"a": "profile = 'ci'  # note\nstage = None\noverrides = {'cag.lam': 0.5}"})
    assert book.parameter_defaults(tmp_path / "book" / "a.ipynb") == {"profile": "ci", "stage": None,
                                                                      "overrides": {"cag.lam": 0.5}}


def test_paper_chapters_pick_the_chapters_up_to_a_stage(tmp_path):
    write_repo(tmp_path, {"01": "stage = None", "02": "stage = 'warmup'", "03": "stage = 'stage2'",
                          "08": "profile = 'ci'"})
    order = ["source_only", "warmup", "anchors", "stage1", "stage2", "stage3", "evaluate"]
    assert [p.stem for p in book.paper_chapters(tmp_path, "stage1", order)] == ["01", "02"]
    assert [p.stem for p in book.paper_chapters(tmp_path, "evaluate", order)] == ["01", "02", "03"]
    with pytest.raises(ValueError, match="stage9"):
        book.paper_chapters(tmp_path, "stage9", order)


def test_glued_values_reads_myst_nb_records():
    nb = make_notebook(["glue"])
    nb.cells[0].outputs = [nbformat.v4.new_output(
        "display_data", {"application/papermill.record/text/plain": "0.25"},
        metadata={"scrapbook": {"name": "miou", "mime_prefix": "application/papermill.record/"}})]
    assert book.glued_values(nb) == {"miou": "0.25"}


def test_repo_relative_keeps_outside_paths_absolute(tmp_path):
    assert book.repo_relative(tmp_path / "configs" / "a.yaml", tmp_path) == "configs/a.yaml"
    assert book.repo_relative("/elsewhere/a.yaml", tmp_path) == "/elsewhere/a.yaml"


def test_paper_run_passes_controls_to_the_chapters_only_when_asked(monkeypatch, tmp_path):
    """The paper profile trains no control run unless ``--controls`` asks (one more warm-up, one
    more stage 1 of the released schedule): the flag reaches the chapters as ``controls=True``."""
    from cag import analysis

    assert analysis.trains_controls("ci") and not analysis.trains_controls("paper")
    assert analysis.trains_controls("paper", True) and not analysis.trains_controls("ci", False)
    with pytest.raises(ConfigError, match="profile"):
        analysis.trains_controls("gpu")
    seen = []
    chapters = [REPO / "book" / "02_network.ipynb", REPO / "book" / "03_source_only_warmup.ipynb"]
    monkeypatch.setattr(book, "paper_chapters", lambda root, until, stages: chapters)
    monkeypatch.setattr(book, "execute", lambda path, out, params, **kw: seen.append(dict(params)) or
                        nbformat.write(nbformat.v4.new_notebook(), Path(out)) or Path(out))
    for flag in ([], ["--controls"]):
        assert book.main(["paper-run", "configs/synthetic.yaml", "--out", str(tmp_path), *flag,
                          f"out_dir={tmp_path}"]) == 0
        assert json.loads((tmp_path / "run.json").read_text())["controls"] is bool(flag)
    # without the flag no chapter gets it; with it, only the chapters that declare the parameter
    assert "controls" not in seen[0] and "controls" not in seen[1]
    assert "controls" not in seen[2] and seen[3]["controls"] is True


@pytest.mark.parametrize("argv", [["execute", "--stage", "stage1"], ["execute", "book/no_such_chapter.ipynb"],
                                  ["paper-run", "configs/synthetic.yaml", "stray"], ["clean"]])
def test_command_line_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        book.main(argv)
    assert exit_info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_execute_replaces_a_notebook_only_when_every_cell_ran(tmp_path):
    pytest.importorskip("papermill")
    path = tmp_path / "chapter.ipynb"
    nbformat.write(make_notebook(["value = 2", "print(value * 21)"], tags=[["parameters"], None]), path)
    book.execute(path, parameters={"value": 3})
    executed = nbformat.read(path, as_version=4)
    assert "papermill" not in executed.metadata
    assert "63" in executed.cells[-1].outputs[0]["text"]
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    nbformat.write(make_notebook(["value = 2", "raise ValueError('broken')"], tags=[["parameters"], None]), path)
    before = path.read_text()
    with pytest.raises(Exception, match="broken"):
        book.execute(path)
    assert path.read_text() == before
    assert (tmp_path / "chapter.failed.ipynb").is_file()


# ----------------------------------------------------------------------------- nbval


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_notebook_re_executes_under_nbval(path):
    pytest.importorskip("nbval")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
               "--nbval-sanitize-with", str(REPO / "tests" / "nbval_sanitize.cfg"), str(path)]
    # The committed outputs come from `make book` (two threads); a CPU kernel's reduction order
    # depends on the thread count, so the chapters re-execute with two threads whatever this
    # worker has (make test: one per xdist worker), passive so they do not spin on shared cores.
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500, env=env)
    assert result.returncode == 0, f"nbval failed on {path.name}:\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}"


@pytest.mark.slow
def test_paper_run_executes_the_chapters_up_to_a_stage_into_the_run_directory(tmp_path):
    """`make paper-run`: the chapters up to a stage, executed with profile="paper" on files in the
    real GTA5/Cityscapes layouts (the benchmark's), with run.json beside the notebooks."""
    pytest.importorskip("papermill")
    data = tmp_path / "data"
    overrides = [f"out_dir={tmp_path / 'runs'}", f"data.synthetic.root={data}", f"data.source_root={data / 'source'}",
                 f"data.target_root={data / 'target'}", "data.synthetic.n_source=16", "data.synthetic.n_target_train=16",
                 "data.synthetic.n_target_val=8", "data.synthetic.n_target_test=8", "source_only.iters=4",
                 "train.val_interval=4", "train.batch_size=4", "anchors.num_images=16"]
    out = book.paper_run(REPO / "configs" / "synthetic.yaml", overrides, until="source_only")
    assert out == tmp_path / "runs" / "synthetic" / "book"
    assert sorted(p.name for p in out.glob("*.ipynb")) == ["01_data.ipynb", "02_network.ipynb"]
    record = json.loads((out / "run.json").read_text())
    assert record["profile"] == "paper" and record["until"] == "source_only"
    assert record["config"] == "configs/synthetic.yaml"
    assert record["overrides"]["source_only.iters"] == 4
    assert [n["name"] for n in record["notebooks"]] == ["01_data.ipynb", "02_network.ipynb"]
    executed = nbformat.read(out / "02_network.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "profile = \"paper\"" in injected[0].source
    assert not [o for c in code_cells(executed) for o in c.outputs if o.output_type == "error"]
    done = json.loads((tmp_path / "runs" / "synthetic" / "source_only" / "done.json").read_text())
    assert done["iters"] == 4
