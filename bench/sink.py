"""The benchmark's upstream: answers 200 to every POST and counts them (GET /count)."""

import sys

from aiohttp import web

COUNT = web.AppKey("count", list)


async def receive(request: web.Request) -> web.Response:
    await request.read()
    request.app[COUNT][0] += 1
    return web.Response(text="ok")


async def count(request: web.Request) -> web.Response:
    return web.json_response({"count": request.app[COUNT][0]})


async def reset(request: web.Request) -> web.Response:
    request.app[COUNT][0] = 0
    return web.json_response({"count": 0})


def main() -> None:
    app = web.Application()
    app[COUNT] = [0]
    app.router.add_get("/count", count)
    app.router.add_post("/reset", reset)
    app.router.add_post("/{tail:.*}", receive)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
