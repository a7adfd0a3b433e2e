"""Development benchmark on real images: dynamic against static pruning at equal honest FLOPs.

ResNet-20 on the CIFAR-10 JPEG folder (``shared/data/cifar10_dev_jpeg.tar.gz``, extracted
outside the repository or into the git-ignored ``data/``). A dense model is trained once,
then every method fine-tunes it with the same budget and the same loop: SGD (lr 0.01,
momentum 0.9, weight decay 5e-4), cosine schedule over all steps, batch 128, the same data
order and augmentation. Methods:

* ``ftwt``: the paper's mode (mass labels at ``r``, reference gates, decoupled BCE, gates
  frozen at half the epochs);
* ``oracle``: fine-tuned and evaluated with the ground-truth masks at ``r`` (perfect gates;
  not deployable, labels need the full output): whether the criterion itself can win;
* ``plus``: the recommended mode (``ftwt.PRESETS["ftwt+"]``): gates on the blocks' inner
  channels, average and max pooled inputs, the top ``1 - rho`` filters of each sample, the
  gates starting as the static L1 choice and trained by the task loss alone through a
  straight-through estimator; ``--gate-init fit --lam 1`` is the variant whose gates are
  first fitted to the dense model's top-k labels and keep learning them (BCE); ``--saliency
  scale|rank`` adds a second gate head that scales each kept filter per sample (and, with
  ``rank``, also ranks them), trained with the backbone; ``--rule budget --offset`` lets inputs
  share a unit's budget (a per-sample count); ``--dynamic 0.25`` keeps a static core of each
  unit's strongest filters and lets the gate pick only the other quarter of the budget per
  sample (``--masks ground_truth``: that criterion's oracle); ``--routes K`` replaces the
  per-image labels by route labels (``_routes.py``: the top filters of each of K clusters of
  images), learnt by the gates with ``--lam 1`` or applied exactly with ``--masks
  ground_truth``; ``--cooldown 0`` freezes the decisions at the static L1 choice, the control;
  ``--kd 0.5`` distils from the dense model (any method, so static gets it too); ``--seed`` repeats a run with other gates and data order;
* ``static``: a Torch-Pruning model of the MACs a dynamic run achieved (``--match RUN``),
  uniform over all channel groups (``--scope all``) or over the blocks' inner channels
  only (``--scope internal``), fine-tuned the same way.

Usage (each step skips what is already done; ``all`` runs the README's table)::

    python benchmarks/dev_cifar.py --data data/cifar10_dev dense
    python benchmarks/dev_cifar.py --data data/cifar10_dev run plus_w_rho0.50 --method plus --rho 0.5
    python benchmarks/dev_cifar.py --data data/cifar10_dev run static_int@plus_rho0.50 --method static \\
        --scope internal --match plus_w_rho0.50
    python benchmarks/dev_cifar.py --data data/cifar10_dev latency
    python benchmarks/dev_cifar.py --data data/cifar10_dev table
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cifar_dev as D  # noqa: E402
import _routes as R  # noqa: E402

import ftwt  # noqa: E402
from ftwt.baselines import prune_to_macs  # noqa: E402
from ftwt.bench import describe_machine, machine_info, time_calls, tuned  # noqa: E402
from ftwt.cascade import WIDTHS, WidthCascade, bn_statistics, cascade_loss, width_forward  # noqa: E402
from ftwt.loss import fit_gates, mask_loss, unit_loss  # noqa: E402
from ftwt.models import get_model  # noqa: E402
from ftwt.surgery import backbone_parameters, gate_parameters, init_gates_from_weights  # noqa: E402

MODEL = "resnet20"
KD_T = 4.0  # distillation temperature (Hinton et al.'s usual value for CIFAR)
GATED = ("ftwt", "oracle", "plus")


def _dense(args: argparse.Namespace) -> None:
    out = Path(args.out) / "dense.pt"
    if out.exists():
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    xtr, ytr, xva, yva = D.load(args.data, args.dense_per_class)
    m = get_model(MODEL, num_classes=10)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.dense_epochs * math.ceil(len(ytr) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for ep in range(args.dense_epochs):
        m.train()
        for xb, yb in D.batches(xtr, ytr, 128, gen, train=True):
            loss = F.cross_entropy(m(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(json.dumps({"epoch": ep + 1, "loss": loss.item(), "t": time.time() - t0}), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.save({"model": m.state_dict(), "seconds": time.time() - t0}, out)


def _gate_config(args: argparse.Namespace) -> ftwt.GateConfig:
    if args.method == "plus":
        cfg = ftwt.TrainConfig.from_preset("ftwt+", threshold=args.rho).gate_config()
        return cfg.replace(saliency=args.saliency, rule=args.rule or cfg.rule, offset=args.offset,
                           dynamic=args.dynamic)
    return ftwt.GateConfig(threshold=args.mass)


def _begin(args: argparse.Namespace):
    """``(out, result path, (xtr, ytr, xva, yva), dense model)`` for a run, or None if it is done already."""
    out = Path(args.out)
    result_path = out / "results" / f"{args.name}.json"
    if result_path.exists():
        print(f"{args.name}: done already ({result_path})")
        return None
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = D.load(args.data, args.per_class)
    dense = get_model(MODEL, num_classes=10)
    dense.load_state_dict(torch.load(out / "dense.pt", weights_only=True)["model"])
    return out, result_path, data, dense.eval()  # the teacher of --kd, and the copy each method starts from


def _run(args: argparse.Namespace) -> None:
    begun = _begin(args)
    if begun is None:
        return
    out, result_path, (xtr, ytr, xva, yva), dense = begun
    t0 = time.time()
    gated = args.method in GATED
    if args.method == "static":
        match = json.loads((out / "results" / f"{args.match}.json").read_text())
        model = prune_to_macs(dense, D.normalize(xva[:1]), match["dynamic_macs"], scope=args.scope).model
    else:
        model = copy.deepcopy(dense)
    if gated:
        ftwt.attach_gates(model, _gate_config(args))
        if args.fill:
            _attach_fills(model)
    steps = args.epochs * math.ceil(len(ytr) / 128)
    opt = torch.optim.SGD(backbone_parameters(model) if gated else model.parameters(), lr=0.01, momentum=0.9,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    trained = [p for n, p in model.ftwt_gates.named_parameters() if args.gate_train == "all" or ".offset_fc." in n
               ] if gated else []
    for p in gate_parameters(model) if gated else ():
        p.requires_grad_(any(p is q for q in trained))
    gopt = torch.optim.SGD(trained, lr=args.gate_lr, momentum=0.9) if trained else None
    gen = torch.Generator().manual_seed(args.seed + 1)
    masks = "ground_truth" if args.method == "oracle" or args.masks == "ground_truth" else "gate"
    share = args.cooldown if args.cooldown is not None else (0.75 if args.method == "plus" else 0.5)
    cooldown = round(share * args.epochs)
    lam = args.lam if args.lam is not None else (ftwt.PRESETS["ftwt+"]["lam"] if args.method == "plus" else 1.0)
    if args.method == "plus" and args.gate_init == "weights":
        init_gates_from_weights(model, args.prior)
    elif args.method == "plus":
        fit_gates(model, (x for x, _ in D.batches(xtr, ytr, 128, gen, train=True)), gopt, args.warmup)
    cur: list[torch.Tensor] = []  # the clusters of the batch being run (route labels)
    routes = cl_tr = cl_va = None
    if args.routes:
        # Route labels: clusters of the dense model's features; each image's index rides in its target.
        z_tr = R.penultimate(dense, xtr, D.normalize)
        cent = R.kmeans(z_tr, args.routes, seed=args.seed)
        cl_tr = R.assign(z_tr, cent)
        cl_va = R.assign(R.penultimate(dense, xva, D.normalize), cent)
        routes = R.route_masks(model, xtr, cl_tr, args.routes, D.normalize, score=args.route_score, targets=ytr)
        ytr = torch.stack([ytr, torch.arange(len(ytr))], 1)
        yva = torch.stack([yva, torch.arange(len(yva))], 1)
        if masks == "ground_truth":
            masks = lambda unit, logits, labels: routes[unit.name][cur[0]]  # noqa: E731

    def _batches(x, y, clusters, *a, **kw):
        for xb, yb in D.batches(x, y, *a, **kw):
            if routes is not None:
                cur[:] = [clusters[yb[:, 1]]]
                yb = yb[:, 0]
            yield xb, yb

    for ep in range(args.epochs):
        model.train()
        train_gates = gated and ep < cooldown and masks == "gate"
        for p in trained:
            p.requires_grad_(train_gates)
        labels = "train" if train_gates and routes is None else False
        ctx = ftwt.record(model, masks=masks, labels=labels) if gated else contextlib.nullcontext()
        with ctx as rec:
            for xb, yb in _batches(xtr, ytr, cl_tr, 128, gen, train=True):
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                if args.kd:
                    with torch.no_grad():
                        soft = F.softmax(dense(xb) / KD_T, 1)
                    loss = (1 - args.kd) * loss + args.kd * KD_T ** 2 * F.kl_div(
                        F.log_softmax(logits / KD_T, 1), soft, reduction="batchmean")
                if train_gates and lam and routes is not None:
                    loss = loss + lam * torch.stack([unit_loss(o.logits, routes[n][cur[0]])
                                                     for n, o in rec.outputs.items()]).mean()
                elif train_gates and lam:
                    loss = loss + lam * mask_loss(model)
                opt.zero_grad()
                if gopt is not None:
                    gopt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                if train_gates:
                    gopt.step()
        print(json.dumps({"run": args.name, "epoch": ep + 1, "loss": loss.item(), "t": time.time() - t0}), flush=True)
    train_seconds = time.time() - t0
    report = ftwt.evaluate(model, _batches(xva, yva, cl_va, 500), "cpu", **({"masks": masks} if gated else {}))
    dense_macs = ftwt.measure(dense, [D.normalize(xva[:1])]).dense_macs
    res = {"name": args.name, "method": args.method, "args": vars(args), "train_seconds": train_seconds,
           **{k: v for k, v in report.items() if not isinstance(v, (list, dict))}}
    if routes is not None:
        res.update(_route_stats(model, masks, routes, _batches(xva, yva, cl_va, 500), cur))
    res["flops_reduction"] = 1.0 - res["dynamic_macs"] / dense_macs
    # training-set accuracy (no augmentation): how a user would choose between static variants
    model.eval()
    hits = 0
    with torch.no_grad(), (ftwt.record(model, masks=masks, labels=False) if gated else contextlib.nullcontext()):
        for xb, yb in _batches(xtr, ytr, cl_tr, 500):
            hits += int((model(xb).argmax(1) == yb).sum())
    res["train_top1"] = 100.0 * hits / len(ytr)
    (out / "models").mkdir(parents=True, exist_ok=True)
    torch.save({"model": model} if not gated else {"state": model.state_dict(), "gates": _gate_config(args).to_dict()},
               out / "models" / f"{args.name}.pt")
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(res, indent=1))
    print("RESULT", json.dumps(res), flush=True)


def _cascade(args: argparse.Namespace) -> None:
    """``cascade``: one model in two widths (``ftwt.cascade``), trained together, ``tau`` set on unseen images."""
    trained_in = None
    if args.rescore:  # score a trained run again with this code (its training is not repeated)
        old = Path(args.out) / "results" / f"{args.name}.json"
        trained_in = json.loads(old.read_text())["train_seconds"] if old.exists() else None
        old.unlink(missing_ok=True)
    begun = _begin(args)
    if begun is None:
        return
    out, result_path, (xtr, ytr, xva, yva), dense = begun
    xca, yca = D.load_unseen(args.data, args.dense_per_class, args.calib_per_class)
    model = copy.deepcopy(dense)
    gates = _gate_config(argparse.Namespace(method="plus", rho=args.rho, saliency="none", rule=None, offset=False,
                                            dynamic=1.0))
    ftwt.attach_gates(model, gates)
    saved = out / "models" / f"{args.name}.pt"
    full = dense if args.full == "dense" else None
    if args.rescore:
        blob = torch.load(saved, weights_only=True)
        model.load_state_dict(blob["state"])
        cascade = WidthCascade.from_state(model.eval(), blob, full)
        train_seconds = blob.get("train_seconds", trained_in)
    else:
        cascade, train_seconds = _train_cascade(args, model, xtr, ytr, full)
    target = json.loads((out / "results" / f"{args.match}.json").read_text())["dynamic_macs"]
    cascade.set_budget(D.batches(xca, yca, 500), macs=target)
    res = {"name": args.name, "method": "cascade", "args": vars(args), "train_seconds": train_seconds,
           "target_macs": target, **cascade.report(D.batches(xva, yva, 500))}
    # The reference code's count: the core's, plus the dense count for the escalated images.
    core = ftwt.evaluate(cascade.use("core"), D.batches(xva, yva, 500), "cpu", ground_truth=False)
    ref_dense = core["reference_macs"] / (1.0 - core["reference_reduction"])
    res["reference_reduction"] = 1.0 - (core["reference_macs"] + res["escalated"] * ref_dense) / ref_dense
    res["train_top1"] = cascade.report(D.batches(xtr, ytr, 500))["top1"]
    (out / "models").mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "gates": gates.to_dict(), "train_seconds": train_seconds,
                "full": args.full, **cascade.cascade_state()}, saved)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(res, indent=1))
    print("RESULT", json.dumps(res), flush=True)


def _train_cascade(args: argparse.Namespace, model: torch.nn.Module, xtr, ytr,
                   full: torch.nn.Module | None) -> tuple[WidthCascade, float]:
    """Both widths trained together (the core alone, with a separate ``full`` model); each width's
    BatchNorm statistics re-estimated after."""
    init_gates_from_weights(model)  # the core: the static L1 x |gamma| choice, for every image
    for p in gate_parameters(model):
        p.requires_grad_(False)
    steps = args.epochs * math.ceil(len(ytr) / 128)
    opt = torch.optim.SGD(backbone_parameters(model), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()
    for ep in range(args.epochs):
        model.train()
        for xb, yb in D.batches(xtr, ytr, 128, gen, train=True):
            loss = cascade_loss(model, xb, yb)[0] if full is None else F.cross_entropy(
                width_forward(model, xb, "core"), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(json.dumps({"run": args.name, "epoch": ep + 1, "loss": loss.item(), "t": time.time() - t0}), flush=True)
    train_seconds = time.time() - t0
    bn = {w: bn_statistics(model, D.batches(xtr, ytr, 128, torch.Generator().manual_seed(0), train=True), w)
          for w in (WIDTHS if full is None else ("core",))}
    return WidthCascade(model, bn, full=full), train_seconds

def _attach_fills(model: torch.nn.Module) -> None:
    """``--fill``: a skipped filter outputs a learnt constant instead of zero (one per filter,
    trained with the backbone), so a layer after it sees the same mean whichever filters an
    image skipped. It starts just above zero: ReLU passes no gradient at zero itself."""
    named = dict(model.named_modules())
    model.ftwt_fill = torch.nn.ParameterDict()
    for u in ftwt.surgery.gated_units(model):
        fill = model.ftwt_fill[u.name.replace(".", "_")] = torch.nn.Parameter(torch.full((u.out_channels,), 0.01))

        def hook(module, args, y, u=u, fill=fill):
            m = u.last.mask if u.last is not None else None
            if m is None:
                return None
            return y + (~m).to(y.dtype)[:, :, None, None] * fill[None, :, None, None]

        named[u.spec.tail].register_forward_hook(hook)


def _route_stats(model, masks, routes, batches, cur) -> dict:
    """Validation decisions against the route labels: how often they vary, and the gates' lift."""
    got: dict[str, list] = {}
    want: dict[str, list] = {}
    with torch.no_grad(), ftwt.record(model, masks=masks, labels=False) as rec:
        for xb, _ in batches:
            model(xb)
            for name, m in rec.masks.items():
                got.setdefault(name, []).append(m.clone())
                want.setdefault(name, []).append(routes[name][cur[0]])
    got = {k: torch.cat(v) for k, v in got.items()}
    want = {k: torch.cat(v) for k, v in want.items()}
    on = torch.cat([m.float().mean(0) for m in want.values()])
    return {**R.lift(got, want), "route_label_varying_fraction": float(((on > 0) & (on < 1)).double().mean())}


