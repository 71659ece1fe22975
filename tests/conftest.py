"""Shared pytest configuration and fixtures."""
from pathlib import Path

import pytest
import torch


#: ``make test`` runs every test but the real-scale file on two pytest-xdist workers with one
#: thread each (``-n 2 --dist loadfile --no-loadscope-reorder``: a test file is one work unit,
#: its module and session fixtures built once), then the real-scale file alone with two threads
#: (its runs need ~9 GB each; beside another run or a heavy test they exceeded the 24 GB of the
#: project's machine). Files start in this order, the longest first (benchmarks/NOTES.md
#: section 10), the rest in their usual order.
LONGEST_FIRST = ["test_notebooks.py"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on machines without a CUDA device; the test files
    start longest first (see :data:`LONGEST_FIRST`)."""
    if not torch.cuda.is_available():
        skip_cuda = pytest.mark.skip(reason="needs a CUDA device (marker 'cuda')")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable


@pytest.fixture(scope="session")
def bench(tmp_path_factory) -> Path:
    """A tiny built-in benchmark (32x64 frames: 8 source, 8 target train, 2 target val), shared
    read-only by the tests that run the pipeline for a few iterations."""
    from cag.data.synthetic import generate

    root = tmp_path_factory.mktemp("bench")
    generate(root, preset="class", size=(32, 64), n_source=8, n_target_train=8, n_target_val=2,
             n_target_test=0, progress=False)
    return root
