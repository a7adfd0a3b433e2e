"""Tests for ftwt.checkpoint: atomic saves, safe loads and state-dict loading."""

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ftwt.checkpoint import load_checkpoint, load_state_dict_into, save_checkpoint
from ftwt.errors import CheckpointError


class _Payload:
    """Unpickling this runs ``exec``, which creates the file named in ``code``."""

    def __init__(self, sentinel: Path):
        self.code = f"open({str(sentinel)!r}, 'w').close()"

    def __reduce__(self):
        return (exec, (self.code,))


class _Custom:
    """An ordinary user class: not plain data."""

    value = 3


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def _trained_sgd(model: nn.Module) -> torch.optim.SGD:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(2, 3, 3, 3)).sum().backward()
    opt.step()  # creates the momentum buffers
    return opt


def test_round_trip_nested_with_optimizer_and_rng(tmp_path):
    model = _net()
    opt = _trained_sgd(model)
    py_state = random.getstate()
    np_state = np.random.get_state()
    ckpt = {
        "epoch": 3,
        "best": 0.5,
        "name": "run",
        "note": None,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            # random.getstate() -> (version, tuple of ints, gauss): store the tuple as a list
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            # numpy's state holds an ndarray, which weights_only refuses: store it as a list
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        },
        "history": [{"loss": 1.0}, {"loss": 0.5}],
    }
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(ckpt, path)
    out = load_checkpoint(path)
    assert out["epoch"] == 3 and out["best"] == 0.5 and out["name"] == "run" and out["note"] is None
    assert out["history"] == ckpt["history"]
    for k, v in ckpt["model"].items():
        assert torch.equal(out["model"][k], v)
    opt2 = torch.optim.SGD(_net().parameters(), lr=1.0, momentum=0.0)
    opt2.load_state_dict(out["optimizer"])
    assert opt2.param_groups[0]["momentum"] == 0.9
    bufs = [s["momentum_buffer"] for s in opt2.state.values()]
    assert bufs and all(isinstance(b, torch.Tensor) for b in bufs)
    assert torch.equal(out["rng"]["torch"], ckpt["rng"]["torch"])
    py = out["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    assert random.getstate() == py_state
    npl = out["rng"]["numpy"]
    np.random.set_state((npl[0], np.array(npl[1], dtype=np.uint32), *npl[2:]))
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_save_refuses_non_plain_data_and_names_it(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(CheckpointError, match=r"\['rng'\]\['numpy'\].*ndarray"):
        save_checkpoint({"rng": {"numpy": np.zeros(3)}}, path)
    with pytest.raises(CheckpointError, match="float64"):
        save_checkpoint({"acc": np.float64(0.5)}, path)  # a float subclass, but not plain
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial data")  # as if killed half way through
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_corrupt_file(tmp_path, damage):
    path = tmp_path / "ckpt.pt"
    if damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(512))
    else:
        save_checkpoint({"w": torch.randn(1000)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    # control: the payload really runs code when unpickled the unsafe way
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": _Payload(sentinel)}))
    else:
        torch.save({"state_dict": _Payload(sentinel)}, path)
    with pytest.raises(CheckpointError, match="refused.*other than tensors and plain data"):
        load_checkpoint(path)
    assert not sentinel.exists()


def test_custom_class_is_refused(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"obj": _Custom()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def test_non_dict_checkpoint(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    model = _net()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    sd = load_checkpoint(path)
    assert set(sd) == set(model.state_dict())
    fresh = _net()
    load_state_dict_into(fresh, sd)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("layout", ["raw", "state_dict", "model", "net", "ddp", "ddp_wrapped"])
def test_load_state_dict_layouts(layout):
    src, dst = _net(), _net()
    sd = src.state_dict()
    if layout.startswith("ddp"):
        sd = {f"module.{k}": v for k, v in sd.items()}
    ckpt = {
        "raw": sd,
        "ddp": sd,
        "state_dict": {"state_dict": sd, "epoch": 1},
        "model": {"model": sd, "optimizer": {}},
        "net": {"net": sd},
        "ddp_wrapped": {"state_dict": sd},
    }[layout]
    assert load_state_dict_into(dst, ckpt) == ([], [])
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_shape_mismatch_names_key():
    sd = _net().state_dict()
    sd["3.weight"] = torch.zeros(5, 4)
    with pytest.raises(CheckpointError, match=r"1 shape mismatch.*3\.weight.*\(5, 4\).*\(2, 4\)"):
        load_state_dict_into(_net(), sd, strict=False)


def test_missing_and_unexpected_keys():
    sd = _net().state_dict()
    del sd["3.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): 3\.bias; 1 unexpected key\(s\): extra"):
        load_state_dict_into(_net(), sd)
    model = _net()
    bias = model[3].bias.detach().clone()
    assert load_state_dict_into(model, sd, strict=False) == (["3.bias"], ["extra.weight"])
    assert torch.equal(model[3].bias, bias)  # missing entries keep their values


def test_ignore_prefixes():
    sd = {k: v for k, v in _net().state_dict().items() if not k.startswith("1.")}
    with pytest.raises(CheckpointError, match="5 missing"):  # BatchNorm: 5 entries
        load_state_dict_into(_net(), sd)
    assert load_state_dict_into(_net(), sd, ignore_prefixes=["1."]) == ([], [])


def test_no_state_dict_found():
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_state_dict_into(_net(), {"epoch": 3, "name": "x"})


def test_ddp_prefix_kept_when_model_uses_it():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)

    src, dst = Wrapper(), Wrapper()
    load_state_dict_into(dst, src.state_dict())
    assert torch.equal(dst.module.weight, src.module.weight)


def test_save_has_no_leftovers_on_success(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"a": torch.ones(1)}, os.fspath(path))
    save_checkpoint({"a": torch.zeros(1)}, path)  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert torch.equal(load_checkpoint(path)["a"], torch.zeros(1))
