"""Fault injection: real ``ftwt train`` processes killed with SIGKILL at random points, then resumed.

The kills land after a training step, as validation starts, inside the write of ``last.pt``
(``FTWT_FAULT_PAUSE``, see ``ftwt/_faults.py``) and at a random moment; the resumed run
must end bit for bit where an uninterrupted one ends (CPU, one thread). Set
``FTWT_FAULT_SEED`` to replay other random points.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftwt.checkpoint import load_checkpoint
from ftwt.train import Checkpoint, TrainConfig, Trainer

STEPS, EPOCHS = 8, 3  # 128 samples in batches of 16
ARGS = ["--model", "resnet20", "--image-size", "8", "--train-subset", "128", "--val-subset", "32", "--batch-size",
        "16", "--workers", "0", "--no-progress", "--device", "cpu", "--epochs", str(EPOCHS), "--save-every", "2",
        "--calibrate", "--calibrate-batches", "2", "--seed", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("FTWT_FAULT_PAUSE", None)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense_init(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("dense")
    Trainer(TrainConfig(model="resnet20", image_size=8, train_subset=96, val_subset=32, batch_size=16, workers=0,
                        progress=False, device="cpu", dense=True, epochs=1, out_dir=str(out))).fit()
    return str(out / "last.pt")


def _start(out: Path, init: str, log: Path, pause: str | None = None, resume: bool = False,
           extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = dict(ENV, **({"FTWT_FAULT_PAUSE": pause} if pause else {}))
    cmd = [sys.executable, "-m", "ftwt", "train", *ARGS, "--init", init, "--out", str(out), *extra]
    if resume:
        cmd += ["--resume", str(out / "last.pt")]
    with open(log, "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 180.0) -> bool:
    """Poll until ``ready()``; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return bool(ready())
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the run neither paused nor ended")


def _paused(log: Path):
    return lambda: "fault pause at" in log.read_text()


def _locked_by(folder: Path, proc: subprocess.Popen):
    lock = folder / ".lock"
    return lambda: lock.is_file() and lock.read_text().strip() == str(proc.pid)


def _kill(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def _position(out: Path) -> tuple[int, int]:
    """(epochs, steps) done according to ``last.pt``, which must load; (0, 0) before the first one."""
    if not (out / "last.pt").exists():
        return 0, 0
    ckpt = Checkpoint.load(out / "last.pt")
    return int(ckpt.epoch), int(ckpt.step)


def _same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k != "time"} for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, dense_init):
    seed = int(os.environ.get("FTWT_FAULT_SEED", "13"))
    rng = random.Random(seed)
    plain, faulty = tmp_path / "plain", tmp_path / "faulty"
    reference = _start(plain, dense_init, tmp_path / "plain.err")  # runs alongside the faulty one

    kinds = ["timer", "step", "write:last.pt", "evaluate", "step", "write:last.pt"]
    kills, mid_epoch_resumes, write_kills = 0, 0, 0
    for round_, kind in enumerate(kinds):
        epochs, steps = _position(faulty)
        mid_epoch_resumes += steps > 0
        left = (EPOCHS - epochs) * STEPS - steps
        if left <= 2:
            break
        log = tmp_path / f"round{round_}.err"
        if kind == "timer":
            proc = _start(faulty, dense_init, log, resume=epochs + steps > 0)
            started = _wait_for(proc, _locked_by(faulty, proc))  # past start-up: training
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            nth = {"step": rng.randint(1, min(5, left - 1)), "evaluate": 1, "write:last.pt": rng.randint(1, 2)}[kind]
            proc = _start(faulty, dense_init, log, pause=f"{kind}#{nth}", resume=epochs + steps > 0)
            started = _wait_for(proc, _paused(log))
        assert started, log.read_text()
        if proc.poll() is not None:  # finished before the timer ran out
            assert proc.returncode == 0, log.read_text()
            break
        assert _kill(proc) == -signal.SIGKILL
        kills += 1
        if kind.startswith("write:"):
            assert list(faulty.glob(".last.pt.*.tmp")), "the kill did not land inside the write"
            write_kills += 1
        _position(faulty)  # what the kill left behind loads
    final = _start(faulty, dense_init, tmp_path / "final.err", resume=True)
    assert final.wait() == 0, (tmp_path / "final.err").read_text()
    assert reference.wait() == 0, (tmp_path / "plain.err").read_text()

    assert kills >= 5 and write_kills >= 1 and mid_epoch_resumes >= 1, (seed, kills, write_kills, mid_epoch_resumes)
    assert not list(faulty.glob(".*.tmp"))  # the resumed run removed what the killed writer left
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(plain / name), load_checkpoint(faulty / name)
        a["config"].pop("out_dir"), b["config"].pop("out_dir")
        _same(a, b, f"{name} (FTWT_FAULT_SEED={seed})")
    assert _metrics(plain) == _metrics(faulty)
    report = [json.loads((d / "report.json").read_text()) for d in (plain, faulty)]
    assert report[0] == report[1]
    assert len(_metrics(faulty)) == EPOCHS and _position(faulty) == (EPOCHS, 0)


def test_second_run_on_a_live_folder_is_refused_and_a_killed_one_frees_it(tmp_path, dense_init, capsys):
    from ftwt.cli import main

    out = tmp_path / "run"
    live = _start(out, dense_init, tmp_path / "live.err", pause="step#1")
    assert _wait_for(live, _paused(tmp_path / "live.err"))
    tiny = [*ARGS, "--epochs", "1", "--save-every", "100", "--init", dense_init, "--out", str(out)]
    for argv in (["train", *tiny], ["train", *tiny, "--overwrite"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"in use by a running ftwt train (pid {live.pid})" in err, err
    assert _kill(live) == -signal.SIGKILL
    # the kernel dropped the dead run's lock: the folder is free again at once
    assert main(["train", *tiny]) == 0
    assert _position(out) == (1, 0)


class _Crash(Exception):
    pass


def test_mid_epoch_resume_with_loader_workers_is_exact(tmp_path):
    """Worker processes draw their own augmentation: the resume replays them to the saved step."""
    base = dict(model="resnet20", dense=True, image_size=8, train_subset=64, val_subset=16, batch_size=16, workers=2,
                progress=False, device="cpu", epochs=2, save_every=2)
    full = Trainer(TrainConfig(**base, out_dir=str(tmp_path / "full")))
    full.fit()
    part = Trainer(TrainConfig(**base, out_dir=str(tmp_path / "part")))
    save = part.save_position

    def save_then_crash(epoch, step, sums):
        save(epoch, step, sums)
        if epoch == 1:
            raise _Crash

    part.save_position = save_then_crash
    with pytest.raises(_Crash):
        part.fit()
    resumed = Trainer.resume(str(tmp_path / "part" / "last.pt"))
    assert (resumed.start_epoch, resumed._position.step) == (1, 2)
    resumed.fit()
    _same(full.model.state_dict(), resumed.model.state_dict(), "model")
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "part")
