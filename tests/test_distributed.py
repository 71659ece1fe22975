"""Several processes on CPU (gloo): the same training as one process with the same global batch.

Every loss is a mean over the whole global batch, whatever the number of processes and of
gradient-accumulation micro-batches: the source labels below have void pixels in
unequal numbers per image, so the two ranks' halves of a batch (and the micro-batches of a step)
average over different numbers of pixels, pseudo-labels and (image, class) pairs. The
references are independent runs: one process holding the whole batch in one forward pass.
"""
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
    """A benchmark whose source labels have void pixels, in unequal numbers per image.

    Besides the generator's own void pixels, image i is void (label id 0) in its leftmost 8 i
    columns, so the crops of a batch, the two ranks' halves of it and the micro-batches of a
    step hold different numbers of ignored pixels: a mean per rank or per micro-batch is then
    not the mean over the batch.
    """
    root = tmp_path_factory.mktemp("ddp")
    generate(root, preset="class", size=(32, 64), n_source=8, n_target_train=8, n_target_val=4, n_target_test=2,
             progress=False)
    for i, path in enumerate(sorted((root / "source" / "labels").glob("*.png"))):
        ids = read_index_label(path).copy()
        ids[:, :8 * i] = 0
        write_gta5_label(path, ids)
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


# ---- one objective on any number of processes and micro-batches ---------------------------------------

STAGES = ("source_only", "warmup", "cag")
RUN_SETTINGS = [
    *SETTINGS, "data.target_train_labels=false", "train.val_max_images=2",
    "source_only.iters=2", "warmup.iters=2", "warmup.lr=0.01", "warmup.lr_d=0.001", "warmup.lambda_adv=0.1",
    "warmup.disc_channels=8", "cag.iters=2", "cag.lr=0.01", "cag.poly_horizon=100", "cag.delta_d=0.5",
    "cag.prob_threshold=0.6", "cag.min_pixels=2",
]


def _config(bench: str, out: str, *overrides: str):
    return load_config(REPO / "configs" / "synthetic.yaml", [
        f"data.source_root={bench}/source", f"data.target_root={bench}/target", f"out_dir={out}", *RUN_SETTINGS,
        *overrides])


@pytest.fixture(scope="module")
def start(bench, tmp_path_factory) -> dict:
    """The common start of every compared run: a briefly trained source model and its anchors."""
    from cag import stages

    out = tmp_path_factory.mktemp("start")
    cfg = _config(str(bench), str(out), f"train.batch_size={GLOBAL_BATCH}", "source_only.iters=30",
                  "source_only.lr=0.05", "anchors.num_images=8", "anchors.batch_size=4", "anchors.resize=null",
                  "anchors.min_pixels=2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages.supervised_stage(cfg, out / "source_only", "start")
        stages.compute_anchors(cfg, out / "anchors", out / "source_only" / "last.pt")
    finally:
        torch.set_num_threads(threads)
    return {"init": str(out / "source_only" / "last.pt"), "anchors": str(out / "anchors" / "anchors.pt")}


def _run_stages(rank: int, world: int, port: int, bench: str, start: dict, out: str, batch: int, accum: int,
                frozen_bn: bool, variant: str = "faithful", stage_names=STAGES) -> None:
    """Runs the stages (2 iterations each, all from ``start``) on one rank and records, per stage, in
    ``out/<stage>/record<rank>.pt``: the gradients the optimisers step with, the void pixels of every
    source batch and the labelled pixels of both pseudo-label maps of every CAG loss call.

    Dropout is off (each rank's forward must be reproducible). ``frozen_bn``: BatchNorm in eval mode
    (``warmup.freeze_bn`` for the warm-up; the other stages have no such option, so BatchNorm is kept
    out of training mode here), so that micro-batches see the statistics one batch would.
    """
    from cag import loop, stages

    originals = (torch.nn.Dropout.forward, torch.nn.modules.batchnorm._BatchNorm.train, stages.to_device,
                 loop._finite, stages.cag_loss, torch.get_num_threads())
    record: dict = {}

    def to_device(b, device, channels_last=False):
        image, label = originals[2](b, device, channels_last)
        if label is not None:
            record["void"].append(int((label == 255).sum()))
        return image, label

    def finite(losses, modules):
        record["grads"].append({f"{key}.{name}": p.grad.detach().clone() for key, m in modules.items()
                                for name, p in getattr(m, "module", m).named_parameters() if p.grad is not None})
        return originals[3](losses, modules)

    def cag_loss(*args, **kwargs):
        record["pseudo"].append(tuple(int((labels != 255).sum()) for labels in args[6:8]))
        return originals[4](*args, **kwargs)

    torch.nn.Dropout.forward = lambda self, x: x
    stages.to_device, loop._finite, stages.cag_loss = to_device, finite, cag_loss
    torch.set_num_threads(1)
    try:
        if world > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world)
        for stage in stage_names:
            record.update(void=[], grads=[], pseudo=[])
            eval_bn = frozen_bn and stage != "warmup"
            torch.nn.modules.batchnorm._BatchNorm.train = \
                (lambda self, mode=True: originals[1](self, False)) if eval_bn else originals[1]
            cfg = _config(bench, out, f"train.batch_size={batch}", f"train.grad_accum={accum}",
                          f"warmup.freeze_bn={str(frozen_bn).lower()}", f"cag.distance_loss={variant}")
            stage_dir = Path(out) / stage
            if stage == "source_only":
                stages.supervised_stage(cfg, stage_dir, "issue14", init=start["init"])
            elif stage == "warmup":
                stages.warmup_stage(cfg, stage_dir, "issue14", start["init"])
            else:
                stages.cag_stage(cfg, stage_dir, "issue14", start["init"], start["anchors"])
            torch.save(record, stage_dir / f"record{rank}.pt")
        if world > 1:
            dist.destroy_process_group()
    finally:
        (torch.nn.Dropout.forward, torch.nn.modules.batchnorm._BatchNorm.train, stages.to_device, loop._finite,
         stages.cag_loss) = originals[:5]
        torch.set_num_threads(originals[5])


