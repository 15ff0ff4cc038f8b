"""Typed application keys: the one place that says what the aiohttp apps share."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from aiohttp import web

from relay.config import Config
from relay.events import EventBus
from relay.metrics import Metrics
from relay.store import Store

Clock = Callable[[], float]

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
METRICS = web.AppKey("metrics", Metrics)
EVENTS = web.AppKey("events", EventBus)
SESSION = web.AppKey("session", aiohttp.ClientSession)
