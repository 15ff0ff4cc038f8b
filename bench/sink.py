"""The benchmark's upstream: answers 200 to every POST and counts them.

    GET /count  -> {"count": N, "first": t, "last": t}  (POSTs seen; wall-clock times of the first and last)
    POST /reset -> {"count": 0}

The sink stands for the user's application, which in production runs on
another machine. Here it shares two cores with wrk and the relay, so every
cycle it spends is taken from what is being measured; an aiohttp app cost
about 70 us a request (a fifth of the relay's budget at saturation). So it is
a bare asyncio protocol: it reads the head up to the blank line, then exactly
Content-Length bytes, and answers. Hand-written because no library serves
HTTP/1.1 cheaper than that; it is a measuring instrument, not part of the relay.
It understands what the relay and mitmdump send (Content-Length bodies,
keep-alive, pipelining); anything else gets 400 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from relay.runtime import event_loop_factory  # noqa: E402

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None

    def hit(self) -> None:
        self.last = time.time()
        if self.first is None:
            self.first = self.last
        self.count += 1

    def reset(self) -> None:
        self.count, self.first, self.last = 0, None, None


def json_answer(value: object) -> bytes:
    body = json.dumps(value).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Sink(asyncio.Protocol):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buffer = self.buffer + data if self.buffer else data
        answers = []
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                line_end = lower.find(b"\r\n", at + 2)
                try:
                    length = int(lower[at + 17 : line_end if line_end >= 0 else len(lower)])
                except ValueError:
                    length = -1
            if length < 0 or b"\r\ntransfer-encoding:" in lower:
                answers.append(BAD)
                self.transport.write(b"".join(answers))
                self.transport.close()
                self.buffer = b""
                return
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length :]
            if head.startswith(b"POST /reset "):
                self.counter.reset()
                answers.append(json_answer({"count": 0}))
            elif head.startswith(b"POST "):
                self.counter.hit()
                answers.append(OK)
            else:  # GET /count (and anything else: the figures)
                c = self.counter
                answers.append(json_answer({"count": c.count, "first": c.first, "last": c.last}))
        self.buffer = buffer
        if answers:
            self.transport.write(b"".join(answers) if len(answers) > 1 else answers[0])


async def serve(port: int) -> None:
    counter = Counter()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Sink(counter), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    factory = event_loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
