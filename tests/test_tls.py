"""A TLS Redis URL: the worker, the producer and the registry all speak TLS to it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common import keys
from common.redis import die_with_parent, free_port
from tests.helpers import WorkerProcess, wait_for

pytestmark = pytest.mark.timeout(120)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_url(tmp_path: Path) -> Iterator[str]:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "1", "-subj", "/CN=test-ca", cwd=tmp_path)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=tmp_path)  # fmt: skip
    (tmp_path / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext",
             cwd=tmp_path)  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no", "--save", ""],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={tmp_path / 'ca.crt'}"

    def up() -> bool:
        try:
            return bool(redis.Redis.from_url(url).ping())
        except redis.ConnectionError:
            return False

    wait_for(up, timeout_s=10, what="the TLS server")
    yield url
    server.kill()
    server.wait()


def test_worker_and_producer_over_tls(tls_url: str, tmp_path: Path, example_repo: Path) -> None:
    worker = WorkerProcess(
        "tls",
        queues=[keys.queue_name("linear", "v1")],
        log_dir=tmp_path,
        env={"REDIS_URL": tls_url, "MODEL_REPOSITORY": str(example_repo)},
    )
    try:
        worker.wait_ready(redis.Redis.from_url(tls_url))
        script = textwrap.dedent("""
            from tasks import predict
            print(len(predict.delay("linear", [1.0] * 8).get(timeout=30)))
        """)
        done = subprocess.run([sys.executable, "-c", script], env={
            **__import__("os").environ, "REDIS_URL": tls_url,
        }, capture_output=True, text=True, timeout=90)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "4"
        plain = tls_url.replace("rediss://", "redis://").split("?")[0]
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(plain, socket_connect_timeout=2).ping()  # nothing in clear text
    finally:
        worker.stop()