def _load(out: Path, name: str) -> torch.nn.Module:
    blob = torch.load(out / "models" / f"{name}.pt", weights_only=False)  # our own files, written above
    if "model" in blob:
        return blob["model"].eval()
    model = ftwt.attach_gates(get_model(MODEL, num_classes=10), ftwt.GateConfig.from_dict(blob["gates"]))
    model.load_state_dict(blob["state"])
    return model.eval()


def _latency(args: argparse.Namespace) -> None:
    """Batch-1, one-thread CPU latency of what each run would deploy, measured side by side."""
    out = Path(args.out)
    _, _, xva, _ = D.load(args.data, 1)
    # spread over the classes (the folder is sorted by class): a cascade's cost depends on the image
    xs = [x[None] for x in D.normalize(xva[torch.linspace(0, len(xva) - 1, args.images).long()])]
    dense = get_model(MODEL, num_classes=10)
    dense.load_state_dict(torch.load(out / "dense.pt", weights_only=True)["model"])
    # Every deployed model with PyTorch's own speed tricks (BatchNorm folded, the faster layout).
    fast = tuned(dense.eval(), xs[0], threads=1)[0]
    fns = {"dense": (lambda m, it: lambda: m(next(it)))(fast, _cycle(xs))}
    only = set(args.only.split(",")) if args.only else None
    for path in sorted((out / "results").glob("*.json")):
        res = json.loads(path.read_text())
        if res["method"] == "oracle" or (only is not None and res["name"] not in only):
            continue  # an oracle needs the full output for its labels: nothing to deploy
        if res["method"] == "cascade":
            # The core on the engine, the full width (the plain model) for the images it escalates.
            blob = torch.load(out / "models" / f"{res['name']}.pt", weights_only=True)
            model = ftwt.attach_gates(get_model(MODEL, num_classes=10), ftwt.GateConfig.from_dict(blob["gates"]))
            model.load_state_dict(blob["state"])
            full = dense if blob.get("full") == "dense" else None
            engine = WidthCascade.from_state(model.eval(), blob, full).engine(example=xs[0])
            engine.core, engine.full = tuned(engine.core, xs[0], threads=1)[0], tuned(engine.full, xs[0], threads=1)[0]
            fns[f"{res['name']}|auto"] = (lambda e, it: lambda: e(next(it)))(engine, _cycle(xs))
            continue
        model = _load(out, res["name"])
        if res["method"] in GATED:
            # The default engine: each convolution's kernel chosen by timing, then checked whole.
            engine = ftwt.SparseEngine(model, kernel="auto", example=xs[0])
            fns[f"{res['name']}|auto"] = (lambda e, it: lambda: e(next(it)))(engine, _cycle(xs))
        else:
            fns[res["name"]] = (lambda m, it: lambda: m(next(it)))(tuned(model.eval(), xs[0], threads=1)[0], _cycle(xs))
    ms = time_calls(fns, threads=1, min_run_time=args.min_run_time)
    record = {"machine": describe_machine(machine_info()), "isa": _isa(), "ms": ms}
    if only is None:  # the table's file holds every run
        (out / "latency.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


def _cycle(xs: list[torch.Tensor]):
    while True:
        yield from xs


def _isa() -> str:
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "other")
    return "unknown"


