"""The package's code shown inside a chapter, as a cell output.

A chapter explains a rule next to the code that implements it. The code is never copied into
the notebook: ``listing(anchor_distances, nearest_anchor_margin)`` reads the functions' source
from the installed ``cag`` package (``inspect.getsourcelines``) and returns an object that
Jupyter shows as highlighted code and the book renders the same way, headed by the file and
line numbers. nbval compares both forms (plain text and the highlighted HTML, hence the pinned
Pygments), so a chapter whose committed listing no longer matches the package, its code or its
place in the file, fails the notebook tests.
"""
from __future__ import annotations

import html
import inspect
import textwrap
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def _where(obj) -> tuple[str, int, int, str]:
    """(file relative to the repository, first line, last line, source) of a function or class."""
    obj = inspect.unwrap(obj)  # the function under a decorator such as torch.no_grad()
    lines, first = inspect.getsourcelines(obj)
    path = Path(inspect.getsourcefile(obj)).resolve()
    try:
        name = path.relative_to(PACKAGE_ROOT).as_posix()
    except ValueError:
        name = path.name
    return name, first, first + len(lines) - 1, textwrap.dedent("".join(lines)).rstrip("\n")


class Listing:
    """The source of one or more package objects; ``repr`` is plain text, ``_repr_html_`` is
    highlighted code whose long lines wrap instead of running past the page's column."""

    def __init__(self, *objects) -> None:
        if not objects:
            raise ValueError("listing() needs at least one function or class")
        self.parts = [_where(obj) for obj in objects]

    @property
    def text(self) -> str:
        return "\n\n".join(f"# {name}, lines {first}-{last}\n{source}" for name, first, last, source in self.parts)

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer

        blocks = []
        for name, first, last, source in self.parts:
            code = highlight(source, PythonLexer(), HtmlFormatter(noclasses=True, nowrap=True, style="default"))
            blocks.append(f'<div class="cag-listing"><div style="font-size:85%;color:#555">{html.escape(name)}, '
                          f'lines {first}-{last}</div><pre style="white-space:pre-wrap;overflow-wrap:anywhere;'
                          f'margin:0.2em 0 1em 0;padding:0.5em;background:#f8f8f8;line-height:125%">{code}</pre></div>')
        return "".join(blocks)


def listing(*objects) -> Listing:
    """Show the source of ``objects`` (functions or classes of the package) as a cell output."""
    return Listing(*objects)
