"""``make demo``'s quick mode, run as a new user runs it (its own embedded Redis, worker
processes started by its scaler), with its summary checked step by step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)


def test_the_quick_demo_shows_every_step(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    # As from a shell: none of this session's settings (its Redis, its repository).
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    done = subprocess.run(
        [sys.executable, "demo_autoscaling.py", "--quick", "--summary-json", str(summary)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=280,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    facts = json.loads(summary.read_text())
    assert "Dashboard (while the demo runs): http://127.0.0.1:" in output
    for step in range(1, 12):
        assert f"\n{step}. " in output, f"step {step} missing:\n{output[-4000:]}"

    assert facts["first_request_s"] > 0
    assert facts["burst_answered"] == facts["burst_sent"]
    assert facts["burst_desired_peak"] >= 2, "the burst added no instance"
    assert facts["standby"] and facts["standby_took_new_instance"], facts
    assert facts["round_robin"] == [100, 100]
    v1, v2 = facts["split"]
    assert v1 + v2 == 200 and 120 <= v1 <= 180, facts["split"]  # 75% of 200, +-6 sigma
    assert facts["health_out"] and facts["health_back"]
    assert facts["failover_recorded"]
    assert facts["failover_answered"] == facts["failover_sent"]
    assert facts["failover_lost"] == 0 and not facts["failover_failed"]
    assert (facts["api_predict"], facts["api_bad_input"], facts["api_unknown_model"]) == (
        200, 422, 404,
    )  # fmt: skip
    assert (facts["dashboard_without_token"], facts["dashboard_with_token"]) == (401, 200)
    assert facts["popular_kept"] == ["tiny_mlp/v1"]
    assert facts["alerts_fired"] and set(facts["alerts_fired"]) <= set(facts["alerts_resolved"])
    assert facts["back_to_zero"] and facts["processes_left"] == []