def _result(out: Path, stage: str, rank: int = 0) -> tuple[dict, list[dict], dict]:
    record = torch.load(out / stage / f"record{rank}.pt", weights_only=True)
    lines = [json.loads(l) for l in (out / stage / "metrics.jsonl").read_text().splitlines()]
    losses = [{k: v for k, v in l.items() if k not in ("kind", "iter", "lr")} for l in lines if l["kind"] == "train"]
    weights = torch.load(out / stage / "last.pt", weights_only=True)["modules"]
    return record, losses, weights


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30))


def _assert_gradients(actual: dict, expected: dict, what: str, module_rtol: float, tensor_rtol: float | None) -> None:
    """The gradient of each module (all its parameters as one vector) within ``module_rtol`` of the
    reference relative to the reference's norm, and each parameter tensor within ``tensor_rtol``."""
    assert actual.keys() == expected.keys(), what
    for module in sorted({key.split(".")[0] for key in expected}):
        keys = [key for key in expected if key.split(".")[0] == module]
        error = _relative_error(torch.cat([actual[k].flatten() for k in keys]), torch.cat([expected[k].flatten() for k in keys]))
        assert error <= module_rtol, f"{what} {module}: relative error {error:.3g}"
    for key in expected if tensor_rtol is not None else ():
        if float(expected[key].abs().max()) > 0:
            error = _relative_error(actual[key], expected[key])
            assert error <= tensor_rtol, f"{what} {key}: relative error {error:.3g}"


