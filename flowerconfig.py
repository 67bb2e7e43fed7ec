"""Flower's settings (``celery -A workers flower`` reads this file from the working folder).

Flower listens on 127.0.0.1 unless ``FLOWER_ADDRESS`` says otherwise; set
``FLOWER_BASIC_AUTH=user:password`` before exposing it anywhere.
"""

from common.settings import flower_settings

_settings = flower_settings()
address = _settings.address
port = _settings.port
if _settings.basic_auth:
    basic_auth = _settings.basic_auth
