"""Checkpoints: atomic plain saves, safe loads, and the authors' released CAG-UDA format."""
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import cag.checkpoint
from cag.checkpoint import (CheckpointError, load_cag_uda_checkpoint, load_checkpoint,
                            save_checkpoint)
from cag.models import DeepLabV3Plus


def shared_reference() -> Path:
    return Path(os.environ.get("CAG_SHARED_REFERENCE",
                               Path(__file__).resolve().parents[2] / "shared" / "reference"))


def artifact(name) -> Path:
    path = shared_reference() / "original-artifacts" / name
    if not path.is_file():
        pytest.skip(f"original artifact not available: {path}")
    return path


def released(model_state):
    """A checkpoint in the released layout (the one ``test.py:62`` of the release reads)."""
    return {"DeepLab": {"model_state": model_state, "optimizer_state": {"state": {}, "param_groups": []},
                        "scheduler_state": {"last_epoch": 3}},
            "iter": 4000, "best_iou": np.float64(0.4321)}


def torch_save(obj, path, legacy=False):
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return DeepLabV3Plus(3, backbone="tiny", feature_dim=16).eval()


# --- save_checkpoint / load_checkpoint -----------------------------------------------------------

def test_round_trip_of_plain_objects(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "iter": 7, "best_iou": 0.5, "name": "stage1",
           "history": [1.0, 2.5], "shape": (2, 3), "note": None, "ok": True}
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, obj)
    back = load_checkpoint(path)
    assert torch.equal(back.pop("model")["w"], obj.pop("model")["w"])
    assert back == obj
    assert os.listdir(path.parent) == ["last.pt"]


