"""The benchmark suite (``cag.bench``, benchmarks/NOTES.md): smoke mode, record fields, bookkeeping.

No timing thresholds: the smoke run only has to produce well-formed records; the hand-checked
parts are the bookkeeping (speed-ups, the schedule estimate, host-sync counts, error records).
"""
import datetime
import json
import math

import pytest
import torch

from cag import bench, stages


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run on CPU (every benchmark at toy sizes), shared by the tests that read it."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "results" / "smoke.json"
    code = bench.main(["--smoke", "--device", "cpu", "--threads", "1", "--quiet", "--out", str(out),
                       "--work-dir", str(root / "work")])
    return code, out


@pytest.mark.slow
def test_smoke_run_succeeds_and_writes_a_json_list(smoke):
    code, out = smoke
    assert code == 0
    records = json.loads(out.read_text())
    assert isinstance(records, list) and records
    assert not [r for r in records if r.get("error")]
    assert not out.with_name(out.name + ".tmp").exists()


@pytest.mark.slow
def test_smoke_records_carry_every_required_field(smoke):
    records = json.loads(smoke[1].read_text())
    for record in records:
        missing = [k for k in bench.REQUIRED_FIELDS if k not in record]
        assert not missing, (record["name"], missing)
        assert record["device"] == "cpu"
        assert record["torch"] == torch.__version__
        assert record["commit"]
        datetime.datetime.fromisoformat(record["date"])
        assert record["versions"]["torch"] == torch.__version__


@pytest.mark.slow
def test_smoke_covers_every_benchmark_and_mode(smoke):
    records = json.loads(smoke[1].read_text())
    pairs = {(r["name"], r["mode"]) for r in records}
    for arch in bench.ARCHS:
        for mode in ("fp32", "bf16_cl", "bf16_cl_compile"):
            assert (f"train_step_{arch}", mode) in pairs
    assert ("train_step_deeplabv3plus", "lead4_teacher_bf16") in pairs
    for mode in ("fp32", "fp32_matmul", "fp32_compile"):
        assert ("pseudo_labels", mode) in pairs
    for mode in ("gta5_decode", "gta5_decode_augment", "cityscapes_decode_augment"):
        assert ("data_pipeline", mode) in pairs
    assert ("eval_full_res", "fp32") in pairs and ("eval_full_res_preloaded", "bf16_cl") in pairs
    stages_seen = {r["name"] for r in records if r["name"].startswith("cpu_profile_")}
    assert stages_seen == {f"cpu_profile_{s}" for s in ("source_only", "warmup", "anchors", "stage1", "evaluate")}
    assert not [r for r in records if r["name"] == "released_schedule_estimate"]  # toy sizes are not costed


@pytest.mark.slow
def test_smoke_measurements_are_positive_and_consistent(smoke):
    records = json.loads(smoke[1].read_text())
    for r in records:
        if r["name"].startswith(("train_step_", "pseudo_labels", "eval_full_res", "data_pipeline")):
            assert r["ms_per_step"] > 0 and r["images_per_s"] > 0, r["name"]
    for r in (r for r in records if r["name"].startswith("train_step_")):
        per_step = r["shape"]["images_per_step"]
        assert r["shape"]["images_per_step"] == 2 * r["shape"]["batch"]
        assert r["images_per_s"] == pytest.approx(1000 * per_step / r["ms_per_step"])
        assert math.isfinite(r["loss_total"])
        assert r["speedup_vs_fp32"] == (1.0 if r["mode"] == "fp32" else pytest.approx(
            next(f["ms_per_step"] for f in records if f["name"] == r["name"] and f["mode"] == "fp32") / r["ms_per_step"]))


