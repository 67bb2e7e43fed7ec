"""Flower's settings (``celery -A workers flower`` reads this file from the working folder).

Flower listens on 127.0.0.1 unless ``FLOWER_ADDRESS`` says otherwise; set
``FLOWER_BASIC_AUTH=user:password`` before exposing it anywhere. With it set, Flower's own
``/metrics`` (Prometheus text, open in Flower 2.2 whatever the auth) needs the credentials
too: a scraper gives them with ``basic_auth`` in its scrape config. ``/healthcheck`` stays
open; it answers "OK" and tells nothing.
"""

from common.settings import flower_settings

_settings = flower_settings()
address = _settings.address
port = _settings.port


def _close_metrics() -> None:
    import tornado.web
    from flower.views import monitor

    if not getattr(monitor.Metrics.get, "_needs_auth", False):
        monitor.Metrics.get = tornado.web.authenticated(monitor.Metrics.get)  # type: ignore[method-assign]
        monitor.Metrics.get._needs_auth = True  # type: ignore[attr-defined]


if _settings.basic_auth:
    basic_auth = _settings.basic_auth
    _close_metrics()
