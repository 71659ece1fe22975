"""Every mistake a user can make ends in one clear line (cag.errors; docs/robustness.md section 7).

Each kind of bad input is run through the command line (``cag.cli.main`` in this process, the
code behind ``python -m cag``; a few through a real ``python -m cag`` subprocess) and must end
with the documented exit status, a short message on stderr that names the file or key, and no
traceback. Configuration, layout, checkpoint, anchors and output faults must be found before any
stage trains (no ``metrics.jsonl`` anywhere); a fault inside the data at the first read of the
bad file, after which a rerun with the file fixed resumes. A genuine bug still shows its
traceback, and a malicious pickle given as a checkpoint or anchors file never runs.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from cag import cli, errors
from cag.anchors import save_anchors
from cag.checkpoint import save_checkpoint
from cag.data.synthetic import generate
from test_robustness import tiny_params, write_yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def fresh_bench(root: Path) -> Path:
    """A private copy of the tiny benchmark, for a test that breaks one of its files."""
    generate(root, preset="class", size=(32, 64), n_source=8, n_target_train=8, n_target_val=2,
             n_target_test=0, progress=False)
    return root


class Pwned:
    """A pickle that would create a file when loaded: it must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def config_file(bench: Path, tmp_path: Path, **params) -> Path:
    return write_yaml(tmp_path / "run.yaml", {**tiny_params(bench, tmp_path / "runs"), **params})


def run_cli(capsys, argv) -> tuple[int, str]:
    status = cli.main(argv)
    return status, capsys.readouterr().err


def assert_one_clear_line(status: int, err: str, *named: str, code: int = errors.EXIT_BAD_INPUT) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == code, err
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= 3, err
    for text in named:
        assert text in err, f"{text!r} not named in: {err}"


def trained_nothing(tmp_path: Path) -> bool:
    return not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("last.pt"))


def tiny_model_checkpoint(bench: Path, tmp_path: Path, **params) -> Path:
    """A real checkpoint of another network: the tiny model with ``params`` changed."""
    from cag.config import load_config
    from cag.stages import make_model

    cfg = load_config(params={**tiny_params(bench, tmp_path / "other"), **params})
    path = tmp_path / "other.pt"
    save_checkpoint(path, {"format": "cag-model/1", "model": make_model(cfg, torch.device("cpu")).state_dict()})
    return path


# --------------------------------------------------------------------------- configuration


CONFIG_FAULTS = {
    "unknown key": (["cag.detla_d=2.0"], ["cag.detla_d", "did you mean 'cag.delta_d'"]),
    "wrong type": (["train.batch_size=four"], ["train.batch_size", "expected an integer"]),
    "impossible value": (["cag.delta_d=-1"], ["cag.delta_d", "must be >= 0"]),
    "missing init file": (["model.init=/nonexistent/warmup.pt"], ["model.init", "/nonexistent/warmup.pt"]),
}


@pytest.mark.parametrize("case", CONFIG_FAULTS)
def test_configuration_faults_end_in_one_line(bench, tmp_path, capsys, case):
    overrides, named = CONFIG_FAULTS[case]
    status, err = run_cli(capsys, ["run", str(config_file(bench, tmp_path)), *overrides])
    assert_one_clear_line(status, err, "configuration error:", *named)
    assert not (tmp_path / "runs").exists()


