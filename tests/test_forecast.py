"""Predictive scaling on a fake clock: the forecast of synthetic traces (a daily pattern, a
trend, noise, a version that never returns) and what the policy does with it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.contracts import ModelKey
from scaler.config import AutoscalerConfig, ColdStartStrategy, ZeroScalingConfig
from scaler.forecast import forecast_rates
from scaler.policy import Forecast, PolicyState, Snapshot, WorkerInfo, decide

pytestmark = pytest.mark.timeout(60)

KEY = ModelKey("office", "v1")
DAY_MIN = 1440


def office_day(minutes: np.ndarray, peak: float = 2.0) -> np.ndarray:
    """Requests/s: 07:00 to 19:00, nothing at night."""
    hour = (minutes % DAY_MIN) / 60
    return np.where((hour >= 7) & (hour < 19), peak, 0.0)


def counts(rate: np.ndarray, seed: int = 1) -> np.ndarray:
    """Requests per minute: Poisson arrivals at ``rate``."""
    return np.random.default_rng(seed).poisson(rate * 60).astype(float)


def at(history: np.ndarray, minute: int, horizon_min: int = 30) -> np.ndarray:
    return forecast_rates(history[:minute], 60, horizon_min * 60)


def test_a_daily_pattern_is_forecast_before_it_rises_and_nothing_at_night() -> None:
    minutes = np.arange(3 * DAY_MIN)
    history = counts(office_day(minutes))
    day2 = 2 * DAY_MIN
    night = at(history, day2 + 3 * 60)  # 03:00: nothing until 03:30
    assert night.max() < 0.01
    before = at(history, day2 + 6 * 60 + 45)  # 06:45: the 07:00 rise is in the horizon
    assert before[:10].max() < 0.5 and before[-10:].min() > 1.5
    noon = at(history, day2 + 12 * 60)
    assert noon == pytest.approx(np.full(30, 2.0), rel=0.15)


def test_a_trend_is_followed_day_over_day() -> None:
    minutes = np.arange(3 * DAY_MIN)
    growth = 1.2 ** (minutes / DAY_MIN)  # 20% more every day
    history = counts(office_day(minutes, peak=5.0) * growth, seed=2)
    day2 = 2 * DAY_MIN
    forecast = at(history, day2 + 12 * 60)
    truth = 5.0 * 1.2 ** ((day2 + 12 * 60) / DAY_MIN)
    assert forecast.mean() == pytest.approx(truth, rel=0.1)
    yesterday = 5.0 * 1.2 ** ((DAY_MIN + 12 * 60) / DAY_MIN)
    assert forecast.mean() > 1.1 * yesterday  # not yesterday's figure


def test_noise_averages_out() -> None:
    minutes = np.arange(3 * DAY_MIN)
    rng = np.random.default_rng(3)
    noisy = office_day(minutes, peak=1.0) * rng.lognormal(0, 0.5, minutes.size)
    history = counts(noisy, seed=4)
    forecast = at(history, 2 * DAY_MIN + 14 * 60, horizon_min=60)
    mean_rate = float(np.exp(0.5**2 / 2))  # the lognormal's mean
    assert forecast.mean() == pytest.approx(mean_rate, rel=0.3)


def test_a_version_that_never_returns_is_forecast_at_nothing() -> None:
    minutes = np.arange(3 * DAY_MIN)
    rate = np.where(minutes < 2 * DAY_MIN + 10 * 60, office_day(minutes), 0.0)  # stops at 10:00
    history = counts(rate, seed=5)
    forecast = at(history, 2 * DAY_MIN + 11 * 60 + 30)  # 90 minutes later
    assert forecast.sum() * 60 < math.log(2)  # less than an even chance of one request


def test_less_than_a_day_and_an_hour_forecasts_nothing() -> None:
    history = np.full(DAY_MIN, 120.0)  # 2 requests/s for a day: no level hour before it
    assert forecast_rates(history, 60, 600).sum() == 0
    assert forecast_rates([], 60, 600).sum() == 0
    assert forecast_rates(np.full(DAY_MIN + 60, 120.0), 60, 600) == pytest.approx(
        np.full(10, 2.0), rel=0.01
    )


# -- the policy with a forecast ------------------------------------------------------------


def config(**zero: object) -> AutoscalerConfig:
    return AutoscalerConfig(
        target_load_per_instance=10,
        scale_down_stabilization_s=10,
        zero_scaling=ZeroScalingConfig(
            scale_to_zero_delay=60,
            cold_start_strategy=ColdStartStrategy.LAZY,
            prediction_horizon_minutes=30,
            **zero,
        ),
    )


def forecast(rate: float, start: float = 0.0, minutes: int = 30, **kw: float) -> Forecast:
    kw = {"cold_start_s": 5.0, "service_s": 0.1, **kw}
    return Forecast(start=start, step_s=60, rates=(rate,) * minutes, **kw)


def serving(*keys: ModelKey) -> dict[str, WorkerInfo]:
    return {"w0": WorkerInfo("w0", serving=frozenset(keys), loaded=frozenset(keys), managed=True)}


def test_instances_come_up_a_cold_start_ahead_of_a_predicted_rise() -> None:
    cfg = config()
    # Nothing queued; 500 requests/s predicted from now on at 0.1 s each: 50 in flight.
    snapshot = Snapshot(now=0.0, models={KEY: 1}, forecasts={KEY: forecast(500.0)})
    plan, _ = decide(snapshot, cfg, PolicyState())
    assert plan.desired[KEY] == 3  # ceil(50 / 10), capped at max_instances_per_model
    assert "forecast: 500 req/s within 6 s (cold start 5.0 s)" in plan.decisions[0].reason
    # The rise is 20 minutes away: one instance (a request is likely), not three yet.
    later = Forecast(start=0.0, step_s=60, rates=(0.0,) * 20 + (500.0,) * 10)
    plan, _ = decide(Snapshot(now=0.0, models={KEY: 1}, forecasts={KEY: later}), cfg, PolicyState())
    assert plan.desired[KEY] == 1 and "requests within 30 min" in plan.decisions[0].reason


def test_an_idle_version_with_traffic_predicted_back_is_not_taken_to_zero() -> None:
    cfg = config()
    state = PolicyState()
    _, state = decide(
        Snapshot(now=0.0, models={KEY: 1}, queued={KEY: 1}, workers=serving(KEY)), cfg, state
    )
    # Idle for 10 minutes, past the 60 s delay; a request every 10 minutes is predicted.
    back = forecast(1 / 600, start=600.0)
    snapshot = Snapshot(now=600.0, models={KEY: 1}, workers=serving(KEY), forecasts={KEY: back})
    plan, _ = decide(snapshot, cfg, state)
    assert plan.desired[KEY] == 1
    # Without prediction (the flag off), the same tick takes it to zero.
    off = config(enable_predictive_scaling=False)
    plan, _ = decide(snapshot, off, state)
    assert plan.desired[KEY] == 0


def test_a_version_predicted_not_to_return_goes_to_zero() -> None:
    cfg = config()
    state = PolicyState()
    _, state = decide(
        Snapshot(now=0.0, models={KEY: 1}, queued={KEY: 1}, workers=serving(KEY)), cfg, state
    )
    gone = forecast(1 / 36_000, start=600.0)  # one request in ten hours: unlikely in 30 min
    snapshot = Snapshot(now=600.0, models={KEY: 1}, workers=serving(KEY), forecasts={KEY: gone})
    plan, _ = decide(snapshot, cfg, state)
    assert plan.desired[KEY] == 0


def test_a_forecast_does_not_lower_what_the_queue_needs() -> None:
    cfg = config()
    snapshot = Snapshot(now=0.0, models={KEY: 1}, queued={KEY: 25}, forecasts={KEY: forecast(1.0)})
    plan, _ = decide(snapshot, cfg, PolicyState())
    assert plan.desired[KEY] == 3 and "25 requests" in plan.decisions[0].reason


def test_decide_leaves_its_inputs_as_they_were() -> None:
    cfg = config()
    state = PolicyState()
    snap = Snapshot(now=0.0, models={KEY: 1}, queued={KEY: 30}, workers=serving(KEY))
    _, state = decide(snap, cfg, state)
    frozen = {k: list(v.recommendations) for k, v in state.versions.items()}
    for now in (1.0, 2.0, 3.0):
        decide(replace_now(snap, now), cfg, state)
    assert {k: list(v.recommendations) for k, v in state.versions.items()} == frozen


def replace_now(snapshot: Snapshot, now: float) -> Snapshot:
    from dataclasses import replace

    return replace(snapshot, now=now)


def test_the_policy_and_forecasts_import_without_torch() -> None:
    """A pure function of a snapshot: no model code comes with it."""
    import subprocess
    import sys

    code = "import sys, scaler.policy, scaler.forecast; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
