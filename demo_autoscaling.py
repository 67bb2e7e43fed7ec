"""``make demo``: the whole stack on the embedded default, with a scripted workload.

Starts a private Redis-compatible server (unless REDIS_URL is set), writes the example
models, runs the scaler (the same loop ``celery -A workers beat`` runs) and the HTTP API
with its dashboard, and walks through what the project does, one step at a time: a first
request from zero, a burst and instances added, the warm standby, round robin, a traffic
split between two versions, a health probe turning sick and back, a worker SIGKILLed with
nothing lost, the HTTP API, popularity keeping a model loaded while the rest goes to zero,
alerts firing and resolving, and back to zero with no worker process left. It prints a
timeline, the scaling decisions, the alerts and the metrics of the run, and a summary.

``--quick`` runs the same steps with less traffic (``make test`` runs it and checks the
summary); ``--summary-json PATH`` writes the summary's figures; ``--screenshot PATH`` saves
the dashboard as Chromium draws it after the failover step (Playwright and Debian's
chromium needed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

WORK = Path(tempfile.mkdtemp(prefix="inference-demo-"))
SICK = WORK / "flaky-is-sick"
CHROMIUM = "/usr/bin/chromium"

# Requests per step: the full demo, and --quick.
SIZES = {
    "full": {"burst": 20000, "round_robin": 600, "split": 400, "failover": 10000},
    "quick": {"burst": 6000, "round_robin": 200, "split": 200, "failover": 3000},
}


def prepare_environment() -> Any:
    """Start the embedded server and point every setting at it, before the app is imported."""
    from common.redis import EmbeddedRedis

    server = None
    if not os.environ.get("REDIS_URL"):
        server = EmbeddedRedis().start()
        os.environ["REDIS_URL"] = server.url
    os.environ.setdefault("MODEL_REPOSITORY", str(WORK / "models"))
    os.environ.setdefault("WORKER_TORCH_THREADS", "1")
    os.environ.setdefault("WORKER_REPORT_INTERVAL_S", "0.5")
    return server


class Timeline:
    """Samples instances and queue depth in the background and shows a progress line."""

    def __init__(self, autoscaler: Any) -> None:
        self.autoscaler = autoscaler
        self.rows: list[tuple[float, str, dict[str, int], dict[str, int], int]] = []
        self.phase = "starting"
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.tty = sys.stdout.isatty()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        print()

    def step(self, phase: str, explanation: str) -> None:
        """A new step: its one-line explanation, then the progress line follows it."""
        self.phase = phase
        prefix = "\r" + " " * 140 + "\r" if self.tty else ""
        print(f"{prefix}\n{phase}: {explanation}", flush=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            stats = self.autoscaler.get_stats()
            instances = {k: v for k, v in stats["active_instances"].items() if v}
            queued = stats["queued"]
            workers = len(stats["workers"])
            t = time.monotonic() - self.started
            self.rows.append((t, self.phase, instances, queued, workers))
            shown = " ".join(f"{k}={v}" for k, v in sorted(instances.items())) or "none"
            depth = sum(queued.values())
            line = f"  [{t:5.1f}s] workers={workers} queued={depth:<5} instances: {shown}"
            if self.tty:
                sys.stdout.write("\r" + line[:140].ljust(140))
                sys.stdout.flush()
            elif phase_changed := (not self.rows[:-1] or self.rows[-2][1] != self.phase):
                print(line, flush=phase_changed)

    def print_table(self) -> None:
        print("\nTimeline (every second)")
        print(f"{'t (s)':>6}  {'step':22} {'workers':>7} {'queued':>7}  instances")
        last = -1.0
        for t, phase, instances, queued, workers in self.rows:
            if t - last < 0.99:
                continue
            last = t
            shown = ", ".join(f"{k}={v}" for k, v in sorted(instances.items())) or "-"
            print(f"{t:6.1f}  {phase:22} {workers:>7} {sum(queued.values()):>7}  {shown}")


class Api:
    """The HTTP API (``python -m api``'s app) served in this process on a free port."""

    def __init__(self) -> None:
        import uvicorn

        from api.app import create_app
        from common.redis import free_port
        from common.settings import ApiSettings

        self.token = secrets.token_urlsafe(16)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(ApiSettings(token=self.token, port=self.port))
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="api", daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the HTTP API did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)


