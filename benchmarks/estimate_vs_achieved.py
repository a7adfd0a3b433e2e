"""Estimate vs achieved: does the budget known before training hold after training?

Trains a dense ResNet-20 on the embedded digits once, then FTWT gates from it in four
variants: the reference behaviour (BCE, decision 0.5), a class-balanced mask loss,
calibrated decisions, and both. For each it prints the FLOPs reduction estimated before
training (perfect gates), the one achieved, the share of filters the gates keep next to
their labels', top-1 and how many gate decisions vary between images. A static model of
the achieved FLOPs (Torch-Pruning, uniform ratio) fine-tuned for the same epochs is the
yardstick. CPU, one thread, about 3 minutes; no download.

    python benchmarks/estimate_vs_achieved.py [--mass 0.85] [--out runs/gap]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ftwt.baselines import finetune, static_pruned
from ftwt.bench import describe_machine, machine_info
from ftwt.data import DataConfig, build_loaders
from ftwt.evaluate import evaluate
from ftwt.flops import measure
from ftwt.train import TrainConfig, Trainer, load_trained

VARIANTS = {
    "reference (BCE, decision 0.5)": dict(balance_loss=False, calibrate=False),
    "class-balanced loss": dict(balance_loss=True, calibrate=False),
    "calibrated decisions": dict(balance_loss=False, calibrate=True),
    "balanced + calibrated": dict(balance_loss=True, calibrate=True),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--mass", type=float, default=0.85)
    p.add_argument("--dense-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=4, help="FTWT epochs (gates freeze at half)")
    p.add_argument("--out", default="runs/gap")
    p.add_argument("--seed", type=int, default=0)
    return p


def _static_top1(model, epochs: int, seed: int) -> float:
    """Fine-tune a statically pruned model as the FTWT backbone is, return its top-1."""
    torch.manual_seed(seed)
    train, val, _ = build_loaders(DataConfig(dataset="digits", batch_size=64, workers=0))
    return evaluate(finetune(model, train, epochs), val, torch.device("cpu"))["top1"]


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    out = Path(args.out)
    common = dict(model=args.model, dataset="digits", batch_size=64, workers=0, seed=args.seed, device="cpu",
                  overwrite=True, progress=False)
    start = time.time()
    dense = Trainer(TrainConfig(dense=True, epochs=args.dense_epochs, out_dir=str(out / "dense"), **common)).fit()
    rows = []
    for name, extra in VARIANTS.items():
        run = Trainer(TrainConfig(init=str(out / "dense" / "last.pt"), threshold=args.mass, epochs=args.epochs,
                                  calibrate_batches=8, out_dir=str(out / name.split()[0]), **common, **extra)).fit()
        rows.append((name, run))
    dense_model, _ = load_trained(out / "dense" / "last.pt")
    static = {}  # variant -> (reduction, top-1) of a static model of that variant's achieved MACs
    for name, run in rows:
        model = static_pruned(dense_model, torch.randn(1, 3, 16, 16), run["dynamic_macs"])
        reduction = 1 - measure(model, [torch.ones(1, 3, 16, 16)]).dense_macs / dense["dense_macs"]
        static[name] = (reduction, _static_top1(model, args.epochs, args.seed))

    print(f"{args.model} on digits, mass r = {args.mass}; dense top-1 {dense['top1']:.2f}%; "
          f"{args.dense_epochs} dense + {args.epochs} FTWT epochs; {describe_machine(machine_info())}, "
          f"1 thread; {time.time() - start:.0f} s")
    print()
    print("| variant | estimated reduction | achieved reduction | kept by gates | kept by labels | top-1 "
          "| decisions varying | static model, same FLOPs: reduction, top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        s_red, s_top1 = static[name]
        print(f"| {name} | {r['estimated_reduction']:.1%} | {r['flops_reduction']:.1%} | {r['kept']:.1%} | "
              f"{r['kept_labels']:.1%} | {r['top1']:.2f}% | {r['varying_fraction']:.1%} | {s_red:.1%}, {s_top1:.2f}% |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
