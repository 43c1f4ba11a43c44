"""Time one training step of ce, each meta method, and each meta method with FaMUS.

Side by side in one process, interleaved round-robin over repeats (this machine is shared and
noisy; ratios taken in one run are what to compare), after warm-up steps. CIFAR-shaped random
data, so no dataset is needed. The last row times the data path of one step (gather a batch of
device-resident uint8 images, crop, flip, normalise): its "x ce" is the share of a ce step
spent outside the model. `--epoch 50000` times instead one CIFAR-sized epoch of ce, data path
included. `--packed 1,2,4,8` times instead K seeds trained as one packed model
(`resources.seeds_per_trial`): samples/s of all seeds together, against K = 1.

    python tools/bench_meta_step.py --model preact_resnet18 --batch 64
    python tools/bench_meta_step.py --model wrn --model-options '{"depth": 28, "width": 10}' \
        --batch 100 --device cuda --format markdown
    python tools/bench_meta_step.py --model cnn8 --batch 128 --methods ce,mwnet --packed 1,2,4,8
    python tools/bench_meta_step.py --methods ce,mwnet --no-famus --variants \
        '{"mwnet+famus window, every 2": {"method": {"name": "mwnet", "famus": true, "meta_interval": 2},
          "famus": {"candidates": 17, "exact_below_window": false}}}'
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch

from raymeta.config import parse_experiment
from raymeta.data.bundle import Split
from raymeta.data.loader import Batch, DeviceSplit, pack_batches
from raymeta.methods import Engine, build_method
from raymeta.methods.famus import Famus
from raymeta.methods.optim import build_optimizer
from raymeta.methods.packed import PackedMethod
from raymeta.models import build_model
from raymeta.models.packed import PackedModel
from raymeta.threads import use_threads


def make_variant(name: str, famus: bool, args) -> dict:
    method_cfg = {"name": name}
    if name != "ce":
        method_cfg.update(famus=famus, meta_interval=args.meta_interval)
    label = f"{name}+famus" if famus else name
    return build_variant(label, method_cfg, json.loads(args.famus_options), args)


def build_variant(label: str, method_cfg: dict, famus_cfg: dict, args, seed: int = 0) -> dict:
    method_cfg = dict(method_cfg)
    if method_cfg["name"] == "metalabelnet":
        method_cfg.setdefault("warmup_epochs", 1)
    cfg = parse_experiment({"method": method_cfg, "famus": famus_cfg,  # --famus-options: all variants
                            "optimizer": {"lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4}},
                           unread_ok=True)
    torch.manual_seed(seed)
    model = build_model(args.model, args.classes, 3, args.image, **json.loads(args.model_options))
    model = model.to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = build_method(cfg.method, args.classes, model).to(args.device)
    engine = Engine(model, build_optimizer(cfg.optimizer, model.parameters()))
    if getattr(cfg.method, "famus", False):
        engine.meta_gradient = Famus(cfg.famus, model)
        engine.meta_gradient.generator = torch.Generator().manual_seed(seed)
    method.generator = torch.Generator().manual_seed(seed)
    method.on_epoch_start(1, engine)  # past MetaLabelNet's warm-up: its encoder exists
    return {"label": label, "method": method, "engine": engine, "cfg": cfg, "times": [], "meta": []}


def packed_variant(name: str, seeds: int, args) -> dict:
    """`seeds` copies of a method and model packed as the Trainer packs seeds, each seed with
    its own initialisation and its own random batches."""
    members = [build_variant(name, {"name": name}, {}, args, seed) for seed in range(seeds)]
    model = PackedModel([m["engine"].model for m in members])
    optimizer = build_optimizer(members[0]["cfg"].optimizer, model.parameters())
    return {"label": name, "seeds": seeds, "method": PackedMethod([m["method"] for m in members]),
            "engine": Engine(model, optimizer),
            "train_batch": pack_batches([random_batch(args.batch, args, 10 + s) for s in range(seeds)]),
            "meta_batch": pack_batches([random_batch(args.meta_batch, args, 50 + s) for s in range(seeds)]),
            "times": [], "meta": []}


def random_batch(n: int, args, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, args.image, args.image, generator=g).to(args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (n,), generator=g).to(args.device)
    return Batch(x, y, y, torch.arange(n, device=args.device))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(args):
    """bfloat16 autocast with --bf16, as train.bf16 does in the Trainer."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)