@pytest.mark.slow
def test_smoke_one_sync_lead_removes_the_per_parameter_syncs(smoke):
    """The loop's finite check syncs once per loss and per parameter; lead 1 once in all."""
    records = json.loads(smoke[1].read_text())
    syncs = {r["mode"]: r["host_syncs_per_step"] for r in records if r["name"] == "train_step_deeplabv3plus"}
    cfg = bench.step_config(bench.PROFILES["smoke"], "deeplabv3plus", bench.MODES["fp32"], torch.device("cpu"))
    params = len(list(stages.make_model(cfg, torch.device("cpu")).parameters()))
    losses = 6  # total, ce_source, ce_target, dist_source, dist_target, active_fraction
    assert syncs["fp32"]["item_or_bool"] - syncs["lead4_teacher_bf16"]["item_or_bool"] == losses + params - 1
    assert syncs["fp32"]["nonzero"] == syncs["lead4_teacher_bf16"]["nonzero"] > 0


def test_train_step_calls_the_package_step(monkeypatch):
    """The benchmark times ``cag.stages.cag_train_step`` itself, not a copy of it."""
    calls = []
    original = stages.cag_train_step

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(stages, "cag_train_step", counting)
    profile = bench.dataclasses.replace(bench.PROFILES["smoke"], warmup=2, iters=3)
    with bench.threads(1):
        record = bench.bench_train_step(profile, "deeplabv3plus", bench.MODES["fp32"], torch.device("cpu"), "eager")
    # first step, warmup - 1, iters, one more for the sync count
    assert len(calls) == 1 + (2 - 1) + 3 + 1
    assert record["name"] == "train_step_deeplabv3plus" and record["iters"] == 3


def test_count_host_syncs_on_cpu_counts_each_kind():
    x = torch.tensor([1.0, -2.0, 3.0])

    def work():
        x.sum().item()
        bool(x.any())
        x[x > 0]
        (x > 0).nonzero()
        torch.tensor(2.0)

    counts = bench.count_host_syncs(work, torch.device("cpu"))
    assert counts == {"total": 5, "item_or_bool": 2, "bool_index": 1, "nonzero": 1, "scalar_to_device": 1,
                      "masked_select": 0}


def _model_with_grads():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model(torch.ones(1, 3)).sum().backward()
    return model


@pytest.mark.parametrize("poison", [None, "grad_nan", "grad_inf", "loss_inf"])
def test_finite_one_sync_agrees_with_the_loop_check(poison):
    model = _model_with_grads()
    losses = {"total": torch.tensor(1.0), "ce": torch.tensor(0.5)}
    if poison == "grad_nan":
        model[1].weight.grad[0, 0] = float("nan")
    if poison == "grad_inf":
        model[0].bias.grad[1] = -float("inf")
    if poison == "loss_inf":
        losses["ce"] = torch.tensor(float("inf"))
    expected = poison is None
    assert bench.loop._finite(losses, {"model": model}) is expected
    assert bench.finite_one_sync(losses, {"model": model}) is expected


def test_finite_one_sync_syncs_once():
    model = _model_with_grads()
    losses = {"total": torch.tensor(1.0), "ce": torch.tensor(0.5)}
    cpu = torch.device("cpu")
    loop_syncs = bench.count_host_syncs(lambda: bench.loop._finite(losses, {"model": model}), cpu)
    one = bench.count_host_syncs(lambda: bench.finite_one_sync(losses, {"model": model}), cpu)
    assert loop_syncs["item_or_bool"] == 2 + 4  # two losses, four parameter tensors
    assert one["total"] == 1


def test_add_speedups_hand_values():
    records = [{"name": "train_step_a", "mode": "fp32", "ms_per_step": 100.0},
               {"name": "train_step_a", "mode": "bf16_cl", "ms_per_step": 25.0},
               {"name": "train_step_b", "mode": "bf16_cl", "ms_per_step": 10.0},
               {"name": "train_step_a", "mode": "tf32", "ms_per_step": None}]
    speedups = [r["speedup_vs_fp32"] for r in bench.add_speedups(records)]
    assert speedups == [1.0, 4.0, None, None]


