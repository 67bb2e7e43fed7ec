"""The worker's model cache and batcher, in-process: limits, eviction, failures, batches."""

from __future__ import annotations

import os
import queue
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.contracts import ModelKey
from common.errors import (
    CacheCapacityError,
    ModelExecutionError,
    ModelLoadError,
    ModelLoadTimeoutError,
)
from loader.batching import Batcher, Item, Outcome
from loader.cache import ModelCache, ModelState
from loader.repository import ModelRepository
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)

MLP, CNN = ModelKey("tiny_mlp", "v1"), ModelKey("small_cnn", "v1")
LIN1, LIN2 = ModelKey("linear", "v1"), ModelKey("linear", "v2")


def make_cache(repo: Path, **overrides: Any) -> ModelCache:
    options: dict[str, Any] = dict(
        device=torch.device("cpu"), max_loaded_models=5, cache_size_bytes=10**9,
        load_timeout_s=30.0, warmup_timeout_s=30.0, concurrent_loads=2, failure_cooldown_s=60.0,
    )  # fmt: skip
    options.update(overrides)
    return ModelCache(ModelRepository(repo), **options)


def ready(cache: ModelCache, key: ModelKey) -> Any:
    return wait_for(
        lambda: cache.status(key).state is not ModelState.LOADING and cache.status(key),
        what=f"{key} to finish loading",
    )


def loaded(cache: ModelCache) -> set[str]:
    return {f"{m['name']}/{m['version']}" for m in cache.describe()["loaded"]}


def test_least_recently_used_model_goes_first(test_repo: Path) -> None:
    cache = make_cache(test_repo, max_loaded_models=2)
    assert ready(cache, LIN1).state is ModelState.READY
    assert ready(cache, LIN2).state is ModelState.READY
    cache.release(cache.acquire(LIN1))  # LIN1 used more recently than LIN2
    assert ready(cache, MLP).state is ModelState.READY
    assert loaded(cache) == {"linear/v1", "tiny_mlp/v1"}
    assert cache.evictions == 1


def test_the_byte_budget_evicts_and_refuses_what_cannot_fit(test_repo: Path) -> None:
    mlp_bytes = 4 * (64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10)
    cache = make_cache(test_repo, cache_size_bytes=mlp_bytes + 100)
    ready(cache, LIN1)
    ready(cache, MLP)  # 340,008 + 144 bytes do not fit: linear/v1 makes room
    assert loaded(cache) == {"tiny_mlp/v1"}
    failed = ready(cache, CNN)
    assert failed.state is ModelState.FAILED
    assert isinstance(failed.error, CacheCapacityError)
    assert "WORKER_CACHE_SIZE_GB" in str(failed.error)


def test_a_running_model_is_not_evicted_or_unloaded_under_it(test_repo: Path) -> None:
    cache = make_cache(test_repo, max_loaded_models=1)
    ready(cache, LIN1)
    entry = cache.acquire(LIN1)
    ready(cache, LIN2)  # no idle victim: a brief overshoot instead of waiting
    assert loaded(cache) == {"linear/v1", "linear/v2"}
    assert cache.unload(LIN1) is True
    assert "linear/v1" in loaded(cache)  # still running
    cache.release(entry)
    assert "linear/v1" not in loaded(cache)


def test_a_slow_load_times_out(test_repo: Path) -> None:
    cache = make_cache(test_repo, load_timeout_s=0.01)
    entry = ready(cache, CNN)  # torch.export loads take far longer than 10 ms
    assert entry.state is ModelState.FAILED
    assert isinstance(entry.error, ModelLoadTimeoutError)
    wait_for(lambda: not cache.describe()["loading"], what="the late load to be discarded")
    assert "small_cnn/v1" not in loaded(cache)


def test_a_failed_load_is_remembered_until_the_file_changes(test_repo: Path) -> None:
    model_file = test_repo / "linear" / "v1" / "model.pt"
    good = model_file.read_bytes()
    model_file.write_bytes(b"garbage")
    cache = make_cache(test_repo)
    first = ready(cache, LIN1)
    assert first.state is ModelState.FAILED and isinstance(first.error, ModelLoadError)
    assert cache.status(LIN1) is first  # within the cooldown: no reload storm
    model_file.write_bytes(good)
    stat = model_file.stat()
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert ready(cache, LIN1).state is ModelState.READY


