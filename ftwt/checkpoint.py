"""Safe, atomic checkpoints.

Checkpoints are written with :func:`torch.save` and read back with ``weights_only=True``, so
loading one never runs code from the file. That restricts what a checkpoint may hold to
tensors and plain data: ``dict``/``list``/``tuple``/``set`` of tensors, ``int``, ``float``,
``bool``, ``complex``, ``str``, ``bytes``, ``None``, ``torch.dtype``, ``torch.device`` and
``torch.Size``. Module and optimizer ``state_dict()`` results qualify, and so does
``torch.get_rng_state()`` (a ByteTensor). Convert the rest before saving: Python's
``random.getstate()`` to ``list`` (with its inner tuple as a list of ints), NumPy's
``np.random.get_state()`` with its ``ndarray`` turned into a list (``arr.tolist()``), and NumPy
scalars to Python numbers. :func:`save_checkpoint` checks this up front and names the
offending entry, instead of writing a file that cannot be loaded later.
"""

from __future__ import annotations

import collections
import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ftwt._io import atomic_write
from ftwt.errors import CheckpointError

PathLike = str | os.PathLike

# exact types (not isinstance): subclasses such as numpy.float64 pickle as foreign globals
_PLAIN = {type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size}
_MAPPINGS = {dict, collections.OrderedDict}
_SEQUENCES = {list, tuple, set, frozenset}
_WRAPPER_KEYS = ("state_dict", "model", "net")  # common layouts that nest the weights
_PARALLEL_PREFIXES = ("module.", "_orig_mod.")  # added by DDP/DataParallel and torch.compile
# opcodes that import a global or call one: what plain tensor-and-data pickles get refused for
_OBJECT_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


def _check_plain(obj: object, where: str = "checkpoint") -> None:
    """Raise CheckpointError if ``obj`` holds anything ``weights_only`` loading would refuse."""
    kind = type(obj)
    if isinstance(obj, torch.Tensor) or kind in _PLAIN:
        return
    if kind in _MAPPINGS:
        for key, value in obj.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(value, f"{where}[{key!r}]")
    elif kind in _SEQUENCES:
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    else:
        raise CheckpointError(
            f"cannot save {where}: {kind.__module__}.{kind.__qualname__} is not "
            "allowed; store only tensors and plain Python data"
        )


def _holds_objects(path: Path) -> bool:
    """True if ``path`` is a well-formed pickle (or torch zip) that imports or calls globals.

    ``pickletools.genops`` only decodes opcodes and never executes them, so this is safe on
    hostile files; it tells a refused-but-valid pickle apart from random or truncated bytes.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return False
                data = zf.read(name)
        else:
            data = path.read_bytes()
        return bool(_OBJECT_OPCODES & {op.name for op, _, _ in pickletools.genops(data)})
    except Exception:  # any decoding failure means the stream is damaged, not hostile
        return False


def save_checkpoint(obj: dict, path: PathLike) -> None:
    """Write ``obj`` to ``path`` atomically.

    The data goes to a temporary file in the same directory, is flushed and fsynced, then
    renamed over ``path`` with :func:`os.replace`; a crash mid-save leaves the previous file
    intact. Parent directories are created.

    Args:
        obj: Tensors and plain data only (see the module docstring).
        path: Destination file.

    Raises:
        CheckpointError: ``obj`` holds an object that ``weights_only`` loading would refuse.
    """
    _check_plain(obj)
    atomic_write(path, lambda f: torch.save(obj, f), durable=True)


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint without executing anything from the file.

    Args:
        path: A ``torch.save`` file, or a ``.safetensors`` file (returned as a flat dict).
        map_location: Device to put the tensors on.

    Returns:
        The saved dict.

    Raises:
        CheckpointError: The file is missing, corrupt, not a dict, or holds objects other
            than tensors and plain data (refused without running them).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # lazy: only needed for this format

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {e}") from e
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols on foreign files; the errors below say enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or _holds_objects(path):
            raise CheckpointError(
                f"refused to load {path}: it contains objects other than tensors and plain data, which could run code"
            ) from e
        raise CheckpointError(f"checkpoint {path} is corrupt: not a readable torch.save file") from e
    except Exception as e:  # a damaged file can fail in the zip reader, unpickler or storage
        detail = (str(e).split(". ")[0].splitlines() or [""])[0]  # first sentence only
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(e).__name__}: {detail}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def _extract_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Find the weights in a raw state dict or one wrapped under a common key."""
    sd = checkpoint
    for _ in range(3):  # wrappers are rarely nested more than once or twice
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"no state dict found in checkpoint (top-level keys: {list(checkpoint)[:8]})")
    return dict(sd)


def _strip_prefixes(sd: dict, model_keys: Iterable[str]) -> dict:
    """Drop DDP/compile prefixes from checkpoint keys unless the model itself uses them."""
    model_keys = list(model_keys)
    for prefix in _PARALLEL_PREFIXES:
        if any(k.startswith(prefix) for k in model_keys):
            continue
        sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd


def _some(keys: list[str], n: int = 3) -> str:
    """``'a, b, c, ...'``: the first ``n`` keys for a one-line message."""
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _optional_keys(model: nn.Module) -> set[str]:
    """State entries that modules list in ``optional_state`` (added after older checkpoints were written)."""
    return {f"{name}.{key}" if name else key for name, m in model.named_modules()
            for key in getattr(m, "optional_state", ())}


def load_state_dict_into(
    model: nn.Module, state_dict: Mapping, strict: bool = True, ignore_prefixes: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """Load weights from a checkpoint dict into ``model``.

    Accepts a raw state dict or a dict holding one under ``state_dict``, ``model`` or ``net``,
    and strips the ``module.`` prefix DDP adds (and ``_orig_mod.`` from ``torch.compile``).

    Args:
        model: Module to load into.
        state_dict: Checkpoint or state dict.
        strict: Raise on missing or unexpected keys.
        ignore_prefixes: Model keys starting with one of these may be missing (for example
            gate parameters, ``"ftwt_gates."``); they keep their current values. So may the
            entries a module lists in ``optional_state`` (gated units' decisions).

    Returns:
        ``(missing, unexpected)`` keys; ``missing`` leaves out the ignored prefixes. Both are
        empty when ``strict`` is true.

    Raises:
        CheckpointError: A tensor's shape differs from the model's, or (strict) keys are
            missing or unexpected; the message names a few keys and gives counts.
    """
    model_sd = model.state_dict()
    sd = _strip_prefixes(_extract_state_dict(state_dict), model_sd)
    ignore = tuple(ignore_prefixes)
    optional = _optional_keys(model)
    missing = [k for k in model_sd if k not in sd and k not in optional and not (ignore and k.startswith(ignore))]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(model_sd[k].shape)})"
        for k, v in sd.items()
        if k in model_sd
        and isinstance(v, torch.Tensor)
        and isinstance(model_sd[k], torch.Tensor)
        and v.shape != model_sd[k].shape
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint does not fit the model: {len(mismatched)} shape mismatch(es): {_some(mismatched, 2)}"
        )
    if strict and (missing or unexpected):
        parts = [
            f"{len(missing)} missing key(s): {_some(missing)}" if missing else "",
            f"{len(unexpected)} unexpected key(s): {_some(unexpected)}" if unexpected else "",
        ]
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(p for p in parts if p))
    try:
        model.load_state_dict({k: v for k, v in sd.items() if k in model_sd}, strict=False)
    except RuntimeError as e:  # e.g. a custom _load_from_state_dict rejecting a value
        raise CheckpointError(f"checkpoint does not fit the model: {str(e).splitlines()[0]}") from e
    return missing, unexpected
