"""Counted fault injection: ``python -m bench.chaos [--quick] [--only 1,4]`` (``make chaos``).

Each scenario runs the real stack on a Redis of its own (the beat scaler with the local
backend, worker processes it starts, producer processes calling ``predict.delay``), injects
faults while requests flow, and counts: requests sent, answered correctly, failed with a
typed error (by type), lost (accepted by ``delay()``, neither answered nor failed by the
caller's timeout), executed twice (from the model's execution log), answers that reached a
caller a second time, the longest wait of an answered request, and worker, scaler or API
process exits nobody asked for. Results go to ``bench/results/chaos.json``.

``--quick`` runs the short subset that ``make test`` holds (one worker kill, one Redis
restart, 200 bad inputs).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.chaos_models import write_model
from bench.common import wait_for
from common import keys
from common.redis import EmbeddedRedis, die_with_parent, free_port
from scaler.processes import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "bench" / "results" / "chaos.json"
# The subset ``make test`` runs (``--quick``): one worker kill, one Redis restart of each
# kind without persistence, 200 bad inputs, the failing models, a full Redis, 25 cycles.
QUICK = ["1", "2", "5", "6", "7", "8"]
CALL_TIMEOUT_S = 60.0
SCALER = {
    "tick_interval_s": 0.5,
    "max_workers": 3,
    "target_load_per_instance": 64,
    "scale_down_stabilization_s": 5.0,
    "worker_start_timeout_s": 60,
    "leader_ttl_s": 3.0,
    "zero_scaling": {"scale_to_zero_delay": 60.0, "cold_start_strategy": "lazy",
                     "preload_popular_models": False},
    "model_loading": {"min_instances_per_model": 0, "failure_cooldown_seconds": 5},
}  # fmt: skip


@dataclass
class Tally:
    """One scenario's counts (one row of the table)."""

    scenario: str
    sent: int = 0
    answered: int = 0
    wrong: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    executed_twice: int = 0
    second_answers: int = 0
    longest_wait_s: float = 0.0
    unasked_exits: int = 0
    faults: int = 0
    aims: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, outcomes: dict[str, Any]) -> None:
        self.sent += outcomes["sent"]
        self.answered += outcomes["answered"]
        self.wrong += outcomes["wrong"]
        for name, n in outcomes["errors"].items():
            self.errors[name] = self.errors.get(name, 0) + n
        self.lost += outcomes["lost"]
        self.second_answers += outcomes["unclaimed"]
        self.longest_wait_s = max(self.longest_wait_s, outcomes["longest_wait_s"])

    def aim(self, name: str, met: bool) -> None:
        self.aims[name] = bool(met)

    @property
    def passed(self) -> bool:
        return all(self.aims.values())