@pytest.fixture
def batcher(test_repo: Path) -> Any:
    done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    cache = make_cache(test_repo)

    def complete(outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            done.put(outcome)

    b = Batcher(cache, default_max_batch_size=32, default_max_batch_delay_ms=0, complete=complete)
    cache._on_change = b.wake
    b.start()
    yield b, done
    b.stop()


def gather(done: queue.SimpleQueue[Outcome], n: int) -> dict[Any, Outcome]:
    return {o.item.ticket: o for o in (done.get(timeout=30) for _ in range(n))}


def test_batches_respect_max_batch_size_and_delay(batcher: Any) -> None:
    b, done = batcher
    key = ModelKey("picky", "v1")  # max_batch_size 8, max_batch_delay_ms 300
    for i in range(20):
        b.submit(Item(key=key, inputs=[float(i + 1), 0.0, 0.0, 0.0], single=True, ticket=i))
    outcomes = gather(done, 20)
    assert all(outcomes[i].value[0] == i + 1 for i in range(20))
    assert sorted(o.batch_size for o in outcomes.values()) == [4] * 4 + [8] * 16
    assert b.stats.per_model["picky/v1"] == {"batches": 3, "rows": 20, "max_batch_rows": 8}


def test_a_lone_request_does_not_wait_without_a_delay(batcher: Any) -> None:
    b, done = batcher
    b.submit(Item(key=LIN1, inputs=np.ones(8, np.float32), single=True, ticket="a"))
    assert gather(done, 1)["a"].batch_size == 1


def test_a_failing_batch_is_retried_one_by_one(batcher: Any) -> None:
    b, done = batcher
    key = ModelKey("picky", "v1")
    values = [1.0, 2.0, -3.0, 4.0]
    for i, v in enumerate(values):
        b.submit(Item(key=key, inputs=[v, 0.0, 0.0, 0.0], single=True, ticket=i))
    b.submit(Item(key=key, inputs=np.ones((2, 4), np.float32), single=False, ticket="batch"))
    outcomes = gather(done, 5)
    assert isinstance(outcomes[2].error, ModelExecutionError)
    assert [outcomes[i].value[0] for i in (0, 1, 3)] == [1.0, 2.0, 4.0]
    assert outcomes["batch"].value.shape == (2, 4)


def test_calling_the_task_directly_runs_in_this_process(example_repo: Path) -> None:
    from common.errors import SchemaError as Schema
    from tasks import predict, predict_batch

    out = predict("linear", [1.0] * 8)  # no broker, no worker: the model runs here
    assert isinstance(out, list) and len(out) == 4
    assert predict_batch("linear", np.ones((2, 8), np.float32), version="v2").shape == (2, 4)
    with pytest.raises(Schema, match=r"float32\[8\]"):
        predict("linear", [1.0] * 3)


def test_held_requests_run_in_priority_order(batcher: Any) -> None:
    """Requests a worker already holds (fetched while the model loads) run 0 first, 9 last,
    the order of the queues: a later urgent one is not stuck behind held batch work."""
    b, done = batcher
    key = ModelKey("picky", "v1")  # max_batch_size 8
    for i in range(16):
        b.submit(Item(key=key, inputs=[1.0, 0.0, 0.0, 0.0], single=True, ticket=f"low{i}",
                      priority=9))  # fmt: skip
    b.submit(Item(key=key, inputs=[2.0, 0.0, 0.0, 0.0], single=True, ticket="urgent"))
    outcomes = gather(done, 17)
    first = min(o.started for o in outcomes.values())
    assert outcomes["urgent"].started == first  # in the first batch, though submitted last
    assert sum(1 for o in outcomes.values() if o.started == first) == 8


def test_list_inputs_must_be_numbers() -> None:
    """Text is not converted, even "1.5"; None and objects neither; numbers and booleans
    of any kind are."""
    from common.errors import SchemaError
    from loader.batching import as_rows
    from loader.spec import InputSchema

    schema = InputSchema(dtype="float32", shape=[2])
    rows, _ = as_rows([1, True], schema, single=True)
    assert rows.dtype == np.float32 and rows.tolist() == [[1.0, 1.0]]
    for bad in (["1.5", 2.0], [None, 1.0], [{"a": 1}, 1.0], [1.0, "x"]):
        with pytest.raises(SchemaError, match="not a numeric array"):
            as_rows(bad, schema, single=True)
