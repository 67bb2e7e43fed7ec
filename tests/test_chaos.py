"""The fault suite's short subset (``python -m bench.chaos --quick``), so that a regression
fails CI: one worker SIGKILLed under load, Redis restarted without persistence (SIGTERM and
SIGKILL), a model raising and a load out of memory on one worker, 200 generated bad inputs,
a full Redis, 25 scale cycles. Each scenario runs its own Redis, beat and workers; every
aim of every scenario must be met. ``make chaos`` runs the whole suite with its counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(900)


def test_the_quick_fault_subset_meets_every_aim(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    # The suite's own settings, not the test session's (its short leases and intervals).
    from tests.conftest import SESSION_ENV

    session = {*SESSION_ENV, "REDIS_URL", "MODEL_REPOSITORY", "MODEL_FACTORY_MODULES"}
    env = {k: v for k, v in os.environ.items() if k not in session}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--quick", "--out", str(out)],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=840,
    )  # fmt: skip
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    tallies = json.loads(out.read_text())
    names = [t["scenario"] for t in tallies]
    assert [n.split(".")[0] for n in names] == ["1", "2", "5a", "5b", "6", "7", "8"], names
    for t in tallies:
        missed = [aim for aim, met in t["aims"].items() if not met]
        notes = "\n".join(t["notes"])
        assert not missed, f"{t['scenario']}: missed {missed}\n{notes}"
        assert t["lost"] == 0 and t["wrong"] == 0 and t["unasked_exits"] == 0, t
    kills, restarts, bad = tallies[0], tallies[1], tallies[4]
    assert kills["faults"] >= 1 and kills["answered"] == kills["sent"] == 400
    assert restarts["faults"] == 2
    assert bad["sent"] >= 200 and bad["answered"] == 0
    assert proc.returncode == 0, proc.stdout[-3000:]
