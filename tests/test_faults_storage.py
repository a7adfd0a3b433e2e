"""Storage faults: an unwritable, vanished or full output folder is one line and exit 2, and the previous
checkpoint stays intact and loadable."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from ftwt.cli import main
from ftwt.train import load_trained

TINY = ["--model", "resnet20", "--dense", "--image-size", "8", "--train-subset", "64", "--val-subset", "32",
        "--batch-size", "16", "--workers", "0", "--no-progress", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("FTWT_FAULT_PAUSE", None)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_dir(tmp_path):
    """A finished one-epoch run, and its files' bytes."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out, _files(out)


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


def _one_line(text: str, needle: str) -> None:
    assert text.count("\n") == 1 and "Traceback" not in text and needle in text, text


def _intact(out, files: dict[str, bytes], changed: tuple[str, ...] = ()) -> None:
    """``last.pt`` is the one written before and loads; no temporary file is left."""
    now = _files(out)
    assert {k: v for k, v in now.items() if k not in changed} == {k: v for k, v in files.items() if k not in changed}
    assert load_trained(out / "last.pt")[1].epoch == 1
    assert not list(out.glob(".*.tmp"))


def test_output_folder_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")
    assert main(["train", *TINY, "--epochs", "1", "--out", str(blocker / "run")]) == 2
    _one_line(capsys.readouterr().err, "is a file, not a folder")
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_folder(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 2
        _one_line(capsys.readouterr().err, "not writable")
    finally:
        out.chmod(0o755)


def test_full_disk_during_the_checkpoint_write(run_dir, capsys, monkeypatch):
    out, files = run_dir

    def no_space(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "2", "--out", str(out)]) == 2
    monkeypatch.undo()
    _one_line(capsys.readouterr().err, f"cannot write {out / 'last.pt'}: No space left on device; the previous")
    _intact(out, files, changed=("metrics.jsonl", "config.yaml"))


def test_file_size_limit_in_a_real_process(run_dir):
    """RLIMIT_FSIZE makes the kernel refuse the checkpoint's bytes, as a full disk does."""
    out, files = run_dir

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run([sys.executable, "-m", "ftwt", "train", "--resume", str(out / "last.pt"), "--epochs", "2",
                           "--out", str(out)], capture_output=True, text=True, env=ENV, preexec_fn=limit, timeout=300)
    assert proc.returncode == 2, proc.stderr
    _one_line(proc.stderr, "File too large; the previous file is intact")
    _intact(out, files, changed=("metrics.jsonl", "config.yaml"))
    # the run resumes from that checkpoint once there is room again
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "2", "--out", str(out)]) == 0
    assert load_trained(out / "last.pt")[1].epoch == 2


def test_output_folder_that_vanishes_mid_run(tmp_path):
    out, moved = tmp_path / "run", tmp_path / "moved"
    env = dict(ENV, FTWT_FAULT_PAUSE="evaluate#2", FTWT_FAULT_PAUSE_SECONDS="3")
    proc = subprocess.Popen([sys.executable, "-m", "ftwt", "train", *TINY, "--epochs", "2", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 180
    while not (out / "last.pt").exists() or not (out / "metrics.jsonl").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)  # epoch 1's files are written; the run pauses as epoch 2's evaluation starts
    os.rename(out, moved)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert "vanished or was replaced" in last and "Traceback" not in err, err
    assert not out.exists()  # not silently recreated with half a run in it
    assert load_trained(moved / "last.pt")[1].epoch == 1


def test_any_os_error_is_one_line(capsys, monkeypatch):
    from ftwt.cli import train

    def denied(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/imagenet/train")

    monkeypatch.setattr(train, "run", denied)
    assert main(["train"]) == 2
    assert capsys.readouterr().err == "ftwt train: error: Permission denied: /data/imagenet/train\n"