async def wait_until(condition: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        await asyncio.sleep(0.2)
    return None


def reported_since(autoscaler: Any, since: float) -> bool:
    reports = autoscaler.store.live_reports()
    return bool(reports) and all(float(r.get("time", 0)) >= since for r in reports.values())


def served_by_worker(autoscaler: Any) -> dict[str, int]:
    reports = autoscaler.store.live_reports()
    return {name: int(r.get("served", 0)) for name, r in reports.items()}


def standby_workers(autoscaler: Any) -> list[str]:
    workers = autoscaler.get_stats()["workers"]
    return [
        n for n, w in workers.items() if w["managed"] and not w["starting"] and not w["serving"]
    ]


def settled(autoscaler: Any, label: str, n: int) -> bool:
    """``n`` instances of ``label`` wanted, serving, loaded and routable, nothing else."""
    stats = autoscaler.get_stats()
    serving = {w for w, s in stats["workers"].items() if label in s["serving"]}
    loaded = {w for w, s in stats["workers"].items() if label in s["loaded"]}
    routable = set(autoscaler.routable_instances(*label.split("/")))
    return (
        stats["desired_instances"].get(label) == n
        and serving == loaded == routable
        and (len(routable) == n)
    )


def flaky_health(autoscaler: Any) -> dict[str, dict[str, Any]]:
    return dict(autoscaler.get_health_status()["instances"].get("flaky/v1", {}))


def worker_processes_left() -> list[str]:
    """This process's children that are worker processes (the embedded server excepted)."""
    import psutil

    left = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.is_running() and "redis" not in child.name():
                left.append(f"{child.pid} {' '.join(child.cmdline()[:4])}")
        except psutil.NoSuchProcess:
            continue
    return left


class Demo:
    def __init__(self, autoscaler: Any, api: Api, sizes: dict[str, int]) -> None:
        import numpy as np

        self.autoscaler = autoscaler
        self.api = api
        self.n = sizes
        self.timeline = Timeline(autoscaler)
        self.summary: list[str] = []
        self.facts: dict[str, Any] = {}
        self.alerts: list[tuple[str, str]] = []
        self.rng = np.random.default_rng(0)
        self.inputs = self.rng.standard_normal((16, 64)).astype(np.float32)
        autoscaler.add_alert_callback(lambda key, message: self.alerts.append((key, message)))

    def say(self, line: str, **facts: Any) -> None:
        self.summary.append(line)
        self.facts.update(facts)

    async def collect(self, results: list[Any], timeout_s: float = 120) -> dict[str, Any]:
        """Celery results: answered, failed (by error type) and lost (no answer in time)."""

        def get_all() -> dict[str, Any]:
            counts: dict[str, Any] = {"answered": 0, "failed": {}, "lost": 0}
            for result in results:
                try:
                    result.get(timeout=timeout_s)
                    counts["answered"] += 1
                except Exception as exc:
                    if "Timeout" in type(exc).__name__:
                        counts["lost"] += 1
                    else:
                        failed = counts["failed"]
                        failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1
            return counts

        return await asyncio.to_thread(get_all)

    # -- the steps ----------------------------------------------------------------------------
    async def from_zero(self) -> None:
        self.timeline.step(
            "1. from zero", "no worker runs; the first request makes the scaler start one"
        )
        t0 = time.monotonic()
        await self.autoscaler.predict("tiny_mlp", self.inputs[0])
        took = time.monotonic() - t0
        self.say(
            f"tiny_mlp's first request from zero answered in {took:.2f} s "
            "(a worker process started and loaded the model)",
            first_request_s=round(took, 3),
        )

    async def burst(self) -> None:
        from tasks import predict

        n = self.n["burst"]
        self.timeline.step(
            "2. burst", f"{n} requests at once; the scaler adds instances for the queue"
        )
        t0 = time.monotonic()
        results = [predict.delay("tiny_mlp", self.inputs[i % 16]) for i in range(n)]
        counts = await self.collect(results)
        took = time.monotonic() - t0
        ups = [
            d["to"]
            for d in self.autoscaler.store.decisions(100)
            if d["model"] == "tiny_mlp" and d["to"] > d["from"]
        ]
        peak = max((row[2].get("tiny_mlp/v1", 0) for row in self.timeline.rows), default=0)
        self.say(
            f"burst of {n}: {counts['answered']} answered in {took:.2f} s; the scaler asked for "
            f"up to {max(ups, default=1)} tiny_mlp instances ({peak} seen serving)",
            burst_answered=counts["answered"],
            burst_sent=n,
            burst_desired_peak=max(ups, default=1),
        )

    async def warm_standby(self) -> None:
        autoscaler = self.autoscaler
        self.timeline.step(
            "3. warm standby",
            "HYBRID keeps an idle worker with torch imported: a new instance skips process start",
        )

        def ready() -> list[str] | None:
            one = autoscaler.get_stats()["active_instances"].get("tiny_mlp/v1") == 1
            return standby_workers(autoscaler) if one else None

        standby = await wait_until(ready, 60) or []
        t0 = time.monotonic()
        await autoscaler.scale_model("tiny_mlp", 2)
        await wait_until(lambda: settled(autoscaler, "tiny_mlp/v1", 2), 60)
        took = time.monotonic() - t0
        serving = autoscaler.routable_instances("tiny_mlp")
        used = bool(set(standby) & set(serving))
        self.say(
            f"tiny_mlp's second instance serving {took:.2f} s after it was asked for, on "
            f"{', '.join(serving)} (the warm standby was {', '.join(standby) or 'not ready'})",
            standby=standby,
            standby_took_new_instance=used,
            standby_second_instance_s=round(took, 3),
        )

    async def round_robin(self) -> None:
        from scaler import LoadBalancingStrategy
        from tasks import predict

        n = self.n["round_robin"]
        self.timeline.step(
            "4. round robin", f"two tiny_mlp instances, {n} requests dealt to each in turn"
        )
        autoscaler = self.autoscaler
        await autoscaler.set_load_balancing("tiny_mlp", LoadBalancingStrategy.ROUND_ROBIN)
        # Reports lag: count from reports written after the burst.
        since = time.time()
        await wait_until(lambda: reported_since(autoscaler, since), 10)
        before = served_by_worker(autoscaler)
        results = [predict.delay("tiny_mlp", self.inputs[i % 16]) for i in range(n)]
        await self.collect(results)
        await wait_until(
            lambda: sum(served_by_worker(autoscaler).values()) - sum(before.values()) >= n, 10
        )
        after = served_by_worker(autoscaler)
        shares = sorted(after[w] - before.get(w, 0) for w in after if after[w] > before.get(w, 0))
        self.say(f"round robin: {n} tiny_mlp requests split {shares}", round_robin=shares)
        await autoscaler.set_load_balancing("tiny_mlp", None)

    async def traffic_split(self) -> None:
        import numpy as np

        from tasks import predict

        n = self.n["split"]
        self.timeline.step(
            "5. traffic split", f"linear v1 and v2 side by side, {n} requests split 75 / 25"
        )
        x = [1.0] * 8
        v1 = np.asarray(await self.autoscaler.predict("linear", x, version="v1"))
        v2 = np.asarray(await self.autoscaler.predict("linear", x, version="v2"))
        await self.autoscaler.set_traffic_split("linear", {"v1": 75, "v2": 25})
        results = [predict.delay("linear", x) for _ in range(n)]
        outputs = await asyncio.to_thread(lambda: [np.asarray(r.get(timeout=120)) for r in results])
        by_v1 = sum(bool(np.allclose(o, v1)) for o in outputs)
        by_v2 = sum(bool(np.allclose(o, v2)) for o in outputs)
        await self.autoscaler.set_traffic_split("linear", None)
        self.say(
            f"traffic split 75/25: {by_v1} requests answered by linear/v1, {by_v2} by v2 "
            "(told apart by their outputs)",
            split=[by_v1, by_v2],
        )

    async def health_probe(self) -> None:
        autoscaler = self.autoscaler
        self.timeline.step(
            "6. health probe",
            "flaky/v1 turns sick: failed probes take it out of routing; the cooldown brings it "
            "back",
        )
        await autoscaler.scale_model("flaky", 1)
        await autoscaler.predict("flaky", [1.0, 2.0, 3.0, 4.0])
        await wait_until(lambda: autoscaler.routable_instances("flaky"), 60)
        SICK.touch()
        t0 = time.monotonic()
        sick = await wait_until(
            lambda: [
                (name, h)
                for name, h in flaky_health(autoscaler).items()
                if h["state"] == "unhealthy" and not h["routable"]
            ],
            30,
        )
        out_s = time.monotonic() - t0
        SICK.unlink()
        back = await wait_until(
            lambda: [
                name
                for name, h in flaky_health(autoscaler).items()
                if h["state"] == "healthy" and h["routable"]
            ],
            60,
        )
        back_s = time.monotonic() - t0
        answer = await autoscaler.predict("flaky", [1.0, 2.0, 3.0, 4.0])
        await autoscaler.scale_model("flaky", None)
        if sick:
            name, h = sick[0]
            line = (
                f"flaky/v1 on {name} out of routing {out_s:.1f} s after it turned sick "
                f"({h['failures']} failed probes: {h['reason']}); "
            )
        else:
            line = "flaky/v1 was never taken out of routing; "
        if back:
            # The scaler may have placed a replacement on another worker meanwhile.
            line += f"healthy and routable again on {', '.join(back)} after {back_s:.1f} s"
        else:
            states = {n: (h["state"], h["routable"]) for n, h in flaky_health(autoscaler).items()}
            line += f"not back within 60 s (instances: {states})"
        self.say(
            line + f", then answered {list(answer)}",
            health_out=bool(sick),
            health_back=bool(back),
        )

    async def failover(self) -> None:
        from tasks import predict

        n = self.n["failover"]
        autoscaler = self.autoscaler
        self.timeline.step(
            "7. failover",
            f"{n} requests published; a tiny_mlp worker is SIGKILLed: its requests go elsewhere",
        )
        await autoscaler.scale_model("tiny_mlp", 2)
        await wait_until(lambda: settled(autoscaler, "tiny_mlp/v1", 2), 60)
        results: list[Any] = []

        def publish() -> None:
            for i in range(n):
                results.append(predict.delay("tiny_mlp", self.inputs[i % 16]))

        sender = threading.Thread(target=publish)
        sender.start()
        await wait_until(lambda: len(results) >= n // 4, 30)
        victim = autoscaler.routable_instances("tiny_mlp")[0]
        fleet = {r["hostname"]: r for r in map(json.loads, self._fleet().values())}
        os.kill(int(fleet[victim]["pid"]), signal.SIGKILL)
        t0 = time.monotonic()
        await asyncio.to_thread(sender.join)
        counts = await self.collect(results)
        took = time.monotonic() - t0

        def recorded() -> list[str]:  # the scaler's decision once the heartbeat is missed
            return [
                d["reason"]
                for d in autoscaler.store.decisions(50)
                if f"worker {victim} gone" in d["reason"]
            ]

        moved = await wait_until(recorded, 30)
        self.say(
            f"SIGKILLed {victim} mid-flow; the scaler: {moved[0] if moved else 'no record'}; "
            f"{counts['answered']} of {n} answered within {took:.1f} s of the kill, "
            f"failed {counts['failed'] or 0}, lost {counts['lost']}",
            failover_sent=n,
            failover_answered=counts["answered"],
            failover_failed=counts["failed"],
            failover_lost=counts["lost"],
            failover_recorded=bool(moved),
        )
        await autoscaler.scale_model("tiny_mlp", None)

    def _fleet(self) -> dict[bytes, bytes]:
        from common import keys

        return dict(self.autoscaler.store.client.hgetall(keys.FLEET))

    async def http_api(self) -> None:
        import httpx

        self.timeline.step(
            "8. HTTP API", "POST /predict queues like predict.delay; bad input is refused at once"
        )
        async with httpx.AsyncClient(base_url=self.api.url, timeout=60) as http:
            ok = await http.post(
                "/predict", json={"model": "tiny_mlp", "inputs": self.inputs[0].tolist()}
            )
            bad = await http.post("/predict", json={"model": "tiny_mlp", "inputs": [1.0, 2.0]})
            unknown = await http.post("/predict", json={"model": "nope", "inputs": [1.0]})
            refused = await http.get("/dashboard")
            page = await http.get(
                "/dashboard", headers={"Authorization": f"Bearer {self.api.token}"}
            )
            window = (await http.get("/autoscaler/metrics?window_seconds=600")).json()
        latency = ok.json().get("latency_ms") if ok.status_code == 200 else None
        self.say(
            f"POST /predict -> {ok.status_code} in {latency} ms; wrong shape -> {bad.status_code} "
            f"({bad.json()['detail'][0]['msg']}); unknown model -> {unknown.status_code}; "
            f"/dashboard without the token -> {refused.status_code}, with it -> "
            f"{page.status_code}; /autoscaler/metrics counts {window['requests']} requests",
            api_predict=ok.status_code,
            api_bad_input=bad.status_code,
            api_unknown_model=unknown.status_code,
            dashboard_without_token=refused.status_code,
            dashboard_with_token=page.status_code,
        )

    async def popularity(self, delay_s: float) -> None:
        autoscaler = self.autoscaler
        self.timeline.step(
            "9. popularity",
            f"idle: after {delay_s:g} s versions go to zero, but a popular one stays loaded",
        )

        def only_popular_left() -> bool:
            active = {k: v for k, v in autoscaler.get_stats()["active_instances"].items() if v}
            return active == {"tiny_mlp/v1": 1}

        kept = await wait_until(only_popular_left, 90)
        # Still there once its own idle time is past the delay: kept, not just late.
        await asyncio.sleep(delay_s + 1.5)
        kept = kept and only_popular_left()
        score = autoscaler.get_metrics(60)["popularity"].get("tiny_mlp/v1", 0.0)
        threshold = autoscaler.config.zero_scaling.popularity_threshold
        self.say(
            f"idle versions went to zero after scale_to_zero_delay ({delay_s:g} s); tiny_mlp/v1 "
            f"stayed at 1 instance past it: popular (score {score:.0f} >= {threshold:g})"
            if kept
            else "the idle versions did not reach zero, or tiny_mlp/v1 was not kept",
            popular_kept=["tiny_mlp/v1"] if kept else [],
        )

    async def alerts_resolve(self) -> None:
        self.timeline.step(
            "10. alerts", "rules checked every tick over a short window: fired, then resolved"
        )
        cleared = await wait_until(lambda: not self.autoscaler.get_alerts()["active"] or None, 60)
        fired = sorted({key for key, message in self.alerts if not message.startswith("resolved")})
        resolved = sorted({key for key, message in self.alerts if message.startswith("resolved")})
        self.say(
            f"alerts fired: {', '.join(fired) or 'none'}; resolved: {', '.join(resolved) or 'none'}"
            + ("" if cleared else " (some still firing)"),
            alerts_fired=fired,
            alerts_resolved=resolved,
        )

    async def back_to_zero(self) -> None:
        autoscaler = self.autoscaler
        self.timeline.step(
            "11. back to zero", "tiny_mlp unloaded by hand: no model and no worker process left"
        )
        await autoscaler.unload_model("tiny_mlp")
        t0 = time.monotonic()
        empty = await wait_until(lambda: not autoscaler.get_stats()["workers"], 60)
        self.say(
            f"every model at zero and no worker process left {time.monotonic() - t0:.1f} s later"
            if empty
            else "the fleet did not reach zero within 60 s",
            back_to_zero=bool(empty),
        )


async def run(quick: bool, screenshot: Path | None) -> Demo:
    from loader.examples import write_examples, write_flaky
    from scaler import Autoscaler, AutoscalerConfig, ColdStartStrategy, ZeroScalingConfig
    from scaler.config import ModelLoaderConfig

    repository = os.environ["MODEL_REPOSITORY"]
    write_examples(repository)
    write_flaky(repository, SICK)
    delay = 4.0 if quick else 6.0
    config = AutoscalerConfig(
        tick_interval_s=0.5,
        scale_down_stabilization_s=3.0,
        target_load_per_instance=64,
        max_workers=4,
        alert_window_seconds=10,
        # Short, and a low latency bar: the demo's short bursts raise alerts that resolve.
        alert_for_seconds=1,
        alert_thresholds={**AutoscalerConfig().alert_thresholds, "average_response_time_ms": 100},
        zero_scaling=ZeroScalingConfig(
            scale_to_zero_delay=delay,
            cold_start_strategy=ColdStartStrategy.HYBRID,
            preload_popular_models=True,
            # tiny_mlp's traffic makes it popular; the other versions get far less
            popularity_threshold=1000,
        ),
        model_loading=ModelLoaderConfig(
            health_check_interval_seconds=0.5,
            max_consecutive_failures=2,
            failure_cooldown_seconds=3,
        ),
    )
    autoscaler = Autoscaler(config)
    api = Api()
    demo = Demo(autoscaler, api, SIZES["quick" if quick else "full"])
    await autoscaler.start()
    api.start()
    print(f"Dashboard (while the demo runs): {api.url}/dashboard?token={api.token}")
    print(f"HTTP API: {api.url}/docs (management token: {api.token})")
    demo.timeline.start()
    try:
        await demo.from_zero()
        await demo.burst()
        await demo.warm_standby()
        await demo.round_robin()
        await demo.traffic_split()
        await demo.health_probe()
        await demo.failover()
        if screenshot is not None:
            await asyncio.to_thread(take_screenshot, api, screenshot)
        await demo.http_api()
        await demo.popularity(delay)
        await demo.alerts_resolve()
        await demo.back_to_zero()
    finally:
        demo.timeline.stop()
        api.stop()
        await autoscaler.stop(stop_workers=True)
    left = worker_processes_left()
    demo.say(
        "no process of the demo left but its Redis" if not left else f"processes left: {left}",
        processes_left=left,
    )
    demo.facts["alerts"] = [f"{k}: {m}" for k, m in demo.alerts]
    report(demo)
    return demo


def take_screenshot(api: Api, path: Path) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("no screenshot: playwright is not installed")
        return
    if not os.access(CHROMIUM, os.X_OK):
        print(f"no screenshot: no Chromium at {CHROMIUM}")
        return
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1500})
        page.goto(f"{api.url}/dashboard?token={api.token}")
        page.wait_for_function("window.dashboard.polls >= 2", timeout=30_000)
        page.screenshot(path=str(path), full_page=True)
        browser.close()
    print(f"\ndashboard screenshot: {path}")


