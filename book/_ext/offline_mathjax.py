"""Sphinx extension: MathJax 3 served from the built site, so the book's maths renders offline.

MathJax comes from the pinned PyPI package ``django-static-mathjax`` (the MathJax 3 release
files, no Django code); after an HTML build its ``es5`` folder is copied to
``_static/mathjax`` and every page loads ``_static/mathjax/tex-mml-chtml.js`` instead of a CDN.
"""
from __future__ import annotations

import shutil
from pathlib import Path

MATHJAX_FILE = "mathjax/tex-mml-chtml.js"


def mathjax_release() -> Path:
    """The ``es5`` folder of the installed MathJax 3 release."""
    import mathjax

    folder = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (folder / "tex-mml-chtml.js").is_file():
        raise FileNotFoundError(f"{folder}: no MathJax 3 release; install django-static-mathjax (requirements.txt)")
    return folder


def use_local_mathjax(app, config) -> None:
    config.mathjax_path = MATHJAX_FILE


def copy_mathjax(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        shutil.copytree(mathjax_release(), Path(app.outdir) / "_static" / "mathjax", dirs_exist_ok=True)


def setup(app):
    mathjax_release()
    app.connect("config-inited", use_local_mathjax)
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