def _table(args: argparse.Namespace) -> None:
    out = Path(args.out)
    lat = json.loads((out / "latency.json").read_text()) if (out / "latency.json").exists() else {"ms": {}}
    rows = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    print("| run | method | top-1 | honest FLOPs red. | reference-style red. | decisions varying | labels varying "
          "| gate lift | train top-1 | batch-1 ms (engine, or the pruned model) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ms = lat["ms"]
    print(f"| dense | dense | {args.dense_top1 or '-'} | - | - | - | - | - | - | {ms.get('dense', float('nan')):.2f} |")

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    for r in rows:
        gated = r["method"] in GATED
        t = f"{ms.get(r['name'] + ('|auto' if gated else ''), float('nan')):.2f}"
        lift = r.get("gate_lift")
        print(f"| {r['name']} | {r['method']} | {r['top1']:.2f}% | {pct(r['flops_reduction'])} | "
              f"{pct(r.get('reference_reduction')) if gated else '-'} | {pct(r.get('varying_fraction'))} | "
              f"{pct(r.get('label_varying_fraction'))} | {'-' if lift is None else f'{100 * lift:+.1f} pts'} | "
              f"{r['train_top1']:.2f}% | {t} |")
    if lat.get("machine"):
        print(f"\n(batch 1, 1 thread, {lat['machine']}, {lat['isa']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/cifar10_dev", help="the extracted CIFAR-10 JPEG folder")
    p.add_argument("--out", default="runs/dev_cifar", help="dense model, runs, results (git-ignored)")
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dense", help="train the dense ResNet-20 every method starts from")
    d.add_argument("--dense-epochs", type=int, default=15)
    d.add_argument("--dense-per-class", type=int, default=2000)
    r = sub.add_parser("run", help="fine-tune one method")
    r.add_argument("name")
    r.add_argument("--method", choices=(*GATED, "static"), required=True)
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--per-class", type=int, default=1000, help="training images per class for fine-tuning")
    r.add_argument("--mass", type=float, default=0.8, help="r of ftwt and oracle")
    r.add_argument("--rho", type=float, default=0.5, help="share of inner filters pruned per sample (plus)")
    r.add_argument("--warmup", type=int, default=50, help="gate-fitting steps before fine-tuning (plus)")
    r.add_argument("--gate-lr", type=float, default=0.1)
    r.add_argument("--cooldown", type=float, default=None,
                   help="share of the epochs the gates train (default 0.75 plus, 0.5 ftwt); 0 with --gate-init "
                        "weights: the static L1 choice applied as masks, the control for what gate learning adds")
    r.add_argument("--lam", type=float, default=None,
                   help="weight of the BCE mask loss on the labels (default: 1, and the preset's 0 for plus)")
    r.add_argument("--gate-init", choices=("fit", "weights"), default="weights",
                   help="plus: fit the gates to the dense model's labels, or start them as the static L1 choice")
    r.add_argument("--saliency", choices=ftwt.gate.SALIENCY, default="none",
                   help="plus: scale the kept filters by a second gate head (scale), and rank by it (rank)")
    r.add_argument("--prior", type=float, default=1.0,
                   help="plus: strength of the static L1 prior the gates start from (their biases' scale)")
    r.add_argument("--seed", type=int, default=0, help="initial gates and data order (the table's runs: 0)")
    r.add_argument("--rule", choices=ftwt.gate.RULES, default=None, help="plus: the gates' rule (default the preset's)")
    r.add_argument("--offset", action="store_true", help="plus: a per-sample offset of all of a unit's logits")
    r.add_argument("--gate-train", choices=("all", "offset"), default="all",
                   help="plus: which gate parameters learn (offset: the ranking stays the static prior)")
    r.add_argument("--dynamic", type=float, default=1.0,
                   help="plus: share of each sample's filters its gate picks; the rest are a static core (L1 x |gamma|)")
    r.add_argument("--masks", choices=("gate", "ground_truth"), default="gate",
                   help="plus: ground_truth trains and evaluates with the labels as masks (the oracle of that criterion)")
    r.add_argument("--routes", type=int, default=0,
                   help="plus: labels from K clusters of images (the dense model's features), each unit's top filters "
                        "by their cluster's mean peak; gates learn them (BCE, --lam), or --masks ground_truth applies them")
    r.add_argument("--route-score", choices=("peak", "taylor"), default="peak",
                   help="--routes: rank a cluster's filters by mean peak activation, or by the first-order cost "
                        "of dropping them to the cluster's task loss (Taylor)")
    r.add_argument("--fill", action="store_true",
                   help="plus: a skipped filter outputs a learnt constant (per filter) instead of zero; the "
                        "FLOPs meter then counts those channels as live inputs of the next layer (the engine has "
                        "no path for constant channels), so the reduction reported is not comparable")
    r.add_argument("--kd", type=float, default=0.0,
                   help="weight of distillation from the dense model (any method, so static gets it too)")
    r.add_argument("--match", help="static: the run whose achieved MACs to match")
    r.add_argument("--scope", choices=("all", "internal"), default="all", help="static: channel groups pruned")
    c = sub.add_parser("cascade", help="the width cascade (_cascade.py): core for every image, all filters when unsure")
    c.add_argument("name")
    c.add_argument("--rho", type=float, default=0.6, help="share of inner filters outside the core")
    c.add_argument("--match", required=True, help="the run whose honest MACs are the budget")
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument("--per-class", type=int, default=1000)
    c.add_argument("--dense-per-class", type=int, default=2000, help="training images per class the dense model saw")
    c.add_argument("--calib-per-class", type=int, default=500, help="unseen training images per class tau is set on")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--rescore", action="store_true", help="score the saved model again (no training)")
    c.add_argument("--full", choices=("shared", "dense"), default="shared",
                   help="the full width: the model's own filters (trained with the core), or the dense model "
                        "as it is (two sets of weights; the core trains alone, as cheaply as a static model)")
    lat = sub.add_parser("latency", help="batch-1 CPU latency of every finished run")
    lat.add_argument("--min-run-time", type=float, default=1.0)
    lat.add_argument("--images", type=int, default=64, help="validation images cycled, spread over the classes")
    lat.add_argument("--only", default=None, help="comma-separated runs to time (printed, latency.json untouched)")
    t = sub.add_parser("table", help="the README table")
    t.add_argument("--dense-top1", default=None)
    args = p.parse_args()
    {"dense": _dense, "run": _run, "cascade": _cascade, "latency": _latency, "table": _table}[args.cmd](args)


if __name__ == "__main__":
    main()
