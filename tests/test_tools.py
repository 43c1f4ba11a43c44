"""The benchmark tools run and print their tables (tiny settings; numbers are not asserted)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_meta_step_prints_every_variant():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_meta_step.py"), "--model", "resnet32",
         "--model-options", '{"blocks": 1}', "--batch", "8", "--warmup", "1", "--steps", "1",
         "--repeats", "1", "--methods", "ce,mwnet,l2r", "--format", "markdown"],
        capture_output=True, text=True, timeout=300, check=True)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["ce", "mwnet", "mwnet+famus", "l2r", "l2r+famus"]
    assert "meta batch 8" in proc.stdout
