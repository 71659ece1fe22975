"""Saving and safely loading checkpoints, including the authors' released CAG-UDA files.

The release's ``adaptive_load_nets`` (``models/adaptation_model.py``, called at ``test.py:62``)
loaded only the keys that matched and silently ignored the rest, so a wrong or ``module.``-prefixed file left
random/ImageNet weights in place. Here every load is strict and reports the keys that differ.

Untrusted files never execute code: everything goes through ``torch.load(weights_only=True)``,
whose unpickler only builds tensors, containers, numbers and strings. The only extra globals
allowed are numpy's plain-data ones (arrays, scalars, dtypes), which the authors' files
contain (``category_anchors`` is a dict of float64 arrays; a numpy ``best_iou`` is likely in
the released checkpoints). The legacy non-zip format of torch 0.4 is read the same way.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import re
import struct
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .errors import OutputError, UserInputError

try:
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct, scalar

RELEASED_NET_KEY = "DeepLab"
SHOWN_KEYS = 5


class CheckpointError(UserInputError, ValueError):
    """A checkpoint file is refused, unreadable, or does not match the network."""

    kind = "checkpoint error"


def _numeric_dtype_classes() -> list[type]:
    codes = "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]
    return sorted({type(np.dtype(code)) for code in codes}, key=str)


# Numeric/bool arrays and scalars only (no object arrays). Files written with numpy 1.x name
# the functions ``numpy.core.multiarray.*``, numpy 2 ``numpy._core.multiarray.*``.
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
NUMPY_SAFE_GLOBALS = [
    *[(fn, f"{module}.{fn.__name__}") for fn in (_reconstruct, scalar) for module in _NUMPY_MODULES],
    np.ndarray, np.dtype, *_numeric_dtype_classes(),
]

_PLAIN_LEAVES = (int, float, bool, str, type(None))
_PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple, torch.Size)
_CORRUPT_ERRORS = (EOFError, OSError, RuntimeError, IndexError, KeyError, ValueError,
                   struct.error, pickle.UnpicklingError)


def check_plain(obj, where: str = "checkpoint") -> None:
    """Raise TypeError unless ``obj`` is tensors, dicts, lists, tuples, numbers and strings only.

    These are the objects ``torch.load(weights_only=True)`` rebuilds, so a file saved from them
    can always be loaded back safely.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_LEAVES:
        return
    if type(obj) not in _PLAIN_CONTAINERS:
        raise TypeError(f"{where}: {type(obj).__name__} is not a plain tensor, dict, list, "
                        "number or string, so it could not be loaded back with weights_only=True")
    if isinstance(obj, dict):
        for key, value in obj.items():
            check_plain(key, f"{where} key {key!r}")
            check_plain(value, f"{where}[{key!r}]")
    else:
        for index, value in enumerate(obj):
            check_plain(value, f"{where}[{index}]")


