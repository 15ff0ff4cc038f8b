"""Typed application keys: the one place that says what the aiohttp apps share."""

from __future__ import annotations

from aiohttp import web

from relay.config import Config
from relay.events import EventBus
from relay.http_client import HttpClient
from relay.metrics import Metrics
from relay.model import Clock
from relay.replay import BulkReplays
from relay.store import Store

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
METRICS = web.AppKey("metrics", Metrics)
EVENTS = web.AppKey("events", EventBus)
HTTP_CLIENT = web.AppKey("http_client", HttpClient)
BULK = web.AppKey("bulk_replays", BulkReplays)

__all__ = ["BULK", "CLOCK", "CONFIG", "EVENTS", "HTTP_CLIENT", "METRICS", "STORE", "Clock"]
