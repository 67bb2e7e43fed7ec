"""``make bench``: every benchmark, a table, and ``bench/results/latest.json``.

``BENCH_QUICK=1`` shortens every measurement (the whole run stays under two minutes).
"""

from __future__ import annotations

import os
import platform

import torch

from bench import serving
from bench.common import QUICK, print_table, stack_env, temp_dir, write_results


def main() -> None:
    work = temp_dir()
    print(
        f"benchmarks ({'quick' if QUICK else 'full'}) on {platform.machine()}, "
        f"torch {torch.__version__}, logs in {work}"
    )
    rows = []
    with stack_env(work / "repo") as env:
        serving_rows = serving.run(env, work / "repo", work)
        print_table(
            "Serving (1 worker process, 1 torch thread; load generator in another process)",
            serving_rows,
        )
        rows += serving_rows
        # The scaler runs in this process: point its settings at the stack, then import it.
        os.environ.update(env)
        from bench import scaling

        scaling_rows = scaling.run(env, work / "repo")
        print_table(
            "Scaling (local backend; workers started as processes on this host)", scaling_rows
        )
        rows += scaling_rows
        from bench import monitoring

        monitoring_rows = monitoring.run(env, work)
        print_table(
            "Monitoring (metrics recording on/off; the HTTP API against predict.delay)",
            monitoring_rows,
        )
        rows += monitoring_rows
        from bench import balancing

        balancing_rows = balancing.run(env, work)
        print_table(
            "Load balancing (each strategy against the shared queue, same load)", balancing_rows
        )
        rows += balancing_rows
    from bench import predictive

    # No stack: the scaler's policy and forecasts on a replayed week, on a fake clock.
    days = 2 if QUICK else 7
    predictive_rows = predictive.run(days)
    print_table(f"Predictive scaling ({days} generated days, with and without)", predictive_rows)
    rows += predictive_rows
    write_results(rows)
    print("\nwrote bench/results/latest.json")


if __name__ == "__main__":
    main()