def save_checkpoint(path, obj) -> None:
    """Atomically ``torch.save`` a plain object (see ``check_plain``) to ``path``.

    Writes a temporary file in the same directory, flushes and fsyncs it, then ``os.replace``s
    it over ``path``: a crash leaves either the old file or the new one, never half of one.
    A failed write (a full disk) raises an OSError that names ``path``.
    """
    path = Path(path)
    check_plain(obj, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _interrupts_deferred():
        _write_atomically(path, obj)


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold Ctrl-C and SIGTERM until the block ends: an interrupt raised inside ``torch.save``'s
    zip writer surfaces as an unrelated RuntimeError; held, it arrives after the write.

    The Python-level handlers are swapped for one that only records the signal, then restored,
    and a recorded signal is handed to the handler that was in place. (Blocking the signals with
    a thread mask is not enough: the kernel hands a process-directed signal to any thread that
    does not block it, such as a progress-bar or data-loading thread, and Python then runs the
    handler in the main thread, inside the write.) Outside the main thread, where handlers
    cannot be changed, and for a handler installed outside Python, the block runs as it is.
    """
    received: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is None:  # installed outside Python: it could not be restored
            continue
        try:
            previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
        except (ValueError, OSError):  # not the main thread, or a signal Python may not handle
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            handler = previous.get(received[0])
            if callable(handler):
                handler(received[0], None)  # e.g. KeyboardInterrupt: the interrupt, after the write
            elif handler == signal.SIG_DFL:
                signal.raise_signal(received[0])


def _write_atomically(path: Path, obj) -> None:
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as tmp:
            torch.save(obj, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _write_error(path, err) from err
        raise


def _write_error(path: Path, err: OSError) -> OSError:
    message = f"cannot write {path}: {err.strerror or err}; the previous {path.name}, if any, is unchanged"
    return OutputError(err.errno, message) if err.errno is not None else OutputError(message)


def _refusal_reason(message: str) -> str:
    found = re.search(r"GLOBAL (\S+)|Unsupported operand \d+|Can only build[^\n]*", message)
    return found.group(0) if found else message.strip().splitlines()[-1]


def load_checkpoint(path, map_location="cpu"):
    """Load a ``torch.save`` file (zip or legacy format) without ever executing code from it.

    Raises FileNotFoundError for a missing file, and CheckpointError (naming the file) for a
    file that asks for anything beyond plain data, or that is truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({err})") from err
        raise CheckpointError(
            f"{path}: refused to load: it asks for {_refusal_reason(str(err))}, which is not "
            "plain tensor/number data; unpickling it could execute arbitrary code (or the file "
            "is truncated or corrupt)") from None
    except _CORRUPT_ERRORS as err:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({type(err).__name__}: {err})") from err


def _shown(keys: list[str]) -> str:
    more = f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def _shape(value) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def state_dict_mismatches(state_dict: Mapping, reference: Mapping) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of ``state_dict`` vs ``reference``.

    A missing BatchNorm ``num_batches_tracked`` counter is not reported: BatchNorm fills it in
    when loading files written before the counter existed (e.g. torchvision's ResNet weights).
    """
    missing = [k for k in reference if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in reference]
    wrong_shape = [
        f"{k} (file {_shape(v)}, model {_shape(reference[k])})"
        for k, v in state_dict.items()
        if k in reference and (not isinstance(v, torch.Tensor) or v.shape != reference[k].shape)
    ]
    return [f"{len(keys)} {what}: {_shown(keys)}" for what, keys in
            (("missing keys", missing), ("unexpected keys", unexpected),
             ("shape mismatches", wrong_shape)) if keys]


def check_state_dict(state_dict: Mapping, reference: Mapping, source) -> None:
    """Raise CheckpointError naming ``source`` unless ``state_dict`` matches ``reference`` strictly.

    Strict loading with an explicit key report, unlike the release's ``adaptive_load_nets``.
    """
    problems = state_dict_mismatches(state_dict, reference)
    if problems:
        raise CheckpointError(f"{source}: state dict does not match the network: "
                              + "; ".join(problems))


def strip_module_prefix(state_dict: Mapping) -> dict:
    """Remove the ``module.`` prefix that (Distributed)DataParallel adds, if every key has it."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _is_bare_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def released_model_state(ckpt, source) -> dict:
    """The model state dict inside a released CAG-UDA checkpoint (the layout ``test.py:62`` of the release reads).

    Accepts ``ckpt["DeepLab"]["model_state"]`` (the released format, next to
    ``optimizer_state``, ``scheduler_state``, ``iter`` and ``best_iou``) or a file that is
    nothing but a state dict (every value a tensor). Anything else is refused.
    """
    if isinstance(ckpt, dict) and RELEASED_NET_KEY in ckpt:
        net = ckpt[RELEASED_NET_KEY]
        if not isinstance(net, dict) or not _is_bare_state_dict(net.get("model_state")):
            found = list(net) if isinstance(net, dict) else type(net).__name__
            raise CheckpointError(f"{source}: ['{RELEASED_NET_KEY}'] should hold a 'model_state' "
                                  f"dict of tensors; found {found}")
        return net["model_state"]
    if _is_bare_state_dict(ckpt):
        return ckpt
    found = list(ckpt)[:SHOWN_KEYS] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise CheckpointError(f"{source}: not a CAG-UDA checkpoint: expected a dict with key "
                          f"'{RELEASED_NET_KEY}' or a bare state dict of tensors; found {found}")


def load_cag_uda_checkpoint(path, model: torch.nn.Module | None = None) -> dict:
    """Read an authors' released checkpoint into a state dict for ``DeepLabV3Plus(19)``.

    docs/method.md §8: the file is loaded safely (legacy torch 0.4 format
    included), a ``module.`` prefix is stripped, and the result is checked strictly against
    ``model``'s state dict (default: ``DeepLabV3Plus(19)``, R101, OS16), so that
    ``model.load_state_dict(sd, strict=True)`` accepts it. A mismatch raises CheckpointError
    naming the missing and unexpected keys and the shape mismatches.
    """
    state_dict = strip_module_prefix(released_model_state(load_checkpoint(path), path))
    if model is None:
        from .models import DeepLabV3Plus

        with torch.device("meta"):
            model = DeepLabV3Plus(num_classes=19)
    check_state_dict(state_dict, model.state_dict(), path)
    return state_dict
