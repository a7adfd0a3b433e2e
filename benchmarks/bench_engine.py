"""Latency table of the sparse engine against dense, masked and static models.

For each model and mass threshold ``r``, replays the ground-truth masks at ``r`` (perfect
gates) on embedded digits samples resized to the model's input, and times the dense
model, the reference-style masked forward, :class:`ftwt.engine.SparseEngine` and a
Torch-Pruning static model of the same mean FLOPs (see ``benchmarks/README.md``). Dense and
static run as fast as plain PyTorch makes them (BatchNorm folded, the faster of NCHW and
channels-last: :func:`ftwt.bench.tuned`), named in the ``baselines`` column.

The engine runs with ``--kernel auto`` (each convolution timed every way it can run on the
first sample, the fastest kept), and an engine on PyTorch's ops only is timed beside it
(``auto/torch``: at most 1 plus noise, the check that the choice never loses). ``kernels``
counts the convolutions that chose each way; ``exec/honest`` is the multiply-adds the engine
executed (``FlopCounterMode``) over the honest count, above 1 where units run densely. The
native kernels are built for one vector ISA per process (``--isa``; default the best this
CPU runs), named in the table's header.

    python benchmarks/bench_engine.py --out benchmarks/results.md
    python benchmarks/bench_engine.py --isa x86-64      # the SSE build on an AVX2 machine
    python benchmarks/bench_engine.py --quick          # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ftwt.baselines import prune_to_macs
from ftwt.bench import benchmark, describe_machine, machine_info
from ftwt.cli._common import default_input_size
from ftwt.data import DataConfig, build_datasets
from ftwt.engine import _native
from ftwt.flops import measure
from ftwt.gate import GateConfig
from ftwt.record import record
from ftwt.surgery import attach_gates, detach_gates, set_threshold
from ftwt.train import load_model
from ftwt.train.runtime import resolve_device

DEFAULT_MODELS = "vgg16_bn,resnet56,torchvision:resnet18"
DEFAULT_THRESHOLDS = "1.0,0.95,0.9,0.85"
DEFAULT_THREADS = "1,2"
# The smoke run: small models and inputs, one threshold, barely any timing.
QUICK_MODELS = "resnet20,torchvision:resnet18@64"
QUICK_THRESHOLDS = "0.9"
QUICK_THREADS = "1"

log = logging.getLogger("bench_engine")

COLUMNS = ("model", "threads", "r", "FLOPs red.", "ideal", "dense ms", "masked ms", "engine ms", "static ms",
           "speedup", "realized/ideal", "engine/static", "engine/dense", "auto/torch", "kernels", "exec/honest", "baselines")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma-separated NAME or NAME@SIZE (input side); default {DEFAULT_MODELS}")
    p.add_argument("--thresholds", default=None, help=f"comma-separated mass thresholds r; default {DEFAULT_THRESHOLDS}")
    p.add_argument("--threads", default=None, help=f"comma-separated CPU thread counts; default {DEFAULT_THREADS}")
    p.add_argument("--init", action="append", default=[], metavar="NAME=CKPT",
                   help="trained dense weights for a model (repeatable); default: untrained weights")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--samples", type=int, default=None, help="digits samples to cycle over (default 16, quick 4)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per timing (default 1.0, quick 0.05)")
    # Ten turns: on a shared VM slow spells last seconds, and with three a spell could fall on one
    # variant's turn only; finer turns let it hit every variant of a row alike.
    p.add_argument("--rounds", type=int, default=10,
                   help="turns each variant takes while timing (more: steadier ratios on a noisy machine)")
    p.add_argument("--round-to", type=int, default=1, help="engine: round active channel counts to a multiple")
    p.add_argument("--kernel", default="auto", choices=("auto", "native", "torch"), help="engine kernels")
    p.add_argument("--isa", default=None, help="native kernel variant: avx512, avx2, x86-64, neon (default: the best here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained weights (masks depend on them)")
    p.add_argument("--quick", action="store_true", help="smoke run: small models, one threshold, short timings")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    return p


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _model_spec(spec: str) -> tuple[str, tuple[int, ...]]:
    name, _, size = spec.partition("@")
    shape = default_input_size(name)
    return name, (shape[0], int(size), int(size)) if size else shape


def _inputs(shape: tuple[int, ...], samples: int) -> torch.Tensor:
    _, val, _ = build_datasets(DataConfig(dataset="digits", image_size=shape[-1], val_subset=samples))
    return torch.stack([val[i][0] for i in range(len(val))])


def _row(name: str, r: float, res: dict[str, Any]) -> list[str]:
    return [
        name, str(res["threads"]), f"{r:g}", f"{res['flops_reduction']:.1%}", f"{res['ideal_speedup']:.2f}x",
        f"{res['dense_ms']:.2f}", f"{res['masked_ms']:.2f}", f"{res['engine_ms']:.2f}", f"{res['static_ms']:.2f}",
        f"{res['speedup']:.2f}x", f"{res['realized_fraction']:.0%}", f"{res['engine_vs_static']:.2f}",
        f"{res['engine_ms'] / res['dense_ms']:.2f}",
        f"{res['engine_ms'] / res['engine_torch_ms']:.2f}" if "engine_torch_ms" in res else "-",
        res["engine_kernels"], f"{res['engine_executed_macs'] / _honest(res):.2f}",
        _tricks(res["dense_tricks"], res["static_tricks"]),
    ]


def _tricks(dense: str, static: str) -> str:
    return dense if dense == static else f"dense {dense}; static {static}"


def _honest(res: dict[str, Any]) -> float:
    # FlopCounterMode does not count the gates' pooling, which the honest count includes;
    # below 1 only by that pooling.
    return res["dynamic_macs"]


def markdown(rows: list[list[str]], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    if args.isa:
        os.environ[_native.ISA_ENV] = args.isa  # read when the kernels are first built, below
    device = resolve_device(args.device)
    models = [_model_spec(s) for s in (args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)).split(",")]
    thresholds = _floats(args.thresholds or (QUICK_THRESHOLDS if args.quick else DEFAULT_THRESHOLDS))
    threads = [int(t) for t in _floats(args.threads or (QUICK_THREADS if args.quick else DEFAULT_THREADS))]
    samples = args.samples or (4 if args.quick else 16)
    min_run_time = args.min_run_time or (0.05 if args.quick else 1.0)
    inits = dict(item.split("=", 1) for item in args.init)

    rows = []
    for name, shape in models:
        inputs = _inputs(shape, samples)
        torch.manual_seed(args.seed)
        model = load_model(name, 10, inits.get(name))
        attach_gates(model, GateConfig(threshold=thresholds[0]))
        label = name if shape == default_input_size(name) else f"{name}@{shape[-1]}"
        for r in thresholds:
            set_threshold(model, r)
            # One static model per threshold, shared by the thread counts. Samples are
            # independent in eval mode, so one batch of all of them gives the timed mean.
            with record(model, masks="ground_truth"):
                dynamic = measure(model, [inputs[: len(inputs) // args.batch_size * args.batch_size]]).dynamic_macs
            static = prune_to_macs(detach_gates(copy.deepcopy(model)), inputs[:1], dynamic).model
            for t in threads:
                res = benchmark(
                    model, inputs, masks="ground_truth", batch_size=args.batch_size, threads=t, device=device,
                    round_to=args.round_to, min_run_time=min_run_time, warmup=1 if args.quick else 3,
                    static_model=static, kernel=args.kernel, compare_fallback=args.kernel == "auto",
                    rounds=args.rounds,
                )
                rows.append(_row(label, r, res))
                if res["engine_rel_diff"] > 1e-4:
                    log.warning("%s r=%g: engine logits differ from the masked model's by %.2g (relative)",
                                label, r, res["engine_rel_diff"])
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)  # progress; the table comes at the end

    info = machine_info(device)
    weights = "trained weights" if inits else "untrained weights"
    isa = _native.loaded_isa() or "none (PyTorch ops only)"
    header = (
        f"Machine: {describe_machine(info)}; native kernels: {isa} build (CPU's best: {_native.best_isa()}); "
        f"threads {','.join(map(str, threads))}; batch {args.batch_size}; "
        f"{device}; {datetime.date.today().isoformat()}. Ground-truth masks (perfect gates) on {samples} digits "
        f"samples, {weights}."
    )
    table = markdown(rows, header)
    sys.stdout.write(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
