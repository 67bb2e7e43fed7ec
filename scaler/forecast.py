"""Request-rate forecasts for predictive scaling, from a version's per-minute history.

The method is the seasonal naive forecast (Hyndman & Athanasopoulos, *Forecasting:
Principles and Practice*, 3rd ed., section 5.2) with a multiplicative level correction:

- the daily profile: for each future minute, the mean request count at the same time of
  day over the days the learning window holds, smoothed over a quarter of an hour (noise
  and a slightly early or late morning do not make a forecast miss);
- the level: the last hour's requests against the profile's for the same hour, a ratio
  that follows a trend (a service growing 10% a day forecasts 10% more than yesterday) and
  falls to zero for a version whose traffic stopped;
- the forecast: profile times level, as requests per second per minute of the horizon.

Why this and not Holt-Winters or a fitted model: it learns from one day of history (the
default ``learning_window_hours`` of 24; Holt-Winters needs two seasons to start), has no
parameters to fit or to go wrong, costs a few array operations per version once a minute,
and needs no dependency beyond numpy. With less than a day and an hour of history there is
no forecast (nothing): the scaler acts on its queues alone until it has learned a day.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DAY_S = 86_400
# The profile is averaged over this many seconds around each minute.
SMOOTH_S = 900
# The level compares this many recent seconds with the same time on earlier days.
LEVEL_S = 3_600
# The level's prior, in requests: with none in the last hour and none on earlier days
# the level is 1 (yesterday's shape), not undefined.
PRIOR = 1.0
MAX_LEVEL = 4.0


def forecast_rates(
    counts: Sequence[float],
    step_s: int,
    horizon_s: float,
    *,
    season_s: int = DAY_S,
) -> np.ndarray:
    """Requests/s per step over the next ``horizon_s`` from ``counts``: requests per step,
    oldest first, the last one the step that just ended."""
    history = np.asarray(counts, dtype=float)
    ahead = max(1, int(np.ceil(horizon_s / step_s)))
    season = season_s // step_s
    level_n = max(1, LEVEL_S // step_s)
    if history.size < season + level_n:
        return np.zeros(ahead)  # not a whole season and its level yet: nothing learned
    half = max(0, SMOOTH_S // step_s // 2)
    smoothed = np.convolve(history, np.ones(2 * half + 1) / (2 * half + 1), mode="same")
    n = history.size
    # Same time of day on each earlier day: for the last hour (the level) and the horizon.
    future = np.arange(n, n + ahead)
    recent = np.arange(n - level_n, n)
    days = np.arange(1, n // season + 1)
    profile = _seasonal_mean(smoothed, future, days, season)
    past = _seasonal_mean(history, recent, days, season)
    level = (history[recent].sum() + PRIOR) / (past.sum() + PRIOR)
    return np.clip(profile * min(level, MAX_LEVEL), 0.0, None) / step_s


def _seasonal_mean(values: np.ndarray, at: np.ndarray, days: np.ndarray, season: int) -> np.ndarray:
    """Mean of ``values`` at ``at`` minus whole seasons, over the days that exist."""
    index = at[None, :] - days[:, None] * season
    valid = (index >= 0) & (index < values.size)
    taken = np.where(valid, values[np.clip(index, 0, values.size - 1)], 0.0)
    return taken.sum(axis=0) / np.maximum(valid.sum(axis=0), 1)