def _assert_same_training(actual: Path, expected: Path, stage: str) -> None:
    """The losses of both iterations, the gradients of both optimiser steps and the final weights.

    Step 1 starts from the same weights: each module's gradient within 1e-5 relative (each
    parameter tensor within 1e-4: a few small tensors, such as the BatchNorm after the 1x1
    global pooling of a 2-image batch, carry float32 rounding at 1e-5). Step 2 starts from
    weights that already differ by rounding, which the BatchNorm of small batches and Adam
    amplify (Adam's first update of D is about lr_d times the sign of each gradient element, so
    elements whose gradient is near 0 move by +-lr_d on rounding): 1e-3. Losses, and the final
    weights of each module (as one vector; the bias of D's classifier, whose gradient nearly
    cancels between the domains, is not stable alone): 1e-5.
    """
    (rec_a, losses_a, weights_a), (rec_e, losses_e, weights_e) = _result(actual, stage), _result(expected, stage)
    assert len(losses_a) == len(losses_e) == len(rec_a["grads"]) == len(rec_e["grads"]) == 2
    for i, (la, le) in enumerate(zip(losses_a, losses_e)):
        assert la.keys() == le.keys()
        for key, value in le.items():
            assert la[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{stage} iteration {i + 1}: {key}"
    first, second = zip(rec_a["grads"], rec_e["grads"])
    assert sum(float(g.abs().sum()) for g in first[1].values()) > 0
    _assert_gradients(*first, f"{stage} gradient of step 1:", 1e-5, 1e-4)
    _assert_gradients(*second, f"{stage} gradient of step 2:", 1e-3, None)
    for module, state in weights_e.items():
        keys = [key for key, value in state.items() if value.is_floating_point()]
        error = _relative_error(torch.cat([weights_a[module][k].flatten() for k in keys]),
                                torch.cat([state[k].flatten() for k in keys]))
        assert error <= 1e-5, f"{stage} final {module}: relative error {error:.3g}"


def _assert_nontrivial_cag(expected: Path) -> None:
    record, losses, _ = _result(expected, "cag")
    assert all(a > 0 and p > 0 for a, p in record["pseudo"]), record["pseudo"]
    for key in ("ce_target", "dist_source", "dist_target"):
        assert all(l[key] > 0 for l in losses), key


@pytest.fixture(scope="module")
def ddp_runs(bench, start, tmp_path_factory) -> tuple[Path, Path]:
    """Each stage from the same start: one process with the global batch of 4, and 2 gloo
    processes with 2 images each (BatchNorm synchronised, in training mode)."""
    one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
    _run_stages(0, 1, 0, str(bench), start, str(one), GLOBAL_BATCH, 1, False)
    mp.spawn(_run_stages, args=(2, _free_port(), str(bench), start, str(two), GLOBAL_BATCH // 2, 1, False),
             nprocs=2, join=True)
    return one, two


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_with_unequal_void_pixels_optimise_the_one_process_objective(ddp_runs, stage):
    """Losses and gradients of 2 processes with half the batch each equal those of 1 process with
    the whole batch (1e-5 relative), although the halves hold different numbers of void pixels
    (and, in the CAG stage, of pseudo-labelled pixels)."""
    one, two = ddp_runs
    rank0, rank1 = _result(two, stage, 0)[0], _result(two, stage, 1)[0]
    assert rank0["void"][0] != rank1["void"][0] and rank0["void"][0] > 0 and rank1["void"][0] > 0
    if stage == "cag":
        assert rank0["pseudo"][0] != rank1["pseudo"][0]
        _assert_nontrivial_cag(one)
    _assert_same_training(two, one, stage)


@pytest.fixture(scope="module")
def accum_runs(bench, start, tmp_path_factory) -> dict:
    """One process, BatchNorm frozen: the batch of 4 in one forward pass, and in 2 micro-batches
    of 2 (``train.grad_accum=2``); every stage with the faithful distance loss, the CAG stage also
    with pixel_l2. Then ranks and micro-batches together: one process with a batch of 8, and 2 gloo
    processes with 2 micro-batches of 2 images each (faithful). (Micro-batches of 2, not 1: on
    the synthetic images' flat regions max pooling has exact ties, and PyTorch's CPU kernel routes
    their gradient differently for a batch of 1, a 1e-3 difference that has nothing to do with
    the normalisation.)"""
    runs = {}
    for variant, names in (("faithful", STAGES), ("pixel_l2", ("cag",))):
        for accum in (1, 2):
            out = tmp_path_factory.mktemp(f"accum{accum}_{variant}")
            _run_stages(0, 1, 0, str(bench), start, str(out), GLOBAL_BATCH, accum, True, variant, names)
            runs[variant, accum] = out
    out = runs["batch 8", "one process"] = tmp_path_factory.mktemp("batch8_one_process")
    _run_stages(0, 1, 0, str(bench), start, str(out), 2 * GLOBAL_BATCH, 1, True)
    out = runs["batch 8", "two processes"] = tmp_path_factory.mktemp("batch8_two_processes")
    mp.spawn(_run_stages, args=(2, _free_port(), str(bench), start, str(out), GLOBAL_BATCH, 2, True),
             nprocs=2, join=True)
    return runs


@pytest.mark.parametrize("stage, variant", [(s, "faithful") for s in STAGES] + [("cag", "pixel_l2")])
def test_grad_accum_with_unequal_void_pixels_equals_the_whole_batch(accum_runs, stage, variant):
    """``train.grad_accum=2`` with micro-batches of 2 takes the same optimiser steps as the batch of 4
    in one pass (gradients and weights within 1e-5 relative), with BatchNorm frozen, although the
    micro-batches hold different numbers of void (and pseudo-labelled) pixels."""
    whole, accumulated = accum_runs[variant, 1], accum_runs[variant, 2]
    record = _result(accumulated, stage)[0]
    assert record["void"][0] != record["void"][1] and min(record["void"][:2]) > 0
    if stage == "cag":
        assert record["pseudo"][0] != record["pseudo"][1]
        _assert_nontrivial_cag(whole)
    _assert_same_training(accumulated, whole, stage)


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_with_two_micro_batches_each_equal_the_whole_batch(accum_runs, stage):
    """Ranks and micro-batches together: 2 processes x 2 micro-batches of 2 images take the step of
    one process with the batch of 8 (BatchNorm frozen), every micro-batch with its own void count."""
    whole, split = accum_runs["batch 8", "one process"], accum_runs["batch 8", "two processes"]
    voids = [_result(split, stage, rank)[0]["void"][:2] for rank in (0, 1)]
    assert len({*voids[0], *voids[1]}) == 4 and min(voids[0] + voids[1]) > 0
    if stage == "cag":
        _assert_nontrivial_cag(whole)
    _assert_same_training(split, whole, stage)


# ---- the normalisation itself, in one process ----------------------------------------------------------

def test_global_denominators_are_the_counts_of_one_process_clamped_to_one():
    from cag.distributed import global_denominators

    den = global_denominators({"pixels": torch.tensor(7), "pairs": torch.tensor(0), "patches": 12})
    assert {k: float(v) for k, v in den.items()} == {"pixels": 7.0, "pairs": 1.0, "patches": 12.0}
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in den.values())


IGNORE = 255
LEAVES = ("src_logits", "src_features", "tgt_logits", "tgt_features")


def _cag_batch(generator: torch.Generator) -> dict:
    """Two images, 3 classes, 4-d features at 4x4, source labels at 8x8: the logits agree with the
    labels on most pixels (so the faithful loss has pairs), and image 0 has more ignored pixels."""
    def labels(size):
        y = torch.randint(0, 3, (2, *size), generator=generator)
        y[0, : size[0] // 2] = IGNORE
        y[1, 0, 0] = IGNORE
        return y

    src_small, tgt_small = labels((4, 4)), labels((4, 4))
    src_labels = src_small.repeat_interleave(2, 1).repeat_interleave(2, 2)

    def logits(y):
        hot = torch.nn.functional.one_hot(y.clamp(max=2), 3).permute(0, 3, 1, 2).float()
        return (2 * hot + torch.randn(2, 3, 4, 4, generator=generator)).requires_grad_(True)

    prob = tgt_small.clone()
    prob[1, 1] = IGNORE
    return {"src_logits": logits(src_small), "src_labels": src_labels,
            "src_features": torch.randn(2, 4, 4, 4, generator=generator).requires_grad_(True),
            "tgt_logits": logits(tgt_small), "tgt_features": torch.randn(2, 4, 4, 4, generator=generator).requires_grad_(True),
            "anchors": torch.randn(3, 4, generator=generator), "anchor_labels": tgt_small, "prob_labels": prob}


@pytest.mark.parametrize("variant", ["faithful", "pixel_l2"])
def test_cag_loss_of_two_halves_with_the_global_denominators_adds_up_to_the_whole_batch(variant):
    """The plain call on both images is the whole-batch mean of every term (tests/test_losses.py);
    each image alone, divided by the counts of both (cag_loss_counts + global_denominators), gives
    terms and gradients that add up to it. Each image's own mean does not."""
    from cag.distributed import global_denominators
    from cag.losses import cag_loss, cag_loss_counts

    batch = _cag_batch(torch.Generator().manual_seed(3))
    options = {"distance_variant": variant, "min_pixels": 1, "anchor_valid": torch.tensor([True, True, False])}
    whole = cag_loss(**batch, **options)
    whole_grads = torch.autograd.grad(whole["total"], [batch[k] for k in LEAVES])
    halves = [{k: v[i:i + 1] if k != "anchors" else v for k, v in batch.items()} for i in (0, 1)]
    counts = [cag_loss_counts(h["src_labels"], (4, 4), h["anchor_labels"], h["prob_labels"], 3,
                              h["src_logits"].argmax(1), h["tgt_logits"].argmax(1), distance_variant=variant,
                              min_pixels=1, anchor_valid=options["anchor_valid"]) for h in halves]
    assert {k: int(v) for k, v in counts[0].items()} != {k: int(v) for k, v in counts[1].items()}
    den = global_denominators({k: counts[0][k] + counts[1][k] for k in counts[0]})
    parts = [cag_loss(**h, **options, denominators=den) for h in halves]
    for key in whole:
        assert float(parts[0][key] + parts[1][key]) == pytest.approx(float(whole[key]), rel=1e-6), key
        assert float(whole[key]) > 0, key
    split_grads = torch.autograd.grad(parts[0]["total"] + parts[1]["total"], [batch[k] for k in LEAVES])
    for name, a, e in zip(LEAVES, split_grads, whole_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7, msg=name)
    own = [cag_loss(**h, **options) for h in halves]
    assert abs(float(own[0]["ce_source"] + own[1]["ce_source"]) / 2 - float(whole["ce_source"])) > 1e-3


def test_domain_losses_of_two_halves_with_the_global_patch_count_add_up_to_the_whole_batch():
    from cag.adversarial import FCDiscriminator, discriminator_loss, generator_adversarial_loss
    from cag.distributed import global_denominators

    torch.manual_seed(0)
    disc = FCDiscriminator(3, channels=4)
    source, target = torch.rand(2, 3, 32, 64).softmax(1), torch.rand(2, 3, 32, 64).softmax(1).requires_grad_(True)
    assert disc.patch_count(source.shape) == 2 * 1 * 2 == disc(source).numel()  # 32x64 halves five times: 1x2
    den = global_denominators({"patches": disc.patch_count(source.shape)})["patches"]
    whole_g, whole_d = generator_adversarial_loss(disc, target), discriminator_loss(disc, source, target)
    split_g = sum(generator_adversarial_loss(disc, target[i:i + 1], denominator=den) for i in (0, 1))
    split_d = sum(discriminator_loss(disc, source[i:i + 1], target[i:i + 1], denominators=(den, den)) for i in (0, 1))
    assert float(split_g) == pytest.approx(float(whole_g), rel=1e-6)
    assert float(split_d) == pytest.approx(float(whole_d), rel=1e-6)
    torch.testing.assert_close(torch.autograd.grad(split_g, target)[0], torch.autograd.grad(whole_g, target)[0],
                               rtol=1e-5, atol=1e-9)


def test_student_predictions_replay_dropout_and_leave_batchnorm_statistics_untouched(bench, tmp_path):
    """The counting pass of grad_accum > 1 (faithful distance loss) runs the student in train mode
    without changing what follows: the random state and the BatchNorm running statistics are as
    before, and the forward passes with gradients then draw the same dropout masks, so their
    argmax is the counted one. Reference: a copy of the student that never ran the counting pass."""
    import copy

    from cag import stages

    cfg = _config(str(bench), str(tmp_path), "train.batch_size=2")
    torch.manual_seed(0)
    student = stages.make_model(cfg, torch.device("cpu")).train()
    reference = copy.deepcopy(student)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(2, 3, 32, 64, generator=g), None, torch.rand(2, 3, 32, 64, generator=g), None)
               for _ in range(2)]
    state = torch.get_rng_state()
    predictions = stages._student_predictions(cfg, student, batches, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    for (name, a), b in zip(student.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), name
    outputs = {}
    for name, model in (("student", student), ("reference", reference)):
        torch.set_rng_state(state)
        outputs[name] = [stages._student_forward(cfg, model, xs, xt, torch.device("cpu")) for xs, _, xt, _ in batches]
    for (fs, ls, ft, lt), (rfs, rls, rft, rlt), (ps, pt) in zip(outputs["student"], outputs["reference"], predictions):
        assert torch.equal(ls, rls) and torch.equal(lt, rlt)
        assert torch.equal(ls.argmax(1), ps) and torch.equal(lt.argmax(1), pt)
    for (name, a), b in zip(student.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), name
    again = stages._student_forward(cfg, reference, *batches[0][::2], torch.device("cpu"))[1]
    assert not torch.equal(again, outputs["reference"][0][1])  # dropout is on: another draw, other logits
