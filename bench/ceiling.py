"""The ceiling: a bare aiohttp server that reads the body and answers 200 (what no relay can beat).

``GET /count`` gives the POSTs seen and the wall-clock times of the first and
last, so its rate is timed on its own clock like the relay's and the floor's
(wrk's own Requests/sec starts its clock after its first thread has begun).
"""

import sys
import time

from aiohttp import web

COUNTER = web.AppKey("counter", dict)


async def handle(request: web.Request) -> web.Response:
    await request.read()
    seen = request.app[COUNTER]
    seen["last"] = time.time()
    if seen["first"] is None:
        seen["first"] = seen["last"]
    seen["count"] += 1
    return web.json_response({"received": True})


async def count(request: web.Request) -> web.Response:
    return web.json_response(request.app[COUNTER])


def main() -> None:
    app = web.Application()
    app[COUNTER] = {"count": 0, "first": None, "last": None}
    app.router.add_get("/count", count)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
