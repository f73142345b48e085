"""One line on stderr per HTTP request the server answers: when, who, what, the status and how long it took
(the body's end included, so a streamed completion logs its whole time)."""

from __future__ import annotations

import sys
import time

CLIENT_LEFT = 499  # the status logged for a response its client did not wait for (nginx's)


class RequestLog:
    """ASGI middleware; outermost, so refusals of the API key or body size are logged too."""

    def __init__(self, app, out=None) -> None:
        self.app, self.out = app, out

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tic, status, logged = time.perf_counter(), [0], [False]

        async def logged_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                logged[0] = True
                self._line(scope, status[0], time.perf_counter() - tic)

        try:
            await self.app(scope, receive, logged_send)
        except BaseException:
            self._line(scope, status[0] or 500, time.perf_counter() - tic)
            raise
        if not logged[0]:  # a stream its client left: the response ended without its last body
            self._line(scope, CLIENT_LEFT, time.perf_counter() - tic)

    def _line(self, scope, status: int, seconds: float) -> None:
        client = scope.get("client") or ("-", 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} {client[0]} \"{scope['method']} {scope['path']}\" {status} {1000 * seconds:.0f} ms",
              file=self.out or sys.stderr, flush=True)
