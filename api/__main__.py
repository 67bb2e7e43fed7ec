"""``python -m api``: serve the HTTP API with uvicorn on API_HOST:API_PORT (loopback default)."""

from __future__ import annotations

import logging

import uvicorn

from api.app import create_app
from common.settings import api_settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = api_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
