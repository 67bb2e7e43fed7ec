"""The asyncio client: thousands of awaits in flight in one event loop on one connection
and one reply channel, typed errors, and a Redis restart under it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from common import keys
from common.errors import SchemaError, UnknownModelError
from common.redis import EmbeddedRedis
from tasks.producer import AsyncInferenceClient
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def picky_worker(start_worker: Any, test_repo: Path) -> Any:
    return start_worker("aio", queues=[keys.queue_name("picky", "v1")], repo=test_repo)


def test_a_thousand_awaits_in_flight(picky_worker: Any, client: redis.Redis) -> None:
    from tasks import predict

    async def main() -> list[Any]:
        rows = [np.full(4, i + 1, np.float32) for i in range(1000)]
        outputs = await asyncio.gather(*(predict.aio("picky", row, timeout=60) for row in rows))
        return [float(o[0]) for o in outputs]

    assert asyncio.run(main()) == [float(i + 1) for i in range(1000)]

    def batched() -> Any:
        stats = (picky_worker.report(client) or {}).get("batching", {}).get("picky/v1", {})
        return stats if stats.get("rows", 0) >= 1000 else None

    assert wait_for(batched, what="the batches in the report")["max_batch_rows"] > 1


def test_errors_keep_their_type(picky_worker: Any) -> None:
    async def main() -> None:
        client = AsyncInferenceClient()
        try:
            with pytest.raises(UnknownModelError, match="unknown model 'ghost'"):
                await client.predict("ghost", [1.0])
            with pytest.raises(SchemaError, match=r"float32\[4\]"):
                await client.predict("picky", [1.0, 2.0], timeout=30)
            assert await client.predict("picky", [3.0, 1.0, 1.0, 1.0], timeout=30) == [
                3.0, 1.0, 1.0, 1.0,
            ]  # fmt: skip
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_redis_restart_under_the_client(
    picky_worker: Any, redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    """Requests sent before and after a restart are answered; the client reconnects."""

    async def main() -> list[float]:
        aio = AsyncInferenceClient()
        try:
            first = await aio.predict("picky", [1.0, 1.0, 1.0, 1.0], timeout=30)
            redis_server.kill()
            redis_server.start()
            outputs = [first[0]]
            for i in range(2, 12):
                for _ in range(100):  # the worker republishes the registry after a restart
                    try:
                        out = await aio.predict("picky", [float(i), 1, 1, 1], timeout=30)
                        break
                    except Exception:
                        await asyncio.sleep(0.1)
                outputs.append(out[0])
            return outputs
        finally:
            await aio.aclose()

    assert asyncio.run(main()) == [float(i) for i in range(1, 12)]
    assert picky_worker.alive
