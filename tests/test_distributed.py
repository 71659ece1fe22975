"""Several processes on CPU (gloo): the same training as one process with the same global batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cag import distributed
from cag.config import load_config
from cag.data.io import read_index_label, write_gta5_label
from cag.data.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 4
SETTINGS = [
    "model.backbone=tiny", "model.output_stride=8", "model.feature_dim=16", "model.aspp_rates=[1,2,3]",
    "data.base_width=64", "data.scale=[0.75,1.25]", "data.crop=[64,32]", "data.num_workers=0",
    "train.val_interval=100", "train.log_interval=1", "train.checkpoint_interval=100",
    "source_only.iters=3", "source_only.lr=0.01", "eval.batch_size=2", "quiet=true", "data.synthetic.root=null",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A benchmark whose source labels have no void pixels.

    With void pixels each rank's cross-entropy is a mean over a different number of pixels,
    and the mean of the ranks' means is not the global mean; without them the two are equal,
    so the comparison below can be exact.
    """
    root = tmp_path_factory.mktemp("ddp")
    generate(root, preset="class", size=(32, 64), n_source=8, n_target_train=8, n_target_val=4, n_target_test=0,
             progress=False)
    for path in sorted((root / "source" / "labels").glob("*.png")):
        ids = read_index_label(path)
        write_gta5_label(path, np.where(np.isin(ids, (0, 4)), 7, ids))
    return root


def _train(rank: int, world: int, port: int, bench: str, out: str) -> None:
    """One rank of a source-only run; dropout is off so that every rank's forward is reproducible."""
    from cag import stages

    dropout_forward, threads = torch.nn.Dropout.forward, torch.get_num_threads()
    torch.nn.Dropout.forward = lambda self, x: x
    torch.set_num_threads(1)
    try:
        if world > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world)
        cfg = load_config(REPO / "configs" / "synthetic.yaml", [
            f"data.source_root={bench}/source", f"data.target_root={bench}/target", f"out_dir={out}",
            f"train.batch_size={GLOBAL_BATCH // world}", *SETTINGS])
        stages.supervised_stage(cfg, Path(out) / "source_only", "ddp-test")
        if world > 1:
            dist.destroy_process_group()
    finally:
        torch.nn.Dropout.forward = dropout_forward
        torch.set_num_threads(threads)


def _losses(out: Path) -> list[float]:
    lines = [json.loads(l) for l in (out / "source_only" / "metrics.jsonl").read_text().splitlines()]
    return [l["ce_source"] for l in lines if l["kind"] == "train"]


def test_two_gloo_processes_match_one_process_with_the_global_batch(bench, tmp_path):
    _train(0, 1, 0, str(bench), str(tmp_path / "one"))
    mp.spawn(_train, args=(2, _free_port(), str(bench), str(tmp_path / "two")), nprocs=2, join=True)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    w1 = torch.load(tmp_path / "one" / "source_only" / "last.pt", weights_only=True)["modules"]["model"]
    w2 = torch.load(tmp_path / "two" / "source_only" / "last.pt", weights_only=True)["modules"]["model"]
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key].float(), w1[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    s1 = json.loads((tmp_path / "one" / "source_only" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "source_only" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["best_val_miou"] == pytest.approx(s1["best_val_miou"], abs=1e-6)


def _global_bn(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    bn = distributed.GlobalBatchNorm2d(3)
    part = x[rank * 2:(rank + 1) * 2].clone().requires_grad_(True)
    bn(part).pow(2).sum().backward()
    results[rank] = (part.grad.clone(), bn.running_mean.clone(), bn.running_var.clone())
    dist.destroy_process_group()


def test_global_batchnorm_equals_batchnorm_over_the_whole_batch():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    bn = torch.nn.BatchNorm2d(3)
    bn(x).pow(2).sum().backward()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_global_bn, args=(2, _free_port(), results), nprocs=2, join=True)
        grads = torch.cat([results[0][0], results[1][0]])
        torch.testing.assert_close(grads, x.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(results[0][1], bn.running_mean)
        torch.testing.assert_close(results[1][2], bn.running_var)


def test_torchrun_runs_the_cli_on_two_processes(bench, tmp_path):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
            "-m", "cag", "source_only", str(REPO / "configs" / "synthetic.yaml"),
            f"data.source_root={bench}/source", f"data.target_root={bench}/target", f"out_dir={tmp_path}",
            "train.batch_size=2", *SETTINGS, "source_only.iters=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "synthetic" / "source_only" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iters"] == 2
