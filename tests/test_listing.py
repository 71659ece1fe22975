"""cag.listing: the package's source shown as a chapter's cell output (file, lines, the code)."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from cag.anchors import AnchorAccumulator
from cag.listing import listing
from cag.pseudo_labels import anchor_pseudo_labels

REPO = Path(__file__).resolve().parents[1]


def test_a_decorated_function_is_listed_from_its_own_file_and_lines():
    text = repr(listing(anchor_pseudo_labels))  # under @torch.no_grad(): the wrapper lives in torch
    header, *body = text.splitlines()
    lines = (REPO / "cag" / "pseudo_labels.py").read_text().splitlines()
    first = next(i for i, line in enumerate(lines, start=1) if line.startswith("def anchor_pseudo_labels("))
    assert header.startswith("# cag/pseudo_labels.py, lines ")
    start, end = map(int, header.rsplit(" ", 1)[1].split("-"))
    assert start == first - 1 and lines[start - 1] == "@torch.no_grad()"  # the decorator is shown too
    assert body == lines[start - 1:end]


def test_a_method_is_dedented_and_several_objects_follow_each_other():
    text = listing(AnchorAccumulator.update, anchor_pseudo_labels).text
    parts = text.split("\n\n# ")
    assert len(parts) == 2 and parts[1].startswith("cag/pseudo_labels.py")
    header, decorator, signature = parts[0].splitlines()[:3]
    assert header.startswith("# cag/anchors.py, lines ")
    assert decorator == "@torch.no_grad()" and signature.startswith("def update(")  # dedented: no leading spaces
    assert inspect.getsource(AnchorAccumulator.update).splitlines()[0].startswith("    ")


def test_html_wraps_long_lines_and_escapes_the_code():
    html = listing(anchor_pseudo_labels)._repr_html_()
    assert "white-space:pre-wrap" in html and "cag/pseudo_labels.py, lines" in html
    assert "-&gt;" in html and "-> torch" not in html  # the annotation "-> torch.Tensor" escaped


def test_nothing_to_list_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        listing()
