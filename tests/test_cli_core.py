"""``ftwt flops`` and ``ftwt estimate`` as users script them."""

import json

import pytest
import torch

from ftwt import get_model
from ftwt.checkpoint import save_checkpoint
from ftwt.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_flops_json(capsys):
    code, out, _ = run(capsys, "flops", "--model", "resnet56", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["dense_macs"] == 125485696
    assert data["params"] == sum(p.numel() for p in get_model("resnet56").parameters())


def test_flops_torchvision_and_input_size(capsys):
    code, out, _ = run(capsys, "flops", "--model", "torchvision:resnet18", "--input-size", "3", "64", "64", "--json")
    assert code == 0
    assert json.loads(out)["dense_macs"] == 148557824


def test_estimate_json_and_target(capsys, tmp_path):
    ckpt = tmp_path / "dense.pt"
    save_checkpoint({"state_dict": get_model("resnet20").state_dict()}, ckpt)
    code, out, _ = run(capsys, "estimate", "--model", "resnet20", "--mass", "0.8", "--init", str(ckpt),
                       "--samples", "32", "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("dense_macs", "estimated_macs", "estimated_reduction", "per_layer"):
        assert key in data
    assert 0 < data["estimated_reduction"] < 1
    assert data["estimated_macs"] < data["dense_macs"]
    assert {"name", "kept"} <= set(data["per_layer"][0])
    assert len(data["per_layer"]) == 19

    code, out, _ = run(capsys, "estimate", "--model", "resnet20", "--init", str(ckpt), "--samples", "32",
                       "--target-reduction", "0.3", "--json")
    assert code == 0
    data = json.loads(out)
    assert 0 < data["mass"] < 1 and data["estimated_reduction"] >= 0.3


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["flops", "--model", "resnet9000"], "unknown model"),
        (["estimate", "--model", "nope", "--mass", "0.9"], "unknown model"),
        (["estimate", "--model", "resnet20", "--mass", "1.5"], "(0, 1]"),
        (["estimate", "--model", "resnet20", "--mass", "0"], "(0, 1]"),
        (["estimate", "--model", "resnet20", "--mass", "0.9", "--init", "missing.pt"], "not found"),
        (["estimate", "--model", "resnet20", "--mass", "0.9", "--dataset", "imagenet21k"], "imagenet21k"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) if "(0, 1]" in needle else _nothing() as raised:
        code = main(argv)
    code = raised.value.code if raised else code
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()]
    assert last[-1].startswith("ftwt") or "usage" in err


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_checkpoint_of_another_model_is_refused(capsys, tmp_path):
    ckpt = tmp_path / "other.pt"
    save_checkpoint(get_model("resnet20").state_dict(), ckpt)
    code, _, err = run(capsys, "estimate", "--model", "resnet56", "--mass", "0.9", "--init", str(ckpt))
    assert code == 2
    assert "does not fit" in err or "missing" in err
    assert err.count("\n") == 1 + err.count("no --init")  # one error line


def test_console_script_exit_status(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ftwt", "flops", "--model", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown model" in proc.stderr
    torch.manual_seed(0)


def test_errors_from_loader_workers_print_one_line(capsys, monkeypatch):
    from ftwt.cli import estimate
    from ftwt.errors import DataError

    def fail(args):
        # What a DataLoader worker re-raises: the original traceback inside the message.
        raise DataError(
            "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\nftwt.errors.DataError: cannot read image /data/val/cat/1.jpg'
        )

    monkeypatch.setattr(estimate, "run", fail)
    code, _, err = run(capsys, "estimate", "--model", "resnet20", "--mass", "0.9")
    assert code == 2
    assert err == "ftwt estimate: error: cannot read image /data/val/cat/1.jpg\n"
