"""Shared pytest configuration and fixtures."""
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on machines without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (marker 'cuda')")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def bench(tmp_path_factory) -> Path:
    """A tiny built-in benchmark (32x64 frames: 8 source, 8 target train, 2 target val), shared
    read-only by the tests that run the pipeline for a few iterations."""
    from cag.data.synthetic import generate

    root = tmp_path_factory.mktemp("bench")
    generate(root, preset="class", size=(32, 64), n_source=8, n_target_train=8, n_target_val=2,
             n_target_test=0, progress=False)
    return root
