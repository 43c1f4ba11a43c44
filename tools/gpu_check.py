"""The GPU check: one command, one report, for the few minutes a GPU machine is lent.

Runs without Ray (the GPU machine has none) and without any dataset but MNIST for the last
section (random CIFAR-shaped data elsewhere). Sections, each a bench_meta_step run in its own
process (so one that fails or runs out of time does not take the others with it):
  1. every method full and with FaMUS: cnn8 and preact_resnet18, batch 128, fp32 and
     bf16 + channels_last;
  2. packed seeds K = 1, 2, 4, 8 on cnn8 (samples/s against K = 1);
  3. one CIFAR-sized epoch (50,000 samples) of ce on cnn8 and preact_resnet18, data path
     included;
  4. the Trainer against a bare PyTorch loop on the same model and batches (LeNet on MNIST):
     per-step Python overhead and host syncs show here on a GPU.

    python tools/gpu_check.py --device cuda --out gpu-check.md      # about 6 minutes on an H200
    python tools/gpu_check.py --device cpu --quick                  # seconds; CI runs this

On the GPU machine only the checkout travels: copy ../shared/data/mnist into an ignored
folder (data/mnist) and carry it, or pass --mnist-root.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench_meta_step.py"


def sections(quick: bool) -> list[tuple[str, list[str]]]:
    """(title, bench_meta_step arguments) of the timed sections."""
    batch = "8" if quick else "128"
    short = ["--warmup", "1", "--steps", "1", "--repeats", "1"] if quick else \
        ["--warmup", "3", "--steps", "5", "--repeats", "3"]
    big = ["--methods", "ce,mwnet"] if quick else []
    out = []
    for model in ("cnn8", "preact_resnet18"):
        for precision, flags in (("fp32", []), ("bf16, channels_last", ["--bf16", "--channels-last"])):
            if quick and model == "preact_resnet18" and flags:
                continue  # bf16 on a CPU is slow and shows nothing a GPU run needs
            # quick: bf16 on a CPU is slow (seconds a step), so two methods show it runs
            extra = big if model == "preact_resnet18" or flags else []
            out.append((f"every method, full and FaMUS: {model}, batch {batch}, {precision}",
                        ["--model", model, "--batch", batch, *flags, *extra, *short]))
    out.append((f"packed seeds: cnn8, batch {batch} per seed",
                ["--model", "cnn8", "--batch", batch, "--methods", "ce,mwnet",
                 "--packed", "1,2" if quick else "1,2,4,8", *short]))
    for model in ("cnn8", "preact_resnet18"):
        samples = ("128" if model == "cnn8" else "32") if quick else "50000"
        out.append((f"one epoch of ce: {model}, {samples} samples, batch {batch}",
                    ["--model", model, "--batch", batch, "--epoch", samples]))
    return out


def trainer_against_bare_loop(device: str, mnist_root: Path, quick: bool) -> str:
    """ms per CE step of the Trainer and of a plain PyTorch loop over the same device-resident
    batches and model (LeNet, MNIST, batch 100): the Trainer's own cost per step."""
    import torch
    import torch.nn.functional as F

    from raymeta.config import parse_experiment
    from raymeta.train import Trainer

    cfg = parse_experiment({
        "dataset": {"name": "mnist", "root": str(mnist_root)}, "model": {"name": "lenet"},
        "meta_set": {"per_class": 10}, "schedule": {"name": "constant"},
        "optimizer": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4},
        "train": {"epochs": 1, "batch_size": 100, "device": device, "checkpoint": False}})
    trainer = Trainer(cfg)
    if quick:  # a tenth of the training split is enough to see the overhead
        trainer.splits["train"] = trainer.splits["train"].subset(torch.arange(2000))
    steps = len(trainer.splits["train"]) // 100

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(run) -> float:
        run()  # warm-up: allocator, kernels
        sync()
        tic = time.perf_counter()
        run()
        sync()
        return 1000 * (time.perf_counter() - tic) / steps

    trainer_ms = timed(trainer.train_epoch)
    model, optimizer = trainer.model, trainer.optimizer
    split = trainer.splits["train"]

    def bare_epoch():
        model.train()
        for batch in split.batches(100, shuffle=True, order_generator=torch.Generator().manual_seed(0),
                                   drop_last=True):
            loss = F.cross_entropy(model(batch.x), batch.y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    bare_ms = timed(bare_epoch)
    return ("| loop | ms/step | x bare |\n|---|---|---|\n"
            f"| raymeta Trainer.train_epoch | {trainer_ms:.2f} | {trainer_ms / bare_ms:.2f} |\n"
            f"| bare PyTorch loop, same batches | {bare_ms:.2f} | 1.00 |\n\n"
            f"LeNet on MNIST, batch 100, {steps} steps, {device}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument("--mnist-root", type=Path, default=None,
                        help="MNIST IDX files [default: data/mnist, else ../shared/data/mnist]")
    parser.add_argument("--section-timeout", type=int, default=150, help="seconds per section")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    started = time.monotonic()
    report, failures = [f"# GPU check ({args.device}{', quick' if args.quick else ''})\n"], 0
    for title, bench_args in sections(args.quick):
        command = [sys.executable, str(BENCH), "--device", args.device, "--format", "markdown",
                   *bench_args]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                  timeout=args.section_timeout)
            body = proc.stdout.strip() if proc.returncode == 0 else \
                f"FAILED (exit {proc.returncode}):\n```\n{proc.stderr.strip()[-2000:]}\n```"
            failures += proc.returncode != 0
        except subprocess.TimeoutExpired:
            body, failures = f"TIMED OUT after {args.section_timeout} s", failures + 1
        report.append(f"## {title}\n\n{body}\n")
        print(report[-1], flush=True)
        if args.out:  # section by section: a loan that ends early keeps what ran
            args.out.write_text("\n".join(report) + "\n")
    roots = [args.mnist_root] if args.mnist_root else [ROOT / "data" / "mnist",
                                                        ROOT.parent / "shared" / "data" / "mnist"]
    root = next((r for r in roots if r.is_dir()), None)
    title = "## the Trainer against a bare PyTorch loop\n\n"
    if root is None:
        report.append(title + f"skipped: no MNIST files in {', '.join(map(str, roots))}\n")
    else:
        report.append(title + trainer_against_bare_loop(args.device, root, args.quick) + "\n")
    print(report[-1])
    report.append(f"total {time.monotonic() - started:.0f} s, {failures} section(s) failed")
    print(report[-1])
    if args.out:
        args.out.write_text("\n".join(report) + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
