"""Every citation in the prose points at something a reader of the public repository can open.

Private working notes (the method and data-format notes kept outside the repository, the shared
folder beside the checkout, the project's own issue tracker) are not sources a reader can open.
The prose cites instead the project's docs (``docs/method.md``, ``docs/paper-vs-code.md``,
``docs/data.md``, ``docs/robustness.md``), the paper, and public GitHub issues by address
(``owner/repo#N``). This test scans the docstrings, comments, configurations, docs and book pages
(and, in a separate set of cases whose ids end in ``.ipynb``, the notebooks' cell sources and text
outputs) and fails on any private citation, naming file and line.

Run the notebook part alone with ``-k ipynb`` or leave it out with ``-k "not ipynb"``.
"""
from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

#: The places where prose lives (globs relative to the repository root).
TEXT_GLOBS = (
    "cag/**/*.py",
    "configs/**/*.yaml",
    "docs/*.md",
    "README.md",
    "data_scripts/*",
    "results/README.md",
    "benchmarks/NOTES.md",
    "tests/*.py",
    "book/*.md",
    "book/api.rst",
)
NOTEBOOK_GLOB = "book/*.ipynb"

# Built from pieces so that this file does not cite what it forbids.
_SPEC = "method" + "-spec"
_FORMATS = "data" + "-formats"
_ENGINEERING = "book" + "-engineering"
_SHARED = re.compile(r"(?:\.\./|/work/)shared\b")
_PLAIN = re.compile(
    "|".join((re.escape(_SPEC), re.escape(_FORMATS), re.escape(_ENGINEERING), r"evidence\s+issue", r"real-scale\s+issue")),
    re.IGNORECASE,
)
#: "issue 4", "issues 7 and 8", "issue #10": a number after "issue" names a private tracker entry
#: unless the text right before it is a repository address.
_ISSUE_WORD = re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE)
_HASH = re.compile(r"#\d+\b")
_REPO_BEFORE = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_COLOUR_BEFORE = re.compile(r"(?:colou?r|background)\s*[:=]\s*['\"]?$", re.IGNORECASE)
#: ``[#N](https://github.com/owner/repo/issues/N)``: a link to a public issue.
_LINKED = re.compile(r"\[`?#(\d+)`?\]\(https://github\.com/[\w.-]+/[\w.-]+/(?:issues|pull)/\1\)")


def _files(pattern: str) -> list[Path]:
    return sorted(p for p in ROOT.glob(pattern) if p.is_file() and p.resolve() != THIS
                  and "__pycache__" not in p.parts)


def _text_files() -> list[Path]:
    seen: dict[Path, None] = {}
    for pattern in TEXT_GLOBS:
        for path in _files(pattern):
            if path.suffix in {".pyc", ".png", ".jpg", ".pdf"}:
                continue
            seen.setdefault(path, None)
    return list(seen)


def _ids(paths: list[Path]) -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in paths]


def problems_in_line(line: str, allow_shared: bool = False) -> list[str]:
    """The private citations in one line of text, as short descriptions."""
    found = [f"{m.group(0)!r}" for m in _PLAIN.finditer(line)]
    if not allow_shared:
        found += [f"{m.group(0)!r}" for m in _SHARED.finditer(line)]
    linked = {m.start() + m.group(0).index("#") for m in _LINKED.finditer(line)}
    for m in _HASH.finditer(line):
        if m.start() in linked or _REPO_BEFORE.search(line[:m.start()]):
            continue
        if len(m.group(0)) in (4, 7) and _COLOUR_BEFORE.search(line[:m.start()]):
            continue  # a CSS colour such as color:#555
        found.append(f"{m.group(0)!r} without owner/repo")
    for m in _ISSUE_WORD.finditer(line):
        found.append(f"{m.group(0)!r} (a private issue; cite owner/repo#N or a document)")
    return found


def _python_prose_lines(source: str) -> set[int]:
    """Line numbers of a Python file's comments and docstrings."""
    lines: set[int] = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                lines.add(tok.start[0])
    except (tokenize.TokenError, SyntaxError):
        return set(range(1, source.count("\n") + 2))
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def scan_text(path: Path, text: str) -> list[str]:
    """``path:line: problem`` for every private citation in a text file."""
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
    # tests may open the shared notes for an optional comparison (code, skipped when absent);
    # their comments and docstrings may not cite them.
    prose = None
    if path.suffix == ".py" and rel.startswith("tests/"):
        prose = _python_prose_lines(text)
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        allow_shared = prose is not None and number not in prose
        out += [f"{rel}:{number}: {p}" for p in problems_in_line(line, allow_shared)]
    return out


def _notebook_texts(nb: dict):
    """(where, text) for every cell source and text output of a notebook."""
    for index, cell in enumerate(nb.get("cells", []), start=1):
        source = cell.get("source", "")
        yield f"cell {index} ({cell.get('cell_type')})", "".join(source) if isinstance(source, list) else source
        for output in cell.get("outputs", []) or []:
            if "text" in output:
                text = output["text"]
                yield f"cell {index} output", "".join(text) if isinstance(text, list) else text
            for mime, value in (output.get("data") or {}).items():
                if mime.startswith("text/"):
                    yield f"cell {index} output {mime}", "".join(value) if isinstance(value, list) else value


def scan_notebook(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    nb = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for where, text in _notebook_texts(nb):
        for number, line in enumerate(text.splitlines(), start=1):
            out += [f"{rel}: {where} line {number}: {p}" for p in problems_in_line(line)]
    return out


TEXT_FILES = _text_files()
NOTEBOOKS = _files(NOTEBOOK_GLOB)


@pytest.mark.parametrize("path", TEXT_FILES, ids=_ids(TEXT_FILES))
def test_no_private_citations(path):
    problems = scan_text(path, path.read_text(encoding="utf-8", errors="replace"))
    assert not problems, "citations a reader cannot open:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_no_private_citations_in_notebooks(path):
    problems = scan_notebook(path)
    assert not problems, "citations a reader cannot open:\n" + "\n".join(problems)


def test_the_scan_sees_something():
    assert len(TEXT_FILES) > 30 and any(p.name == "method.md" for p in TEXT_FILES)


@pytest.mark.parametrize("line", [
    "see " + _SPEC + " section 6",
    "(" + _FORMATS + ".md 2.3)",
    "(" + _ENGINEERING + " 2.2: the build renders them)",
    "read ../shared/reference/x.md",
    "the benchmark table of issue 7",
    "the network (ISSUE #6)",
    "as #10 says",
    "the evidence issue",
    "the real-scale Issue",
])
def test_bad_references_are_caught(line):
    assert problems_in_line(line)


@pytest.mark.parametrize("line", [
    "`RogerZhangzz/CAG_UDA#6`",
    "[#2](https://github.com/RogerZhangzz/CAG_UDA/issues/2)",
    "microsoft/ProDA#27, <https://github.com/microsoft/ProDA/issues/27>",
    "docs/method.md §12, docs/paper-vs-code.md row 29",
    "border-color:#112233",
    '<div style="color:#555">',
    "background:#123",
])
def test_public_references_pass(line):
    assert not problems_in_line(line)


def test_tests_may_open_shared_files_in_code():
    path = ROOT / "tests" / "test_example_shared.py"
    code = 'ARTIFACTS = ROOT.parent / "shared" / "x"\nREF = "../shared/reference/a.json"\n'
    assert scan_text(path, code) == []
    assert scan_text(path, '"""Compares with ../shared/reference."""\n')
    assert scan_text(path, "x = 1  # see ../shared/reference\n")
