"""Typed application keys: the one place that says what the aiohttp apps share."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from relay.config import Config
from relay.events import EventBus
from relay.metrics import Metrics
from relay.model import Clock
from relay.replay import BulkReplays
from relay.store import Store

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
METRICS = web.AppKey("metrics", Metrics)
EVENTS = web.AppKey("events", EventBus)
SESSION = web.AppKey("session", aiohttp.ClientSession)
BULK = web.AppKey("bulk_replays", BulkReplays)

__all__ = ["BULK", "CLOCK", "CONFIG", "EVENTS", "METRICS", "SESSION", "STORE", "Clock"]