@pytest.mark.parametrize("bad, where", [
    ({"a": [1, np.zeros(2)]}, r"\['a'\]\[1\]: ndarray"),
    ({"a": {1, 2}}, r"\['a'\]: set"),
    ({"f": print}, r"\['f'\]: builtin_function_or_method"),
])
def test_save_refuses_objects_that_could_not_be_loaded_safely(tmp_path, bad, where):
    with pytest.raises(TypeError, match=where):
        save_checkpoint(tmp_path / "x.pt", bad)
    assert os.listdir(tmp_path) == []


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"iter": 1})

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(cag.checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"iter": 2})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"iter": 1}
    assert os.listdir(tmp_path) == ["last.pt"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_truncated_file_fails_naming_it(tmp_path, legacy, keep):
    raw = (torch_save({"w": torch.randn(64, 64), "iter": 3}, tmp_path / "full.pt", legacy)).read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(CheckpointError, match="cut.pt.*(truncated|corrupt)"):
        load_checkpoint(path)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["zip", "legacy", "raw pickle"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model_state": Payload(marker)}
    if writer == "raw pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch_save(payload, path, legacy=writer == "legacy")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert "execute arbitrary code" in str(err.value)
    assert "system" in str(err.value)
    with pytest.raises(CheckpointError):
        load_cag_uda_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_numpy_numbers_and_arrays_load(tmp_path, legacy):
    path = torch_save({"best_iou": np.float64(0.5), "counts": np.arange(3.0), "n": np.int64(7)},
                      tmp_path / "np.pt", legacy)
    back = load_checkpoint(path)
    assert back["best_iou"] == 0.5 and back["n"] == 7 and back["counts"].tolist() == [0.0, 1.0, 2.0]


def test_numpy_1_names_load(tmp_path):
    """Files written with numpy 1.x (like the authors') spell the module ``numpy.core``."""
    raw = torch_save({"best_iou": np.float64(0.25)}, tmp_path / "np2.pt", legacy=True).read_bytes()
    assert b"numpy._core.multiarray\nscalar" in raw
    path = tmp_path / "np1.pt"
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert load_checkpoint(path)["best_iou"] == 0.25


def test_numpy_object_arrays_are_refused(tmp_path):
    path = torch_save({"a": np.array([1, "x"], dtype=object)}, tmp_path / "obj.pt", legacy=True)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def test_authors_category_anchors_load_safely():
    """The shipped anchors: legacy torch 0.4 pickle of numpy-1 float64 arrays (README counts)."""
    anchors = load_checkpoint(artifact("category_anchors"))
    assert anchors["objective_vectors"].shape == (19, 256)
    assert anchors["objective_num"].tolist() == [3000, 3000, 3000, 3000, 1512, 3000, 3000, 2212, 3000,
                                                 3000, 3000, 2906, 546, 3000, 3000, 499, 125, 535, 80]


# --- load_cag_uda_checkpoint -----------------------------------------------------------------------

def random_state(shapes: dict, seed=0) -> dict:
    """Random tensors for a key layout; BN variances positive, conv weights at Kaiming scale."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(123)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) == 4 else 100
            state[key] = torch.randn(shape, generator=generator) * math.sqrt(2 / fan_in)
    return state


def test_released_r101_layout_loads_strictly_and_computes_the_same_function(tmp_path):
    shapes = json.loads(artifact("deeplab_v3plus_state_dict_keys.json").read_text())
    state = random_state(shapes)
    path = torch_save(released(state), tmp_path / "warmup.pkl", legacy=True)
    loaded = load_cag_uda_checkpoint(path)
    assert loaded.keys() == shapes.keys()
    from_file = DeepLabV3Plus(19)
    from_file.load_state_dict(loaded, strict=True)
    for key, tensor in from_file.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    direct = DeepLabV3Plus(19)
    direct.load_state_dict(state, strict=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(from_file.eval()(x), direct.eval()(x)):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("prefix", ["", "module."])
@pytest.mark.parametrize("layout", ["released", "bare"])
def test_tiny_released_checkpoint_round_trip(tmp_path, tiny, prefix, layout):
    state = {prefix + k: v for k, v in tiny.state_dict().items()}
    content = released(state) if layout == "released" else state
    path = torch_save(content, tmp_path / "ckpt.pkl", legacy=True)
    loaded = load_cag_uda_checkpoint(path, model=tiny)
    other = DeepLabV3Plus(3, backbone="tiny", feature_dim=16).eval()
    other.load_state_dict(loaded, strict=True)
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(other(x)[1], tiny(x)[1])


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path, tiny):
    state = dict(tiny.state_dict())
    del state["decoder.conv1.weight"], state["aspp.bn1.running_mean"]
    state["aspp.extra.weight"] = torch.zeros(1)
    state["decoder.last_conv.8.weight"] = torch.zeros(19, 16, 1, 1)
    path = torch_save(released(state), tmp_path / "wrong.pkl")
    with pytest.raises(CheckpointError) as err:
        load_cag_uda_checkpoint(path, model=tiny)
    message = str(err.value)
    assert "wrong.pkl" in message
    assert "2 missing keys: aspp.bn1.running_mean, decoder.conv1.weight" in message
    assert "1 unexpected keys: aspp.extra.weight" in message
    assert "decoder.last_conv.8.weight (file [19, 16, 1, 1], model [3, 16, 1, 1])" in message


def test_default_reference_is_the_released_r101(tmp_path, tiny):
    path = torch_save(released(tiny.state_dict()), tmp_path / "tiny.pkl")
    with pytest.raises(CheckpointError) as err:
        load_cag_uda_checkpoint(path)
    message = str(err.value)
    assert "missing keys: backbone.layer1.0.conv3.weight" in message
    assert "backbone.conv1.weight (file [16, 3, 7, 7], model [64, 3, 7, 7])" in message
    assert "more)" in message


@pytest.mark.parametrize("content, expected", [
    ({"model": {"w": torch.zeros(1)}, "iter": 3}, r"not a CAG-UDA checkpoint.*\['model', 'iter'\]"),
    ({"DeepLab": {"optimizer_state": {}}},
     r"\['DeepLab'\] should hold a 'model_state'.*\['optimizer_state'\]"),
    ([torch.zeros(1)], "not a CAG-UDA checkpoint.*found list"),
])
def test_other_structures_are_refused(tmp_path, content, expected):
    path = torch_save(content, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=expected):
        load_cag_uda_checkpoint(path)


def test_an_interrupt_during_a_checkpoint_write_arrives_after_it(tmp_path):
    """SIGTERM sent to another thread of the process (the kernel may hand a process-directed
    signal to any thread, e.g. a progress bar's) while ``save_checkpoint`` writes: the write
    finishes, the file is whole, and the interrupt is raised afterwards."""
    import signal
    import threading

    from cag import checkpoint as ckpt

    def to_interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, to_interrupt)
    stop = threading.Event()
    bystander = threading.Thread(target=stop.wait, daemon=True)
    bystander.start()
    writes = []
    real_write = ckpt._write_atomically

    def write_with_a_signal(path, obj):  # the signal lands in the middle of the write
        signal.pthread_kill(bystander.ident, signal.SIGTERM)
        for _ in range(10_000):  # bytecode boundaries at which Python would run a handler
            pass
        real_write(path, obj)
        writes.append(path)

    try:
        ckpt._write_atomically = write_with_a_signal
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(tmp_path / "last.pt", {"iteration": 3, "weights": torch.ones(4)})
        assert signal.getsignal(signal.SIGTERM) is to_interrupt  # save_checkpoint put the handler back
    finally:
        ckpt._write_atomically = real_write
        signal.signal(signal.SIGTERM, previous)
        stop.set()
    assert writes == [tmp_path / "last.pt"]
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["iteration"] == 3