def image_epochs(n: int, args):
    """n random CIFAR-shaped uint8 images with random labels, held on the device; returns a
    function that iterates one shuffled, augmented epoch of batches over them."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 3, args.image, args.image), dtype=np.uint8)
    y = rng.integers(0, args.classes, n)
    stats = SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    split = DeviceSplit(Split(x, y, y, np.arange(n)), stats, torch.device(args.device), layout=layout)
    order, augment = torch.Generator().manual_seed(0), torch.Generator(args.device).manual_seed(1)
    return lambda: split.batches(args.batch, shuffle=True, augment="crop_flip", drop_last=True,
                                 order_generator=order, aug_generator=augment)


def data_variant(args) -> dict:
    """The data path of one step: gather a batch of uint8 images resident on the device,
    random crop and flip, normalise (raymeta.data.loader), as the Trainer does."""
    epoch = image_epochs(10_000, args)

    def batches():
        while True:
            yield from epoch()

    stream = batches()
    return {"label": "data path (gather, crop, flip, normalise)", "next": lambda: next(stream),
            "times": [], "meta": []}


def time_epoch(args) -> str:
    """One epoch of ce over --epoch device-resident samples, data path included."""
    variant = make_variant("ce", False, args)
    batches = image_epochs(args.epoch, args)

    def epoch() -> int:
        steps = 0
        for batch in batches():
            with autocast(args):
                variant["method"].step(variant["engine"], batch, lambda: batch)
            steps += 1
        return steps

    epoch()  # warm-up: allocator, kernels, autotuning
    sync(args.device)
    tic = time.perf_counter()
    steps = epoch()
    sync(args.device)
    seconds = time.perf_counter() - tic
    return (f"one epoch of ce, {args.model}, {steps * args.batch} samples in batches of "
            f"{args.batch} (data path included): {seconds:.2f} s, "
            f"{steps * args.batch / seconds:,.0f} samples/s")


def run_steps(variant: dict, train: Batch, meta: Batch, steps: int, args) -> float:
    train, meta = variant.get("train_batch", train), variant.get("meta_batch", meta)
    sync(args.device)
    tic = time.perf_counter()
    for _ in range(steps):
        if "next" in variant:
            variant["next"]()
        else:
            with autocast(args):
                variant["method"].step(variant["engine"], train, lambda: meta)
    sync(args.device)
    return (time.perf_counter() - tic) / steps


def time_side_by_side(variants: list[dict], train: Batch | None, meta: Batch | None, args) -> None:
    """Warm every variant up, then time them round-robin over the repeats (so slow phases of
    the machine hit every variant): seconds per step into v["times"], the meta update's share
    of them into v["meta"]."""
    for v in variants:
        run_steps(v, train, meta, args.warmup, args)
        if "engine" in v:
            v["engine"].take_meta_seconds()
    for _ in range(args.repeats):
        for v in variants:
            seconds = run_steps(v, train, meta, args.steps, args)
            v["times"].append(seconds)
            if "engine" in v:
                v["meta"].append(v["engine"].take_meta_seconds() / (seconds * args.steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--model-options", default="{}", help="JSON, e.g. '{\"depth\": 28, \"width\": 10}'")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--meta-batch", type=int, default=None,
                        help="clean meta batch size (default: --batch, as MW-Net and MetaLabelNet do)")
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="ce,mwnet,l2r,mlc,metalabelnet")
    parser.add_argument("--no-famus", action="store_true", help="only the full meta methods")
    parser.add_argument("--famus-options", default="{}", help="JSON for the famus section, e.g. '{\"k\": 4}'")
    parser.add_argument("--meta-interval", type=int, default=1,
                        help="meta methods update their meta-model every N steps")
    parser.add_argument("--variants", default="{}",
                        help="JSON {label: {method: {...}, famus: {...}, meta_batch: N}}: more "
                             "variants to time (meta_batch: that variant's own meta batch size)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast, as train.bf16")
    parser.add_argument("--epoch", type=int, default=0, metavar="N",
                        help="only time one epoch of ce over N device-resident samples (50000: "
                             "a CIFAR epoch), after one untimed epoch")
    parser.add_argument("--compile", action="store_true",
                        help="also time ce with torch.compile (train.compile; its compile time "
                             "is spent in the warm-up steps)")
    parser.add_argument("--packed", default="", metavar="K,K,...",
                        help="only time K seeds packed into one model (e.g. 1,2,4,8) for each "
                             "of --methods (every method but mlnt)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--format", choices=["text", "markdown"], default="text")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads [default: as raymeta run chooses them]")
    args = parser.parse_args()
    use_threads(args.threads)
    args.meta_batch = args.meta_batch or args.batch
    if args.epoch:
        print(time_epoch(args))
        return
    extra = json.loads(args.variants)
    # every variant times whole meta intervals: a k-step cycle has one meta update
    cycle = max([args.meta_interval] + [v["method"].get("meta_interval", 1) for v in extra.values()])
    args.steps = -(-args.steps // cycle) * cycle
    args.warmup = -(-args.warmup // cycle) * cycle

    if args.packed:
        print_packed(args)
        return
    variants = []
    for name in args.methods.split(","):
        variants.append(make_variant(name, False, args))
        if name == "ce" and args.compile:  # what train.compile does: plain steps compiled
            variants.append(make_variant(name, False, args))
            variants[-1]["label"] = "ce, compiled"
            variants[-1]["engine"].plain_model = torch.compile(variants[-1]["engine"].model)
        if name != "ce" and not args.no_famus:
            variants.append(make_variant(name, True, args))
    for label, spec in extra.items():
        variants.append(build_variant(label, spec["method"], spec.get("famus", {}), args))
        if "meta_batch" in spec:  # this variant's own clean meta batch size
            variants[-1]["meta_batch"] = random_batch(spec["meta_batch"], args, 2)
    variants.append(data_variant(args))
    time_side_by_side(variants, random_batch(args.batch, args, 1),
                      random_batch(args.meta_batch, args, 2), args)

    ms = {v["label"]: 1000 * statistics.median(v["times"]) for v in variants}
    base = ms.get("ce")
    rows = []
    for v in variants:
        label = v["label"]
        full = ms.get(label.split("+")[0]) if "+" in label else None
        rows.append([label, f"{ms[label]:.1f}", f"{ms[label] / base:.2f}" if base else "",
                     f"{ms[label] / full:.2f}" if full else "",
                     f"{statistics.median(v['meta']):.2f}" if v["meta"] else ""])
    header = ["method", "ms/step", "x ce", "x full", "meta share"]
    title = (describe(args) + (f"; meta_interval {args.meta_interval}" if args.meta_interval > 1 else "")
             + ("; bf16 autocast" if args.bf16 else "") + ("; channels_last" if args.channels_last else ""))
    print_table(title, header, rows, args.format)


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def describe(args) -> str:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    return (f"{args.model} {json.loads(args.model_options) or ''} batch {args.batch} "
            f"(meta batch {args.meta_batch}), {args.image}x{args.image}, {args.device} ({device}, "
            f"{torch.get_num_threads()} threads), torch {torch.__version__}; median of "
            f"{args.repeats} x {args.steps} steps after {args.warmup} warm-up")


def print_packed(args) -> None:
    """Samples/s of K packed seeds (per seed batch --batch), side by side, against K = 1."""
    counts = [int(k) for k in args.packed.split(",")]
    variants = [packed_variant(name, k, args) for name in args.methods.split(",") for k in counts]
    time_side_by_side(variants, None, None, args)  # each packed variant has its own batches
    rows, single = [], {}
    for v in variants:
        seconds = statistics.median(v["times"])
        rate = v["seeds"] * args.batch / seconds
        single.setdefault(v["label"], rate if v["seeds"] == 1 else None)
        base = single[v["label"]]
        rows.append([v["label"], str(v["seeds"]), f"{1000 * seconds:.1f}", f"{rate:,.0f}",
                     f"{rate / base:.2f}" if base else ""])
    header = ["method", "packed seeds", "ms/step", "samples/s", "x samples/s of 1 seed"]
    print_table(describe(args) + "; batch per seed", header, rows, args.format)


def print_table(title: str, header: list[str], rows: list[list[str]], fmt: str) -> None:
    if fmt == "markdown":
        print(title + "\n")
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