# -- producers ------------------------------------------------------------------------------
def produce(spec: dict[str, Any]) -> dict[str, Any]:
    """One producer process: ``count`` requests from id ``first``, ``threads`` callers each
    sending and waiting in turn, paced to ``rate`` requests a second (0: as fast as they
    are answered). The answer's first value must be the request's id."""
    import numpy as np
    from celery.exceptions import TimeoutError as CeleryTimeoutError

    from common.errors import RequestLostError
    from tasks import predict
    from tasks.replies import replies_for

    first, count, rate = spec["first"], spec["count"], spec.get("rate", 0.0)
    timeout = spec.get("timeout", CALL_TIMEOUT_S)
    lock = threading.Lock()
    ids = iter(range(first, first + count))
    records: list[tuple[int, float, str, float]] = []
    start = time.time() + 0.2
    started = threading.Event()

    def caller() -> None:
        while True:
            with lock:
                i = next(ids, None)
            if i is None:
                return
            if rate:
                time.sleep(max(0.0, start + (i - first) / rate - time.time()))
            x = np.zeros(64, np.float32)
            x[0], x[1] = i, -1.0 if i in spec.get("negative", ()) else 1.0
            sent = time.time()
            try:
                result = predict.delay(spec["model"], x)
            except Exception as exc:
                records.append((i, sent, f"{type(exc).__name__} at delay()", 0.0))
                continue
            if not started.is_set():
                started.set()
                Path(spec["out"] + ".started").touch()
            try:
                out = result.get(timeout=timeout)
                outcome = "answered" if int(out[0]) == i else "wrong"
            except RequestLostError:
                outcome = "RequestLostError"
            except CeleryTimeoutError:
                outcome = "lost"
            except Exception as exc:
                outcome = type(exc).__name__
            records.append((i, sent, outcome, time.time() - sent))

    if spec.get("send_first"):
        return send_first(spec, predict)
    threads = [threading.Thread(target=caller) for _ in range(spec.get("threads", 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"records": records, "unclaimed": replies_for().unclaimed}


def send_first(spec: dict[str, Any], predict: Any) -> dict[str, Any]:
    """Every request sent before any answer is awaited (a queue that fills); a file beside
    the output says when all were sent."""
    import numpy as np
    from celery.exceptions import TimeoutError as CeleryTimeoutError

    from tasks.replies import replies_for

    first, count = spec["first"], spec["count"]
    records: list[tuple[int, float, str, float]] = []
    pending = []
    for i in range(first, first + count):
        x = np.zeros(64, np.float32)
        x[0], x[1] = i, 1.0
        sent = time.time()
        try:
            pending.append((i, sent, predict.delay(spec["model"], x)))
        except Exception as exc:
            records.append((i, sent, f"{type(exc).__name__} at delay()", 0.0))
    Path(spec["out"] + ".sent").write_text(str(len(pending)))
    for i, sent, result in pending:
        try:
            out = result.get(timeout=spec.get("timeout", CALL_TIMEOUT_S))
            outcome = "answered" if int(out[0]) == i else "wrong"
        except CeleryTimeoutError:
            outcome = "lost"
        except Exception as exc:
            outcome = type(exc).__name__
        records.append((i, sent, outcome, time.time() - sent))
    return {"records": records, "unclaimed": replies_for().unclaimed}


def summarize(records: list[tuple[int, float, str, float]], unclaimed: int) -> dict[str, Any]:
    counts = collections.Counter(outcome for _, _, outcome, _ in records)
    answered_waits = [wait for _, _, outcome, wait in records if outcome == "answered"]
    return {
        "sent": len(records),
        "answered": counts.pop("answered", 0),
        "wrong": counts.pop("wrong", 0),
        "lost": counts.pop("lost", 0),
        "errors": dict(counts),
        "unclaimed": unclaimed,
        "longest_wait_s": round(max(answered_waits, default=0.0), 3),
    }


# -- the stack ------------------------------------------------------------------------------
class Stack:
    """A Redis of its own, a repository of the fault models, the beat scaler (local
    backend) and what it starts; producers and an API on demand. Watches every worker
    process of its Redis and counts the exits nobody asked for."""

    def __init__(
        self,
        root: Path,
        name: str,
        *,
        redis_args: list[str] | None = None,
        scaler: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.repo = self.dir / "repo"
        self.log = self.dir / "executions.log"
        write_model(self.repo, "echo", "echo_mlp", log_path=str(self.log))
        self.server = EmbeddedRedis(extra_args=["--save", "", *(redis_args or [])]).start()
        self.env = {
            "REDIS_URL": self.server.url,
            "MODEL_REPOSITORY": str(self.repo),
            "MODEL_FACTORY_MODULES": "bench.chaos_models",
            "WORKER_TORCH_THREADS": "1",
            "PYTHONPATH": str(PROJECT_ROOT),
            **(env or {}),
        }
        config = json.loads(json.dumps(SCALER))
        for section, value in (scaler or {}).items():
            if isinstance(value, dict):
                config.setdefault(section, {}).update(value)
            else:
                config[section] = value
        (self.dir / "scaler.json").write_text(json.dumps(config))
        self.client = redis.Redis.from_url(self.server.url)
        self.beat: subprocess.Popen[bytes] | None = None
        self.beats = 0
        self.produced = 0
        self.api: subprocess.Popen[bytes] | None = None
        self.api_url = ""
        self.killed: set[int] = set()
        self.closing = False
        self.monitor = Monitor(self)

    # processes
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            return subprocess.Popen(
                [sys.executable, *argv], cwd=PROJECT_ROOT, env={**os.environ, **self.env, **env},
                preexec_fn=die_with_parent,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            log.close()

    def start_beat(self) -> None:
        self.beats += 1
        self.beat = self._spawn(
            f"beat{self.beats}",
            ["-m", "celery", "-A", "workers", "beat", "--loglevel", "INFO",
             "-s", str(self.dir / f"beat{self.beats}-schedule")],
            {"SCALER_CONFIG_FILE": str(self.dir / "scaler.json"), "SCALER_LOG_DIR": str(self.dir)},
        )  # fmt: skip
        wait_for(lambda: self.client.exists(keys.SCALER_STATUS), 60, "the scaler's first tick")

    def kill_beat(self) -> None:
        assert self.beat is not None
        self.killed.add(self.beat.pid)
        self.beat.kill()
        self.beat.wait(10)

    def start_api(self, token: str) -> None:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.api = self._spawn("api", ["-m", "api"], {"API_PORT": str(port), "API_TOKEN": token})
        import httpx

        def up() -> bool:
            try:
                return httpx.get(self.api_url + "/openapi.json", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the API")

    def producers(self, spec: dict[str, Any], n: int) -> list[tuple[subprocess.Popen[str], Path]]:
        """``n`` producer processes, each with its share of ``spec["count"]`` ids; each
        writes its records to a file of its own."""
        share = spec["count"] // n
        procs: list[tuple[subprocess.Popen[str], Path]] = []
        for k in range(n):
            self.produced += 1
            out = self.dir / f"producer{self.produced}.json"
            part = {**spec, "first": spec["first"] + k * share, "count": share, "out": str(out)}
            if k == n - 1:
                part["count"] = spec["count"] - share * (n - 1)
            with open(str(out) + ".log", "w") as log:  # the child keeps its own copy
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bench.chaos", "--produce", json.dumps(part)],
                    cwd=PROJECT_ROOT, env={**os.environ, **self.env},
                    stdout=subprocess.DEVNULL, stderr=log, text=True, preexec_fn=die_with_parent,
                )  # fmt: skip
            procs.append((proc, out))
        return procs

    @staticmethod
    def sending(procs: list[tuple[subprocess.Popen[str], Path]]) -> None:
        """Until every producer has sent its first request (faults fall under load)."""
        wait_for(
            lambda: all(
                Path(f"{out}.started").exists() or p.poll() is not None for p, out in procs
            ),
            120,
            "the producers to send",
        )

    @staticmethod
    def collect(procs: list[tuple[subprocess.Popen[str], Path]]) -> tuple[list[Any], int]:
        records: list[Any] = []
        unclaimed = 0
        for proc, path in procs:
            proc.wait(timeout=CALL_TIMEOUT_S * 4 + 120)
            if proc.returncode != 0:
                log = Path(str(path) + ".log").read_text(errors="replace")
                raise RuntimeError(f"a producer failed: {log[-3000:]}")
            result = json.loads(path.read_text())
            records += result["records"]
            unclaimed += result["unclaimed"]
        return records, unclaimed

    def send(self, spec: dict[str, Any], n: int = 1) -> dict[str, Any]:
        records, unclaimed = self.collect(self.producers(spec, n))
        return summarize(records, unclaimed)

    # what the workers did
    def executions(self, ids: range | None = None) -> collections.Counter[int]:
        if not self.log.exists():
            return collections.Counter()
        counts = collections.Counter(
            int(line.split()[0]) for line in self.log.read_text().split("\n") if line
        )
        if ids is not None:
            counts = collections.Counter({i: n for i, n in counts.items() if i in ids})
        return counts

    def twice(self, ids: range) -> int:
        return sum(n - 1 for n in self.executions(ids).values() if n > 1)

    def serving(self, label: str = "echo/v1") -> dict[int, str]:
        """pid -> hostname of the workers that report ``label`` loaded and consumed."""
        names = [n.decode() for n in self.client.zrange(keys.WORKERS, 0, -1)]
        raws = self.client.mget([keys.worker_report_key(n) for n in names]) if names else []
        queue = keys.queue_name(*label.split("/"))
        live = worker_processes(self.server.url)
        found = {}
        for raw in raws:
            if raw:
                report = json.loads(raw)
                loaded = {f"{m['name']}/{m['version']}" for m in report.get("models", [])}
                alive = live.get(int(report["pid"])) == report["hostname"]
                if alive and label in loaded and queue in report.get("queues", []):
                    found[int(report["pid"])] = report["hostname"]
        return found

    def load_time_s(self) -> float:
        """The longest model load any worker of this stack logged."""
        longest = 0.0
        for path in self.dir.glob("scaled-*.log"):
            for m in re.finditer(r"ready in ([0-9.]+) s", path.read_text(errors="replace")):
                longest = max(longest, float(m.group(1)))
        return longest

    def kill(self, pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
        if sig == signal.SIGKILL:
            self.killed.add(pid)
        os.kill(pid, sig)

    def close(self) -> list[str]:
        """Stop beat (it drains its fleet), then everything; the worker processes of this
        Redis still alive afterwards (orphans)."""
        self.exited = self.exits()
        self.closing = True
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
            self.api.wait(15)
        if self.beat is not None and self.beat.poll() is None:
            self.beat.terminate()
            try:
                self.beat.wait(90)
            except subprocess.TimeoutExpired:
                self.beat.kill()
        self.monitor.stop()
        orphans = [f"{pid} {name}" for pid, name in worker_processes(self.server.url).items()]
        for pid in worker_processes(self.server.url):
            os.kill(pid, signal.SIGKILL)
        self.client.close()
        self.server.__exit__(None, None, None)
        return orphans

    def exits(self) -> list[str]:
        """Worker, beat and API exits nobody asked for, so far."""
        found = list(self.monitor.unasked)
        for name, proc in (("beat", self.beat), ("api", self.api)):
            if proc is not None and proc.poll() is not None and proc.pid not in self.killed:
                found.append(f"{name} exited with {proc.returncode}")
        return found


def worker_processes(url: str) -> dict[int, str]:
    """pid -> hostname of every live ``celery -A workers worker`` whose REDIS_URL is ``url``
    (not a child it forked: one of those, before its exec, has the same command line)."""
    found: dict[int, str] = {}
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            if b"workers" not in argv or b"worker" not in argv or b"-n" not in argv:
                continue
            stat = Path(entry.path, "stat").read_text().rsplit(") ", 1)[1].split()
            if stat[0] == "Z":
                continue
            environ = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"REDIS_URL={url}".encode() in environ:
            found[int(entry.name)] = argv[argv.index(b"-n") + 1].decode()
            parents[int(entry.name)] = int(stat[1])
    return {pid: name for pid, name in found.items() if parents[pid] not in found}


class Monitor:
    """Every 50 ms: the stack's worker processes. One that is gone without a kill from
    the suite and without a warm shutdown in its log exited unasked."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.seen: dict[int, str] = {}
        self.most = 0
        self.unasked: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.look()

    def look(self) -> None:
        live = worker_processes(self.stack.server.url)
        self.most = max(self.most, len(live))
        for pid in set(self.seen) - set(live):
            name = self.seen.pop(pid)
            if pid in self.stack.killed or self.stack.closing:
                continue
            log = self.stack.dir / f"{name.split('@')[0]}.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            if "Warm shutdown" not in text:
                self.unasked.append(f"worker {name} (pid {pid}) exited: {text[-600:]!r}")
        self.seen.update(live)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.look()


def warm(stack: Stack, instances: int, first: int = 10_000_000) -> None:
    """A first request (the cold start), then wait for ``instances`` serving."""
    out = stack.send({"model": "echo", "first": first, "count": 4, "threads": 4})
    assert out["answered"] == 4, out
    wait_for(lambda: len(stack.serving()) >= instances, 120, f"{instances} instances")


# -- scenarios ------------------------------------------------------------------------------
SCENARIOS: dict[str, Callable[[Path, bool], Iterator[Tally]]] = {}


def scenario(
    number: str,
) -> Callable[[Callable[..., Iterator[Tally]]], Callable[..., Iterator[Tally]]]:
    def register(fn: Callable[..., Iterator[Tally]]) -> Callable[..., Iterator[Tally]]:
        SCENARIOS[number] = fn
        return fn

    return register


@scenario("1")
def worker_kills(root: Path, quick: bool) -> Iterator[Tally]:
    """Workers SIGKILLed every few seconds while 4 producers send 10,000 requests."""
    total, every_s = (400, 1.5) if quick else (10_000, 2.0)
    tally = Tally(f"1. worker SIGKILLed every {every_s:g} s, {total} requests, 4 producers")
    stack = Stack(root, "kills", scaler={"model_loading": {"min_instances_per_model": 2}})
    try:
        stack.start_beat()
        warm(stack, 2)
        spec = {"model": "echo", "first": 1, "count": total, "threads": 8,
                "rate": (total / 3 if quick else 125.0)}  # fmt: skip
        procs = stack.producers(spec, 4)
        stack.sending(procs)
        held_at_kill = 0
        kills: list[float] = []
        rng = random.Random(1)
        while any(p.poll() is None for p, _ in procs) and (not quick or not kills):
            time.sleep(every_s if kills or not quick else 0.8)
            victims = stack.serving()
            if len(victims) < 2:
                continue  # one left: killing it tests cold starts, not failover
            pid = rng.choice(sorted(victims))
            held_at_kill += int(stack.client.hlen(keys.HELD_PREFIX + victims[pid]) or 0)
            stack.kill(pid)
            kills.append(time.time())
        records, unclaimed = stack.collect(procs)
        tally.add(summarize(records, unclaimed))
        tally.faults = len(kills)
        ids = range(1, total + 1)
        tally.executed_twice = stack.twice(ids)
        load_s = stack.load_time_s()
        tally.notes.append(
            f"{len(kills)} kills; the killed workers held {held_at_kill} requests; "
            f"longest model load {load_s:.2f} s"
        )
        tally.aim("0 lost", tally.lost == 0 and tally.sent == total)
        tally.aim("all answered", tally.answered == total)
        tally.aim("duplicates <= held by the killed", tally.executed_twice <= held_at_kill)
        tally.aim("answered within 5 s + a load", tally.longest_wait_s <= 5.0 + load_s)
    finally:
        finish(tally, stack)
    yield tally


def finish(tally: Tally, stack: Stack) -> None:
    """Close the stack; its orphans and unasked exits go into the tally."""
    orphans = stack.close()
    tally.notes += [f"orphan worker {o}" for o in orphans] + stack.exited
    tally.unasked_exits = len(stack.exited)
    tally.aim("no unasked exit, no orphan", not stack.exited and not orphans)


def api_answers(stack: Stack, token: str, n: int = 5) -> bool:
    """The API still serves: ``n`` predictions over HTTP answered."""
    import httpx

    ok = 0
    for i in range(n):
        body = {"model": "echo", "inputs": [float(i)] + [1.0] * 63}
        r = httpx.post(stack.api_url + "/predict", json=body, timeout=30,
                       headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        ok += r.status_code == 200
    return ok == n


@scenario("2")
def redis_restarts(root: Path, quick: bool) -> Iterator[Tally]:
    """Redis restarted under load: without persistence (SIGTERM, SIGKILL), and SIGKILLed
    with AOF ``appendfsync always``."""
    cases = [("no persistence", [], [signal.SIGTERM, signal.SIGKILL], 15.0)]
    if not quick:
        cases.append((
            "AOF appendfsync always", ["--appendonly", "yes", "--appendfsync", "always"],
            [signal.SIGKILL], CALL_TIMEOUT_S,
        ))  # fmt: skip
    first = 1
    for label, args, sigs, timeout in cases:
        total = 300 if quick else 1200 * len(sigs)
        names = "+".join(s.name for s in sigs)
        tally = Tally(f"2. Redis {names}, {label}, {total} requests")
        stack = Stack(root, f"redis-{len(sigs)}-{bool(args)}", redis_args=args,
                      scaler={"model_loading": {"min_instances_per_model": 2}})  # fmt: skip
        try:
            stack.start_beat()
            stack.start_api("chaos")
            warm(stack, 2)
            seconds = 2.0 + 3.0 * len(sigs)
            spec = {"model": "echo", "first": first, "count": total, "threads": 8,
                    "rate": total / seconds / 4, "timeout": timeout}  # fmt: skip
            procs = stack.producers(spec, 4)
            stack.sending(procs)
            for sig in sigs:
                time.sleep(2.0)
                stack.server.restart(sig)
                tally.faults += 1
            records, unclaimed = stack.collect(procs)
            tally.add(summarize(records, unclaimed))
            ids = range(first, first + total)
            tally.executed_twice = stack.twice(ids)
            served = api_answers(stack, "chaos")
            tally.aim("the API serves after", served)
            tally.aim("none lost silently", tally.lost == 0 and tally.wrong == 0)
            refused = tally.errors.get("BrokerUnavailableError at delay()", 0)
            if refused:
                tally.notes.append(f"{refused} refused at delay() while Redis was away (not sent)")
            if args:
                tally.aim("0 lost with persistence", tally.answered == total - refused)
            else:
                lost = tally.errors.get("RequestLostError", 0)
                tally.notes.append(f"{lost} requests were in Redis when it restarted without "
                                   "persistence: their callers got RequestLostError at their "
                                   "timeout")  # fmt: skip
        finally:
            finish(tally, stack)
        first += total
        yield tally


@scenario("3")
def scaler_kills(root: Path, quick: bool) -> Iterator[Tally]:
    """The beat scaler SIGKILLed and restarted twice during a burst from zero."""
    total = 3000
    tally = Tally(f"3. scaler SIGKILLed twice in a burst from zero, {total} requests")
    stack = Stack(root, "scaler", scaler={"target_load_per_instance": 16})
    try:
        stack.start_beat()
        procs = stack.producers({"model": "echo", "first": 1, "count": total, "threads": 16,
                                 "rate": 150.0}, 4)  # fmt: skip
        for at in (1.0, 2.5):
            time.sleep(at)
            stack.kill_beat()
            tally.faults += 1
            stack.start_beat()
        records, unclaimed = stack.collect(procs)
        tally.add(summarize(records, unclaimed))
        tally.executed_twice = stack.twice(range(1, total + 1))
        most = stack.monitor.most
        tally.notes.append(f"at most {most} worker processes at once (max_workers 3)")
        tally.aim("no duplicate worker", most <= SCALER["max_workers"])
        tally.aim("0 lost", tally.answered == total)
    finally:
        finish(tally, stack)
    yield tally


@scenario("4")
def frozen_worker(root: Path, quick: bool) -> Iterator[Tally]:
    """A worker SIGSTOPped past the failover delay, then SIGCONTed."""
    total = 3000
    tally = Tally(f"4. worker SIGSTOPped 6 s then resumed, {total} requests")
    stack = Stack(root, "frozen", scaler={"model_loading": {"min_instances_per_model": 2}})
    try:
        stack.start_beat()
        warm(stack, 2)
        procs = stack.producers({"model": "echo", "first": 1, "count": total, "threads": 8,
                                 "rate": total / 14 / 4}, 4)  # fmt: skip
        stack.sending(procs)
        time.sleep(3.0)
        victim, name = sorted(stack.serving().items())[0]
        held = int(stack.client.hlen(keys.HELD_PREFIX + name) or 0)
        stack.kill(victim, signal.SIGSTOP)
        time.sleep(6.0)
        stack.kill(victim, signal.SIGCONT)
        tally.faults = 1
        records, unclaimed = stack.collect(procs)
        tally.add(summarize(records, unclaimed))
        tally.executed_twice = stack.twice(range(1, total + 1))
        ids = [r[0] for r in records]
        tally.notes.append(f"the frozen worker held {held} requests when stopped; "
                           f"{unclaimed} second answers reached a client and were "
                           "dropped")  # fmt: skip
        tally.aim("0 lost", tally.answered == total)
        tally.aim("one answer per caller", len(set(ids)) == len(ids) == total)
    finally:
        finish(tally, stack)
    yield tally


@scenario("5")
def failing_models(root: Path, quick: bool) -> Iterator[Tally]:
    """A model that raises on some inputs; a model whose load fails on one worker only."""
    total = 300 if quick else 1000
    tally = Tally(f"5a. model raising on 1 in 10 inputs, {total} requests")
    stack = Stack(root, "raising")
    write_model(stack.repo, "picky", "echo_mlp", log_path=str(stack.log), raises=True)
    negative = list(range(1, total + 1, 10))
    try:
        stack.start_beat()
        tally.add(stack.send({"model": "picky", "first": 1, "count": total, "threads": 16,
                              "negative": negative}, 2))  # fmt: skip
        tally.executed_twice = stack.twice(range(1, total + 1))
        tally.aim(
            "each raising input failed, typed",
            tally.errors == {"ModelExecutionError": len(negative)},
        )
        tally.aim("the rest of its batch answered", tally.answered == total - len(negative))
    finally:
        finish(tally, stack)
    yield tally

    total = 100 if quick else 200
    tally = Tally(f"5b. model load out of memory on one worker, {total} requests")
    stack = Stack(root, "oom", scaler={"model_loading": {"min_instances_per_model": 0}})
    write_model(stack.repo, "oomonce", "oom_once", log_path=str(stack.log),
                marker=str(stack.dir / "oom-marker"))  # fmt: skip
    try:
        stack.start_beat()
        tally.add(stack.send({"model": "oomonce", "first": 1, "count": total, "threads": 8}, 2))
        tally.faults = int((stack.dir / "oom-marker").exists())
        tally.executed_twice = stack.twice(range(1, total + 1))
        tally.aim("the load failed once", tally.faults == 1)
        tally.aim("retried elsewhere before callers fail", tally.answered == total)
    finally:
        finish(tally, stack)
    yield tally


def bad_inputs(spec: dict[str, Any]) -> list[tuple[str, str, float]]:
    """``count`` generated bad requests (half from a producer, a third over HTTP, a sixth
    pushed straight into the model's queue), run in a process of the stack's environment:
    (kind, outcome, seconds) each; the outcome is the typed error's name, an HTTP status,
    or ``answered`` / ``untyped ...`` (both failures)."""
    import httpx
    import msgpack
    import numpy as np
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from common.errors import InferenceError
    from tasks import broker, predict
    from tasks.producer import decode_result

    count = spec["count"]
    client = redis.Redis.from_url(spec["url"])
    seen: list[tuple[str, str, float]] = []
    queue = keys.queue_name("echo", "v1")
    http = httpx.Client(base_url=spec["api_url"], timeout=5,
                        headers={"Authorization": f"Bearer {spec['token']}"})  # fmt: skip
    shapes = st.lists(st.integers(0, 80), min_size=1, max_size=3).filter(lambda s: s != [64])
    wrong_shape = shapes.map(lambda s: ("shape", np.ones(s, np.float32)))
    odd = st.one_of(st.text(max_size=4), st.none(), st.complex_numbers(allow_nan=False),
                    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))  # fmt: skip
    wrong_dtype = st.tuples(st.integers(0, 63), odd).map(
        lambda t: ("dtype", [1.0] * t[0] + [t[1]] + [1.0] * (63 - t[0]))
    )
    non_finite = st.tuples(st.integers(0, 63), st.sampled_from([np.nan, np.inf, -np.inf])).map(
        lambda t: ("nan/inf", np.where(np.arange(64) == t[0], t[1], 1.0).astype(np.float32))
    )
    empty = st.sampled_from([[], np.zeros(0, np.float32), [[]]]).map(lambda x: ("empty", x))
    oversized = st.integers(300_000, 400_000).map(lambda n: ("oversized", np.ones(n, np.float32)))
    unknown = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True).filter(
        lambda n: n not in ("echo",)).map(lambda n: ("unknown model", n))  # fmt: skip
    part = st.text(alphabet="abcxyz09_-", max_size=8)
    bad_name = st.one_of(
        st.tuples(part, st.sampled_from(["..", "/", "\x00", "../", "\\"]), part).map("".join),
        st.integers(129, 10_000).map(lambda n: "x" * n),
    ).map(lambda n: ("bad name", n))

    def evenly(*strategies: Any) -> Any:
        return st.sampled_from(strategies).flatmap(lambda s: s)  # one_of favours the first

    def timed(kind: str, call: Callable[[], Any]) -> None:
        started = time.monotonic()
        try:
            call()
            outcome = "answered"
        except _Dropped:
            outcome = "_Dropped"
        except InferenceError as exc:
            outcome = type(exc).__name__
        except Exception as exc:
            outcome = f"untyped {type(exc).__name__}: {exc}"[:120]
        seen.append((kind, outcome, time.monotonic() - started))

    def send(model: str, x: Any) -> None:
        predict.delay(model, x).get(timeout=5)

    @given(evenly(wrong_shape, wrong_dtype, non_finite, empty, oversized, unknown, bad_name))
    @settings(max_examples=count // 2, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def from_producers(case: tuple[str, Any]) -> None:
        kind, value = case
        if kind in ("unknown model", "bad name"):
            timed(kind, lambda: send(value, np.ones(64, np.float32)))
        else:
            timed(kind, lambda: send("echo", value))

    def pushed(raw: bytes, task_id: str | None) -> None:
        """Straight into the queue; answered by the worker (the result key), or dropped
        when not even an id can be read (then: acknowledged, the queue and held empty)."""
        client.execute_command(*broker.publish_commands(queue, 0, raw)[0])
        client.lpush(broker.wake_key(queue), b"1")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if task_id is None:
                if not client.llen(queue) and not client.hgetall(keys.HELD_COUNTS):
                    raise _Dropped()
            else:
                stored = client.get(broker.result_key(task_id))
                if stored is not None:
                    decode_result(stored)
                    return
            time.sleep(0.005)
        raise TimeoutError("no answer within 1 s")

    def message(serializer: str, body: Any = None) -> tuple[bytes, str]:
        task_id = broker.new_task_id()
        x = np.ones(64, np.float32) if body is None else body
        return broker.encode_task_message("tasks.predict", task_id, ("echo", x), {"version": "v1"},
                                          queue=queue, serializer=serializer), task_id  # fmt: skip

    @given(st.sampled_from(["pickle", "truncated", "garbage body", "garbage", "wrong task"]),
           st.binary(min_size=1, max_size=64), st.floats(0.05, 0.95))  # fmt: skip
    @settings(max_examples=count // 6, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def into_the_queue(kind: str, junk: bytes, cut: float) -> None:
        if kind == "pickle":
            raw, task_id = message("pickle")
        elif kind == "garbage":
            raw, task_id = junk, None
        elif kind == "wrong task":
            raw = broker.encode_task_message("os.system", (task_id := broker.new_task_id()),
                                             ("echo",), {}, queue=queue,
                                             serializer="json")  # fmt: skip
        else:
            raw, task_id = message("tensor")
            envelope = broker.read_envelope(raw)
            body = envelope["body"]
            body = body[: max(1, int(len(body) * cut))] if kind == "truncated" else junk
            raw = msgpack.packb({**envelope, "body": body}, use_bin_type=True)
        timed(f"queue: {kind}", lambda: pushed(raw, task_id))

    bodies = evenly(
        st.tuples(st.just("shape"), shapes.map(lambda s: np.ones(s).tolist())),
        st.tuples(st.just("dtype"), st.lists(st.text(max_size=3), min_size=64, max_size=64)),
        st.tuples(st.just("nan/inf"), st.sampled_from(["NaN", "Infinity", "-Infinity"])),
        st.tuples(st.just("empty"), st.just([])),
        st.tuples(st.just("unknown model"), unknown.map(lambda t: t[1])),
        st.tuples(st.just("bad name"), bad_name.map(lambda t: t[1])),
        st.tuples(st.just("malformed"), st.binary(max_size=200)),
    )

    @given(bodies)
    @settings(max_examples=count // 3, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def over_http(case: tuple[str, Any]) -> None:
        kind, value = case
        started = time.monotonic()
        row = [1.0] * 64
        if kind in ("unknown model", "bad name"):
            r = http.post("/predict", json={"model": value, "inputs": row})
        elif kind == "nan/inf":
            text = "[" + ", ".join(["1.0"] * 63 + [value]) + "]"
            r = http.post("/predict", content=f'{{"model": "echo", "inputs": {text}}}',
                          headers={"Content-Type": "application/json"})  # fmt: skip
        elif kind == "malformed":
            r = http.post("/predict", content=value, headers={"Content-Type": "application/json"})
        else:
            r = http.post("/predict", json={"model": "echo", "inputs": value})
        typed = 400 <= r.status_code < 500 and "application/json" in r.headers.get(
            "content-type", ""
        )
        outcome = f"HTTP {r.status_code}" if typed else f"untyped HTTP {r.status_code}"
        seen.append((f"http: {kind}", outcome, time.monotonic() - started))

    from_producers()
    into_the_queue()
    over_http()
    timed("oversized over HTTP", lambda: _too_big(http))
    http.close()
    return seen


class _Dropped(Exception):
    """A message without a readable id: acknowledged and dropped (nobody to answer)."""


def _too_big(http: Any) -> None:
    from common.errors import PayloadTooLargeError

    body = b'{"model": "echo", "inputs": [' + b"1.0, " * 400_000 + b"1.0]}"
    r = http.post("/predict", content=body, headers={"Content-Type": "application/json"})
    if r.status_code != 413:
        raise RuntimeError(f"HTTP {r.status_code} for a body over the limit")
    raise PayloadTooLargeError("HTTP 413")


@scenario("6")
def bad_requests(root: Path, quick: bool) -> Iterator[Tally]:
    """Generated bad input from producers, over HTTP and pushed straight into the queue."""
    count = 200 if quick else 1200
    stack = Stack(root, "bad", env={"MAX_PAYLOAD_BYTES": str(1024 * 1024)},
                  scaler={"model_loading": {"min_instances_per_model": 1}})  # fmt: skip
    tally = Tally(f"6. bad input, {count} generated cases")
    try:
        stack.start_beat()
        stack.start_api("chaos")
        warm(stack, 1)
        before = sum(stack.executions().values())
        out = stack.dir / "bad.json"
        spec = {"url": stack.server.url, "api_url": stack.api_url, "count": count,
                "token": "chaos", "out": str(out)}  # fmt: skip
        subprocess.run([sys.executable, "-m", "bench.chaos", "--bad", json.dumps(spec)],
                       cwd=PROJECT_ROOT, env={**os.environ, **stack.env}, check=True,
                       timeout=600)  # fmt: skip
        seen = [tuple(x) for x in json.loads(out.read_text())]
        tally.sent = len(seen)
        outcomes = collections.Counter(outcome for _, outcome, _ in seen)
        dropped = outcomes.pop("_Dropped", 0)
        tally.answered = outcomes.pop("answered", 0)
        tally.errors = dict(outcomes)
        tally.longest_wait_s = round(max(t for _, _, t in seen), 3)
        executed = sum(stack.executions().values()) - before
        kinds = collections.Counter(kind for kind, _, _ in seen)
        tally.notes.append("cases: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
        if dropped:
            tally.notes.append(
                f"{dropped} messages without a readable id: dropped (acknowledged, logged)"
            )
        untyped = [(k, o) for k, o, _ in seen if o.startswith("untyped") or o == "answered"]
        tally.notes += [f"not refused: {k}: {o}" for k, o in untyped[:10]]
        tally.aim(">= 1000 cases" if not quick else ">= 200 cases", len(seen) >= count)
        tally.aim("every one a typed error", not untyped)
        tally.aim("each within 1 s", tally.longest_wait_s <= 1.0)
        tally.aim("nothing executed", executed == 0)
    finally:
        finish(tally, stack)
    yield tally


@scenario("7")
def redis_full(root: Path, quick: bool) -> Iterator[Tally]:
    """Redis at ``maxmemory`` with ``noeviction``: 4 producers send faster than one worker
    serves until Redis refuses them; everything it accepted must be answered."""
    total = 6000 if quick else 12_000
    tally = Tally(f"7. Redis full (maxmemory, noeviction), {total} requests")
    pinned = {"max_workers": 1, "model_loading": {"min_instances_per_model": 1}}
    stack = Stack(root, "full", scaler=pinned)
    try:
        stack.start_beat()
        warm(stack, 1)
        used = int(stack.client.info("memory")["used_memory"])
        limit = used + (3 if not quick else 1) * 1024 * 1024
        stack.client.config_set("maxmemory", limit)
        procs = stack.producers({"model": "echo", "first": 1, "count": total, "send_first": True,
                                 "timeout": 120}, 4)  # fmt: skip
        records, unclaimed = stack.collect(procs)
        tally.add(summarize(records, unclaimed))
        tally.faults = 1
        refused = sum(n for k, n in tally.errors.items() if k.startswith("BrokerUnavailableError"))
        accepted = tally.sent - refused
        tally.notes.append(f"maxmemory {limit / 2**20:.1f} MiB: {refused} refused "
                           f"({tally.errors}), {accepted} accepted")  # fmt: skip
        tally.executed_twice = stack.twice(range(1, total + 1))
        at_delay = tally.errors.get("BrokerUnavailableError at delay()", 0)
        tally.notes.append(
            f"refused at delay(): {at_delay}; at get() (written before the first refusal "
            f"was read): {refused - at_delay}"
        )
        tally.aim("Redis filled: some refused, typed", refused > 0)
        # A producer reads Redis's answers at the latest every MAX_UNACKED requests: what
        # it wrote before it read the first refusal fails at get(); later ones at delay().
        from tasks.replies import MAX_UNACKED

        tally.aim("refused at delay() once refusing", refused - at_delay <= 4 * MAX_UNACKED)
        tally.aim("every accepted request answered", tally.answered == accepted and tally.lost == 0)
    finally:
        finish(tally, stack)
    yield tally


CYCLE_MODELS = ("echo", "echo2", "echo3")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cycles(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """In the stack's environment: ``count`` cycles of requests to the three models, each
    waited out until the worker holds none of them again; per cycle the RSS of beat and
    of the worker, Redis's keys (and how many expire) and the worker processes."""
    import numpy as np

    from tasks import predict

    client = redis.Redis.from_url(spec["url"])
    x = np.zeros(64, np.float32)
    rows = []

    def at_zero(since: float) -> bool:
        """A report made after ``since`` shows none of the models held."""
        raw = client.get(keys.worker_report_key(spec["worker"]))
        report = json.loads(raw) if raw else {}
        held = {m["name"] for m in report.get("models", []) + report.get("loading", [])}
        return report.get("time", 0) > since and not held & set(CYCLE_MODELS)

    def persistent() -> list[str]:
        return sorted(k.decode() for k in client.scan_iter(count=1000) if client.ttl(k) == -1)

    start: list[str] | None = None
    for cycle in range(spec["count"]):
        sent = time.time()
        results = [predict.delay(m, x) for m in CYCLE_MODELS for _ in range(4)]
        for r in results:
            r.get(timeout=60)
        answered = time.time()
        wait_for(
            functools.partial(at_zero, answered), 60, f"cycle {cycle}: every model back to zero"
        )
        space = client.info("keyspace").get("db0", {})
        rows.append({
            "cycle": cycle + 1, "wait_s": round(answered - sent, 3),
            "beat_rss": rss_bytes(spec["beat"]),
            "worker_rss": rss_bytes(spec["worker_pid"]),
            "keys": space.get("keys", 0), "expiring": space.get("expires", 0),
            "workers": len(worker_processes(spec["url"])),
        })  # fmt: skip
        # The steady state, from a fifth of the cycles on, once the scaler has counted
        # requests (its popularity hash, one key for every version, written from reports).
        if start is None and cycle + 1 >= spec["count"] // 5 and client.exists(keys.POPULARITY):
            time.sleep(2.0)
            start, rows[-1]["start"] = persistent(), True
    time.sleep(2.0)
    rows[-1]["without_ttl_start"], rows[-1]["without_ttl"] = start or [], persistent()
    return rows


@scenario("8")
def scale_cycles(root: Path, quick: bool) -> Iterator[Tally]:
    """100 cycles of three models loaded, served and scaled back to zero on one worker."""
    from scaler.processes import WorkerProcess

    count = 25 if quick else 100
    tally = Tally(f"8. {count} scale cycles of 3 models (load, serve, zero)")
    fast_reports = {"WORKER_REPORT_INTERVAL_S": "0.25"}  # a cycle waits for a report
    stack = Stack(root, "cycles", env=fast_reports, scaler={
        "tick_interval_s": 0.2, "max_workers": 1, "scale_down_stabilization_s": 0,
        "zero_scaling": {"scale_to_zero_delay": 0.3},
    })  # fmt: skip
    for name in CYCLE_MODELS[1:]:
        write_model(stack.repo, name, "echo_mlp")
    worker = WorkerProcess("anchor@chaos", env=stack.env, log_path=stack.dir / "anchor.log")
    try:
        stack.start_beat()
        wait_for(lambda: stack.client.exists(keys.worker_report_key(worker.hostname)), 60,
                 "the worker's first report")  # fmt: skip
        assert stack.beat is not None
        out = stack.dir / "cycles.json"
        spec = {"url": stack.server.url, "count": count, "beat": stack.beat.pid,
                "worker": worker.hostname, "worker_pid": worker.pid, "out": str(out)}  # fmt: skip
        subprocess.run([sys.executable, "-m", "bench.chaos", "--cycles", json.dumps(spec)],
                       cwd=PROJECT_ROOT, env={**os.environ, **stack.env}, check=True,
                       timeout=900)  # fmt: skip
        rows = json.loads(out.read_text())
        tally.sent = tally.answered = count * len(CYCLE_MODELS) * 4
        tally.faults = count
        tally.longest_wait_s = max(r["wait_s"] for r in rows)  # a cold start of all three
        tenth, last = rows[9], rows[-1]
        growth = {
            what: (last[what] - tenth[what]) / tenth[what] for what in ("beat_rss", "worker_rss")
        }
        persistent = (len(last["without_ttl_start"]), len(last["without_ttl"]))
        tally.notes.append(
            "RSS from cycle 10 to {}: beat {:.1f} -> {:.1f} MiB ({:+.1%}), worker {:.1f} "
            "-> {:.1f} MiB ({:+.1%}); keys without a TTL after cycle {} {}, at the end {}; keys "
            "with one (results, metrics buckets) {} -> {}".format(
                count, tenth["beat_rss"] / 2**20, last["beat_rss"] / 2**20, growth["beat_rss"],
                tenth["worker_rss"] / 2**20, last["worker_rss"] / 2**20, growth["worker_rss"],
                next((r["cycle"] for r in rows if r.get("start")), None), *persistent,
                tenth["expiring"], last["expiring"],
            )
        )  # fmt: skip
        tally.aim("beat RSS growth < 5%", growth["beat_rss"] < 0.05)
        tally.aim("worker RSS growth < 5%", growth["worker_rss"] < 0.05)
        tally.aim(
            "keys back to their start",
            any(r.get("start") for r in rows) and persistent[1] <= persistent[0],
        )
        added = sorted(set(last["without_ttl"]) - set(last["without_ttl_start"]))
        if added:
            tally.notes.append(f"keys without a TTL added: {added}")
        tally.aim("no worker process but the one", max(r["workers"] for r in rows) == 1)
        (RESULTS.parent / "chaos_cycles.json").parent.mkdir(parents=True, exist_ok=True)
        (RESULTS.parent / "chaos_cycles.json").write_text(json.dumps(rows, indent=1) + "\n")
    finally:
        worker.stop(timeout_s=30)
        finish(tally, stack)
    yield tally


# -- running --------------------------------------------------------------------------------
def print_table(tallies: list[Tally]) -> None:
    head = (
        f"{'scenario':62} {'sent':>6} {'ok':>6} {'typed errors':>24} {'lost':>5} {'twice':>5} "
        f"{'2nd':>4} {'wait s':>7} {'exits':>5} {'aims':>5}"
    )
    print("\n" + head)
    for t in tallies:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(t.errors.items())) or "0"
        print(
            f"{t.scenario[:62]:62} {t.sent:6d} {t.answered:6d} {errors[:24]:>24} {t.lost:5d} "
            f"{t.executed_twice:5d} {t.second_answers:4d} {t.longest_wait_s:7.2f} "
            f"{t.unasked_exits:5d} {'met' if t.passed else 'MISS':>5}"
        )
        for name, met in t.aims.items():
            if not met:
                print(f"    missed: {name}")
        for note in t.notes:
            print(f"    {note}")


def run(numbers: list[str], quick: bool, root: Path) -> list[Tally]:
    tallies = []
    for number in numbers:
        started = time.monotonic()
        for tally in SCENARIOS[number](root, quick):
            tally.seconds = round(time.monotonic() - started, 1)
            tallies.append(tally)
            print_table([tally])
    return tallies


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="scenario numbers, comma-separated")
    parser.add_argument("--out", default="", help="results file (default: chaos.json, not quick)")
    parser.add_argument("--produce", default="", help=argparse.SUPPRESS)
    parser.add_argument("--bad", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cycles", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.produce:
        spec = json.loads(args.produce)
        Path(spec["out"]).write_text(json.dumps(produce(spec)))
        return 0
    if args.cycles:
        spec = json.loads(args.cycles)
        Path(spec["out"]).write_text(json.dumps(cycles(spec)))
        return 0
    if args.bad:
        spec = json.loads(args.bad)
        Path(spec["out"]).write_text(json.dumps(bad_inputs(spec)))
        return 0
    import tempfile

    numbers = args.only.split(",") if args.only else QUICK if args.quick else list(SCENARIOS)
    root = Path(tempfile.mkdtemp(prefix="chaos-"))
    tallies = run(numbers, args.quick, root)
    print_table(tallies)
    out = Path(args.out) if args.out else None if args.quick else RESULTS
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([asdict(t) for t in tallies], indent=2) + "\n")
        print(f"\nwritten to {out}; logs in {root}")
    return 0 if all(t.passed for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