def test_schedule_estimate_hand_values():
    """227,236 iterations x 40 ms + (227 validations x 500 + 11,888 anchor images) / 50 per s."""
    records = [{"name": "train_step_deeplabv3plus", "mode": "bf16_cl", "device": "gpu", "commit": "abc", "ms_per_step": 40.0,
                "images_per_s": 200.0, "peak_gib": 7.0, "profile": "released"},
               {"name": "train_step_deeplabv3plus", "mode": "fp32", "ms_per_step": 4.0, "images_per_s": 2000.0,
                "peak_gib": 0.1, "profile": "smoke"},
               {"name": "eval_full_res", "mode": "bf16_cl", "images_per_s": 50.0}]
    (estimate,) = bench.schedule_estimate(records)
    assert estimate["inputs"]["train_iters"] == 20000 + 20000 + 3 * 62412
    assert estimate["inputs"]["validations"] == 227
    assert (estimate["device"], estimate["commit"]) == ("gpu", "abc")
    assert estimate["gpu_hours"] == pytest.approx((227236 * 0.040 + (227 * 500 + 11888) / 50) / 3600)


def test_a_failed_measurement_becomes_an_error_record_and_the_run_goes_on():
    cpu = torch.device("cpu")

    def broken():
        raise ValueError("boom")

    units = [bench.Unit("train_step_x", "fp32", broken, cpu),
             bench.Unit("pseudo_labels", "fp32", lambda: {"name": "pseudo_labels", "mode": "fp32", "ms_per_step": 2.0,
                                                         "images_per_s": 2000.0, "peak_gib": 0.1}, cpu)]
    records = bench.run_units(units, {"device": "cpu", "torch": "t", "commit": "c", "date": "d"}, quiet=True)
    assert [r["name"] for r in records] == ["train_step_x", "pseudo_labels"]
    assert records[0]["error"] == "ValueError: boom"
    assert all(k in records[0] for k in bench.REQUIRED_FIELDS)
    assert records[1]["ms_per_step"] == 2.0 and "error" not in records[1]
    assert "ERROR ValueError: boom" in bench.format_table(records)


def test_an_exhausted_time_budget_starts_nothing():
    unit = bench.Unit("pseudo_labels", "fp32", lambda: pytest.fail("should not run"), torch.device("cpu"))
    assert bench.run_units([unit], {}, budget_s=-1, quiet=True) == []


def test_records_round_trip_through_the_json_file(tmp_path):
    records = [{"name": "pseudo_labels", "mode": "fp32", "ms_per_step": 1.5, "shape": {"hw": [128, 224]}}]
    path = tmp_path / "sub" / "r.json"
    bench.write_records(path, records)
    assert json.loads(path.read_text()) == records
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_table_shows_missing_values_as_dashes():
    table = bench.format_table([{"name": "data_pipeline", "mode": "gta5_decode", "device": "cpu",
                                 "images_per_s": 12.345, "ms_per_step": 81.0, "peak_gib": None}])
    row = table.splitlines()[2].split()
    assert row == ["data_pipeline", "gta5_decode", "cpu", "12.3", "81.00", "-", "-"]


def test_unknown_mode_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--modes", "fp32,fp64"])
    assert "unknown fp64" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(["--device", "cuda"])


@pytest.mark.skipif(not bench.Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc for the CPU peak")
def test_cpu_peak_window_resets():
    cpu = torch.device("cpu")
    bench.reset_peak(cpu)
    before = bench.peak_gib(cpu)
    block = torch.ones(64 * 2**20)  # 0.25 GiB, touched
    during = bench.peak_gib(cpu)
    del block
    bench.reset_peak(cpu)
    after = bench.peak_gib(cpu)
    assert during - before > 0.2
    assert after < during - 0.2


@pytest.mark.cuda
def test_smoke_run_on_cuda(tmp_path):
    out = tmp_path / "cuda.json"
    assert bench.main(["--smoke", "--device", "cuda", "--quiet", "--only", "pseudo_labels,train_step",
                       "--archs", "deeplabv3plus", "--modes", "fp32,bf16_cl,lead4_teacher_bf16", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert {r["device"] for r in records} == {torch.cuda.get_device_name()}
    syncs = {r["mode"]: r["host_syncs_per_step"]["total"] for r in records if r["name"] == "train_step_deeplabv3plus"}
    assert syncs["fp32"] > syncs["lead4_teacher_bf16"] > 0
