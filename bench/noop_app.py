"""The HTTP ceiling: a Starlette route that reads and decodes the command body and answers, doing nothing else.

Run as the service is run: uvicorn with uvloop and httptools, one worker."""

from __future__ import annotations

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_ANSWER = b'{"success":true}'


async def push_command(request: Request) -> Response:
    """Read and decode the JSON body, answer 200."""
    msgspec.json.decode(await request.body())
    return Response(_ANSWER, media_type="application/json")


app = Starlette(routes=[Route("/api/v1/commands", push_command, methods=["POST"])])
