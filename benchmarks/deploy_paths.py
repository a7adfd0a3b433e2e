"""Latency of each way to deploy one trained checkpoint: eager, torch.export, ONNX Runtime, the engine file.

Batch 1, one thread, validation images of an image folder cycled; all paths timed side by
side (:func:`ftwt.bench.time_calls`), and each one's outputs compared with the gated eager
model's. ONNX needs ``pip install -e ".[onnx]"``; without it that row is left out.

    python benchmarks/deploy_paths.py --checkpoint runs/sweep_dev/out/runs/ftwt-r0.8/best.pt \\
        --data-dir data/cifar10_dev --out-dir /tmp/deploy
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
from pathlib import Path

import torch

import ftwt
from ftwt.bench import describe_machine, kernel_summary, machine_info, time_calls
from ftwt.data import DataConfig, build_datasets
from ftwt.surgery import detach_gates


def _cycle(fn, xs):
    it = itertools.cycle(xs)
    return lambda: fn(next(it))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a training checkpoint of a gated model")
    p.add_argument("--data-dir", required=True, help="image folder with val/CLASS/*.jpg")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--out-dir", default="/tmp/ftwt_deploy", help="where the exported files go")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per path")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, val, _ = build_datasets(DataConfig(dataset="folder", data_dir=args.data_dir, image_size=args.image_size))
    step = max(1, len(val) // args.samples)  # spread over the classes (the folder is sorted by class)
    xs = [val[i][0][None] for i in range(0, step * args.samples, step)]
    model = ftwt.load_model(args.checkpoint)
    dense = detach_gates(copy.deepcopy(model))
    ftwt.export_model(model, xs[0], out / "model.pt2", fmt="torch")
    program = torch.export.load(str(out / "model.pt2")).module()
    engine = ftwt.SparseEngine(model, example=torch.cat(xs[:4]))
    engine.save(out / "engine.safetensors")
    loaded = ftwt.SparseEngine.load(out / "engine.safetensors")
    paths = {"dense eager (gates off)": dense, "gated eager (masks applied)": model,
             "torch.export .pt2 (masks applied, dense compute)": program, "SparseEngine.load": loaded}
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        import onnxruntime as ort

        ftwt.export_model(model, xs[0], out / "model.onnx", fmt="onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        paths[f"ONNX Runtime {ort.__version__} .onnx (masks applied, dense compute)"] = (
            lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0]))
    with torch.inference_mode():
        ref = torch.cat([model(x) for x in xs])
        diffs = {k: float((torch.cat([f(x) for x in xs]) - ref).abs().max() / ref.abs().max()) for k, f in paths.items()}
        ms = time_calls({k: _cycle(f, xs) for k, f in paths.items()}, threads=1, min_run_time=args.min_run_time)
    rep = ftwt.measure(model, xs)
    print(f"{describe_machine(machine_info())}; engine ISA {loaded.isa}, kernels {kernel_summary(loaded.choices)}; "
          f"honest FLOPs reduction {rep.reduction:.1%}; batch 1, one thread, {len(xs)} images")
    print("| path | ms per image | max relative diff vs gated eager |")
    print("|---|---|---|")
    for k in paths:
        print(f"| {k} | {ms[k]:.2f} | {'-' if k.startswith(('dense', 'gated')) else f'{diffs[k]:.1e}'} |")


if __name__ == "__main__":
    main()
