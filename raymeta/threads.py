"""How many CPU threads a run outside Ray trains with (Ray sets them for its trials).

torch's default is every core of the machine. When another process keeps those cores busy,
its OpenMP threads spin against each other: a 2-epoch MW-Net MLP on digits took 252 ms a
step with torch's default and 24 ms with one thread on this 2-core machine under load. So
a run takes the CPUs it may use (OMP_NUM_THREADS, else its affinity mask, capped by
resources.cpus_per_trial where given), and waiting threads sleep instead of spinning
(OMP_WAIT_POLICY=PASSIVE): the same run took 22 ms a step under that load.
"""

from __future__ import annotations

import os


def cpu_budget(cap: float | None = None) -> int:
    """The CPUs this process may use: OMP_NUM_THREADS if set, else its affinity mask, at most
    `cap`."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    count = int(given) if given.isdigit() and int(given) > 0 else len(os.sched_getaffinity(0))
    if cap is not None:
        count = min(count, max(1, int(cap)))
    return max(1, count)


def choose_threads(requested: int | None = None, cap: float | None = None) -> tuple[int, str]:
    """(threads, why): `requested` if given, else the CPU budget. Not the machine's current
    load: on a CPU the thread count can change the last bits of reductions, and a seed must
    give the same run whatever else the machine is doing."""
    if requested:
        return requested, "--threads"
    budget = cpu_budget(cap)
    return budget, "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else "CPUs it may use"


def use_threads(requested: int | None = None, cap: float | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads (call before torch is first used). Returns the choice."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP
    import torch

    threads, why = choose_threads(requested, cap)
    torch.set_num_threads(threads)
    return threads, why