def test_a_configuration_file_that_is_not_yaml_is_named(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("data: [unclosed\n")
    status, err = run_cli(capsys, ["run", str(bad)])
    assert_one_clear_line(status, err, "configuration error:", str(bad), "not valid YAML")
    status, err = run_cli(capsys, ["run", str(tmp_path / "absent.yaml")])
    assert_one_clear_line(status, err, "configuration file not found", str(tmp_path / "absent.yaml"))


# --------------------------------------------------------------------------- data


def test_a_missing_data_root_is_named_before_any_work(bench, tmp_path, capsys):
    status, err = run_cli(capsys, ["run", str(config_file(bench, tmp_path, **{"data.source_root": "/nonexistent/gta5"}))])
    assert_one_clear_line(status, err, "data error:", "/nonexistent/gta5", "does not exist")
    assert trained_nothing(tmp_path)


def test_a_wrong_layout_is_named_before_any_work(bench, tmp_path, capsys):
    status, err = run_cli(capsys, ["run", str(config_file(bench, tmp_path, **{"data.source_root": str(bench / "target")}))])
    assert_one_clear_line(status, err, "data error:", str(bench / "target"), "looks like a Cityscapes root")
    assert trained_nothing(tmp_path)


def test_a_missing_split_is_named_before_any_work(bench, tmp_path, capsys):
    status, err = run_cli(capsys, ["run", str(config_file(bench, tmp_path, **{"data.val_split": "validation"}))])
    assert_one_clear_line(status, err, "data error:", "validation")
    assert trained_nothing(tmp_path)


def first_read_after_checkpoint(bench: Path, seed: int, batch: int, checkpoint: int) -> Path:
    """The source image that source-only reads first after its first checkpoint (epoch 0).

    The stream's order is ``cag.loop.ResumableBatchSampler``'s permutation of epoch 0.
    """
    names = sorted(p.name for p in (bench / "source" / "images").glob("*.png"))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed * 100_003)).tolist()
    return bench / "source" / "images" / names[order[checkpoint * batch]]


def test_a_corrupt_frame_deep_in_the_set_fails_at_its_first_read_and_a_fixed_rerun_resumes(tmp_path, capsys):
    bench = tmp_path / "bench"
    fresh_bench(bench)
    params = tiny_params(bench, tmp_path / "runs")
    frame = first_read_after_checkpoint(bench, params["seed"], params["train.batch_size"],
                                        params["train.checkpoint_interval"])
    good = frame.read_bytes()
    frame.write_bytes(good[:80])  # a truncated PNG: the header survives, the pixels do not
    config = write_yaml(tmp_path / "run.yaml", params)
    status, err = run_cli(capsys, ["run", str(config), "--until", "source_only"])
    assert_one_clear_line(status, err, "data error:", str(frame), "cannot read image")
    stage = tmp_path / "runs" / "tiny" / "source_only"
    assert load_iter(stage / "last.pt") == params["train.checkpoint_interval"]
    assert not (stage / "done.json").exists()

    frame.write_bytes(good)
    status = cli.main(["run", str(config), "--until", "source_only"])
    out = capsys.readouterr()
    assert status == 0, out.err
    assert json.loads((stage / "done.json").read_text())["iters"] == params["source_only.iters"]
    assert not list((tmp_path / "runs" / "tiny").glob("*.stale-*"))


def load_iter(path: Path) -> int:
    from cag.checkpoint import load_checkpoint

    return int(load_checkpoint(path)["iter"])


def test_a_colour_label_is_named_at_its_first_read(bench, tmp_path, capsys):
    data = tmp_path / "bench"
    fresh_bench(data)
    label = sorted((data / "source" / "labels").glob("*.png"))[0]
    Image.open(label).convert("RGB").save(label)  # a colour visualisation instead of label ids
    params = {**tiny_params(data, tmp_path / "runs"), "train.checkpoint_interval": 100}
    status, err = run_cli(capsys, ["run", str(write_yaml(tmp_path / "run.yaml", params)), "--until", "source_only"])
    assert_one_clear_line(status, err, "data error:", str(label), "mode 'RGB'")
    run_dir = tmp_path / "runs" / "tiny"
    assert not list(run_dir.rglob("*.pt"))  # it failed in the first epoch, before any checkpoint

    # Corrected by pointing at a good copy (another data root, so another fingerprint): the
    # failed start held nothing, so it is replaced, not left behind as a .stale- folder.
    fixed = {**params, "data.source_root": str(bench / "source")}
    assert cli.main(["run", str(write_yaml(tmp_path / "run.yaml", fixed)), "--until", "source_only"]) == 0
    assert (run_dir / "source_only" / "done.json").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["source_only"]