def report(demo: Demo) -> None:
    autoscaler = demo.autoscaler
    demo.timeline.print_table()
    print("\nScaling decisions")
    offset = time.time() - (time.monotonic() - demo.timeline.started)
    for d in reversed(autoscaler.store.decisions(100)):
        print(
            f"  {d['time'] - offset:6.1f}s  {d['model']}/{d['version']}: "
            f"{d['from']} -> {d['to']}  ({d['reason']})"
        )
    print_metrics(autoscaler.get_metrics(int(time.monotonic() - demo.timeline.started) + 5))
    print("\nAlerts raised")
    for key, message in demo.alerts or [("none", "")]:
        print(f"  - {key}: {message}")
    print("\nSummary")
    for line in demo.summary:
        print(f"  - {line}")


def print_metrics(m: dict[str, Any]) -> None:
    print(f"\nMetrics of the run (last {m['window_seconds']} s, from the history in Redis)")
    print(
        f"  requests {m['requests']}, errors {m['errors']}, "
        f"{m['requests_per_second']} requests/s on average; "
        f"scale-ups {m['scale_up_events']} (cold starts {m['cold_starts']}), "
        f"scale-downs {m['scale_down_events']}"
    )
    print(f"  {'model':16} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'batch':>6} {'loads':>5} {'load ms':>8} {'cold':>4} {'cold ms':>8}")  # fmt: skip
    for model, s in m["models"].items():
        print(
            f"  {model:16} {s['requests']:>8} {s['errors']:>6} "
            f"{s['p50_response_time_ms'] or 0:>8.2f} {s['p99_response_time_ms'] or 0:>8.2f} "
            f"{s['average_batch_size'] or 0:>6.1f} {s['model_loads']:>5} "
            f"{s['average_load_time_ms'] or 0:>8.0f} {s['cold_starts']:>4} "
            f"{s['average_cold_start_ms'] or 0:>8.0f}"
        )
    print(
        f"  workers: CPU {m['cpu_usage_percent']}% on average, RSS {m['memory_rss_bytes']} "
        f"bytes, GPU: {m['gpu']}"
    )


def succeeded(facts: dict[str, Any]) -> bool:
    return bool(facts.get("back_to_zero")) and not facts.get("processes_left")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="less traffic (make test's run)")
    parser.add_argument("--summary-json", type=Path, help="write the summary's figures here")
    parser.add_argument("--screenshot", type=Path, help="save the dashboard as drawn here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    server = prepare_environment()
    print(
        f"Redis: {os.environ['REDIS_URL']} ({'embedded' if server else 'REDIS_URL'}); "
        f"models and logs in {WORK}"
    )
    try:
        demo = asyncio.run(run(args.quick, args.screenshot))
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    if args.summary_json:
        args.summary_json.write_text(json.dumps(demo.facts, indent=2) + "\n")
    return 0 if succeeded(demo.facts) else 1


if __name__ == "__main__":
    sys.exit(main())
