"""The CPU threads of a run outside Ray (Ray sets its trials' own)."""

import os

from raymeta.threads import choose_threads, cpu_budget


def test_threads_follow_what_the_run_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert cpu_budget() == cpus and cpu_budget(cap=1) == 1
    assert choose_threads(requested=3) == (3, "--threads")
    assert choose_threads() == (cpus, "CPUs it may use")
    monkeypatch.setattr(os, "getloadavg", lambda: (float(os.cpu_count()), 0.0, 0.0))
    assert choose_threads()[0] == cpus  # not the load: a seed gives the same run on a busy machine
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads() == (2, "OMP_NUM_THREADS") and choose_threads(cap=1)[0] == 1