def test_frames_without_a_label_are_named_once_per_run(tmp_path):
    """GTA5 has frames without labels: one warning per dataset naming them, not one per stage."""
    data = tmp_path / "bench"
    fresh_bench(data)
    unpaired = sorted((data / "source" / "labels").glob("*.png"))[3]
    unpaired.unlink()
    config = write_yaml(tmp_path / "run.yaml", tiny_params(data, tmp_path / "runs"))
    done = subprocess.run([sys.executable, "-m", "cag", "run", str(config), "--until", "anchors"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("MissingFilesWarning") == 1, done.stderr  # source-only, warm-up, anchors: once
    assert f"dropped 1 of 8 entries whose image or label file is missing: {unpaired.name} (no label" in done.stderr


def test_frames_of_different_sizes_in_one_batch_are_named(tmp_path, capsys):
    data = tmp_path / "bench"
    fresh_bench(data)
    val = sorted((data / "target" / "leftImg8bit" / "val").rglob("*.png"))[1]
    label = Path(str(val).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
    for path in (val, label):
        with Image.open(path) as im:
            im.crop((0, 0, 64, 30)).save(path)  # 64x30 among 64x32 frames
    params = {**tiny_params(data, tmp_path / "runs"), "source_only.iters": 4}
    status, err = run_cli(capsys, ["run", str(write_yaml(tmp_path / "run.yaml", params)), "--until", "source_only"])
    assert_one_clear_line(status, err, "data error:", "different sizes", val.name, "64x30", "64x32")


# --------------------------------------------------------------------------- checkpoints


def test_a_truncated_checkpoint_is_named_before_any_work(bench, tmp_path, capsys):
    good = tiny_model_checkpoint(bench, tmp_path)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[:1000])
    status, err = run_cli(capsys, ["run", str(config_file(bench, tmp_path, **{"model.init": str(bad)}))])
    assert_one_clear_line(status, err, "checkpoint error:", "model.init", str(bad), "truncated or corrupt")
    assert trained_nothing(tmp_path)


def test_a_checkpoint_of_another_network_is_named_before_any_work(bench, tmp_path, capsys):
    other = tiny_model_checkpoint(bench, tmp_path, **{"model.feature_dim": 16})
    status, err = run_cli(capsys, ["run", str(config_file(bench, tmp_path, **{"model.init": str(other)}))])
    assert_one_clear_line(status, err, "checkpoint error:", "model.init", str(other), "shape mismatches")
    assert trained_nothing(tmp_path)


def test_a_malicious_checkpoint_never_runs_and_is_named(bench, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Pwned(marker)}, evil)
    status, err = run_cli(capsys, ["run", str(config_file(bench, tmp_path, **{"model.init": str(evil)}))])
    assert_one_clear_line(status, err, "checkpoint error:", str(evil), "refused to load")
    assert not marker.exists()
    assert trained_nothing(tmp_path)


# --------------------------------------------------------------------------- anchors


def test_a_model_checkpoint_given_as_anchors_is_named_before_any_work(bench, tmp_path, capsys):
    model = tiny_model_checkpoint(bench, tmp_path)
    status, err = run_cli(capsys, ["run", str(config_file(bench, tmp_path, **{"anchors.file": str(model)}))])
    assert_one_clear_line(status, err, "anchors error:", "anchors.file", str(model), "objective_vectors")
    assert trained_nothing(tmp_path)


def test_anchors_of_the_wrong_shape_are_named_before_any_work(bench, tmp_path, capsys):
    anchors = tmp_path / "anchors.pt"
    save_anchors(anchors, torch.zeros(19, 256), torch.ones(19))  # the released size, not the tiny network's 8
    status, err = run_cli(capsys, ["run", str(config_file(bench, tmp_path, **{"anchors.file": str(anchors)}))])
    assert_one_clear_line(status, err, "anchors error:", "anchors.file", "[19, 256]", "[19, 8]")
    assert trained_nothing(tmp_path)


def test_the_projects_own_anchors_file_is_accepted_as_anchors_file(bench, tmp_path):
    from cag.anchors import read_anchors_file

    path = tmp_path / "anchors.pt"
    save_anchors(path, torch.arange(6.0).reshape(3, 2), torch.tensor([1.0, 0.0, 2.0]))
    anchors, counts = read_anchors_file(path)
    assert anchors.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]] and counts.tolist() == [1.0, 0.0, 2.0]


def test_a_malicious_anchors_file_never_runs_and_is_named(bench, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "category_anchors"
    evil.write_bytes(pickle.dumps({"objective_vectors": Pwned(marker)}))
    status, err = run_cli(capsys, ["run", str(config_file(bench, tmp_path, **{"anchors.file": str(evil)}))])
    assert_one_clear_line(status, err, "anchors error:", str(evil), "refused to load")
    assert not marker.exists()


# --------------------------------------------------------------------------- output


def test_an_out_dir_that_is_a_file_is_named_before_any_work(bench, tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    status, err = run_cli(capsys, ["run", str(config_file(bench, tmp_path))])
    assert_one_clear_line(status, err, "output error:", "out_dir", f"{blocker} is a file")
    assert blocker.read_text() == "not a folder"


def test_a_run_directory_that_is_a_file_is_named_before_any_work(bench, tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").write_text("not a folder")
    status, err = run_cli(capsys, ["run", str(config_file(bench, tmp_path))])
    assert_one_clear_line(status, err, "output error:", "out_dir", f"{tmp_path / 'runs' / 'tiny'} is a file")


def test_a_benchmark_folder_that_is_a_file_is_named(bench, tmp_path, capsys):
    blocker = tmp_path / "generated"
    blocker.write_text("not a folder")
    config = config_file(bench, tmp_path, **{"data.synthetic.root": str(blocker)})
    status, err = run_cli(capsys, ["run", str(config)])
    assert_one_clear_line(status, err, "output error:", str(blocker), "is a file")


# --------------------------------------------------------------------------- the other commands


def test_the_data_scripts_and_the_generator_end_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    runs = {
        "make_lists.py": [sys.executable, str(ROOT / "data_scripts" / "make_lists.py"), "gta5", "/nonexistent/gta5",
                          str(tmp_path / "list.txt")],
        "synthetic": [sys.executable, "-m", "cag.data.synthetic", "--out", str(tmp_path / "afile" / "bench"), "--quiet"],
        "bench": [sys.executable, "-m", "cag.bench", "--smoke", "--device", "cpu", "--only", "data_pipeline",
                  "--out", str(tmp_path / "afile" / "bench.json")],
    }
    named = {"make_lists.py": ["data error:", "/nonexistent/gta5"], "synthetic": ["output error:", "afile is a file"],
             "bench": ["output error:", str(tmp_path / "afile")]}
    for name, argv in runs.items():
        done = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
        assert_one_clear_line(done.returncode, done.stderr, *named[name])


def test_python_m_cag_prints_one_line_and_debug_adds_the_traceback(bench, tmp_path):
    config = config_file(bench, tmp_path, **{"data.source_root": "/nonexistent/gta5"})
    done = subprocess.run([sys.executable, "-m", "cag", "run", str(config)], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert_one_clear_line(done.returncode, done.stderr, "data error: GTA5 root /nonexistent/gta5 does not exist")
    debug = subprocess.run([sys.executable, "-m", "cag", "--debug", "run", str(config)], capture_output=True, text=True,
                           env=ENV, timeout=300)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "DataError" in debug.stderr
    env = subprocess.run([sys.executable, "-m", "cag", "run", str(config)], capture_output=True, text=True,
                         env={**ENV, "CAG_DEBUG": "1"}, timeout=300)
    assert env.returncode == 2 and "Traceback" in env.stderr


def test_a_genuine_bug_still_shows_its_traceback(bench, tmp_path, monkeypatch):
    """Not the user's fault: no message replaces Python's traceback (no blanket ``except``)."""
    import cag.pipeline

    def broken(self, until=None):
        return {}["a key the pipeline itself forgot"]

    monkeypatch.setattr(cag.pipeline.Pipeline, "run", broken)
    with pytest.raises(KeyError, match="a key the pipeline itself forgot"):
        cli.main(["run", str(config_file(bench, tmp_path))])
    script = ("import cag.pipeline, sys\n"
              "cag.pipeline.Pipeline.run = lambda self, until=None: 1 / 0\n"
              "from cag.cli import main\n"
              f"sys.exit(main(['run', {str(config_file(bench, tmp_path))!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == errors.EXIT_BUG
    assert "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr


def test_sigterm_during_training_exits_130_and_the_rerun_resumes(bench, tmp_path):
    params = {**tiny_params(bench, tmp_path / "runs"), "source_only.iters": 400, "train.checkpoint_interval": 2,
              "train.val_interval": 1000}
    config = write_yaml(tmp_path / "run.yaml", params)
    stage = tmp_path / "runs" / "tiny" / "source_only"
    proc = subprocess.Popen([sys.executable, "-m", "cag", "run", str(config), "--until", "source_only"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    while not (stage / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert_one_clear_line(proc.returncode, err, "interrupted", "resume", code=errors.EXIT_INTERRUPTED)
    stopped_at = load_iter(stage / "last.pt")
    assert 2 <= stopped_at < 400 and not (stage / "done.json").exists()
    rerun = subprocess.run([sys.executable, "-m", "cag", "run", str(config), "quiet=false", "--until", "source_only"],
                           capture_output=True, text=True, env=ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming at iteration {stopped_at}" in rerun.stdout
    assert json.loads((stage / "done.json").read_text())["iters"] == 400


def test_a_chapter_with_a_wrong_configuration_fails_in_its_first_cag_cell_with_one_line(tmp_path):
    from cag.book import execute

    chapter = ROOT / "book" / "01_data.ipynb"
    with pytest.raises(errors.UserInputError) as failure:
        execute(chapter, tmp_path / chapter.name, {"overrides": {"cag.detla_d": 2.0}}, cwd=ROOT)
    import nbformat

    failed = nbformat.read(tmp_path / "01_data.failed.ipynb", as_version=4)
    ran = [c for c in failed.cells if c.cell_type == "code" and c.execution_count is not None]
    first_cag = next(c for c in failed.cells if c.cell_type == "code" and "cag" in c.source
                     and "parameters" not in c.metadata.get("tags", []) and "injected-parameters" not in c.metadata.get("tags", []))
    assert ran[-1] is first_cag and "book_config" in first_cag.source  # it stopped at the first cell calling cag
    assert str(failure.value).startswith(f"chapter 01_data.ipynb failed at cell [{first_cag.execution_count}]: "
                                         "ConfigError: unknown key 'cag.detla_d'")
    (error,) = [o for o in first_cag.outputs if o.output_type == "error"]
    assert len(error.traceback) == 1 and "Traceback" not in error.traceback[0]
    assert error.traceback[0].startswith("configuration error: unknown key 'cag.detla_d'")
    assert "did you mean 'cag.delta_d'" in error.traceback[0]


def test_python_m_cag_book_names_the_failed_chapter_without_the_kernel_traceback(tmp_path):
    config = ROOT / "configs" / "synthetic.yaml"
    done = subprocess.run([sys.executable, "-m", "cag.book", "paper-run", str(config), "--stage", "source_only",
                           "--profile", "ci", "--out", str(tmp_path / "book"), f"out_dir={tmp_path / 'runs'}",
                           "data.synthetic.root=null", "data.source_root=/nonexistent/gta5"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert_one_clear_line(done.returncode, done.stderr, "chapter error: chapter 01_data.ipynb failed at cell",
                          "DataError", "/nonexistent/gta5")


def test_under_torchrun_a_bad_input_ends_every_rank_with_one_message(bench, tmp_path):
    """Two gloo ranks on CPU: the data check fails the same way on both; rank 0 alone says so,
    both exit (no rank is left waiting in a collective)."""
    config = config_file(bench, tmp_path, **{"data.source_root": "/nonexistent/gta5"})
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                           "-m", "cag", "run", str(config)], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("data error: GTA5 root /nonexistent/gta5 does not exist") == 1, done.stderr
    assert "[rank" not in done.stderr
