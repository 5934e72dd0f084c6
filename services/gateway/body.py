"""Reading a request body as JSON, with the parser's own failures named.

FastAPI turns a JSONDecodeError into a 422 (`errors.py` words it), but anything else the
parser raises into a bare 400 "There was an error parsing the body". Valid-looking JSON
reaches those paths: a body that is not UTF-8, an integer literal over Python's
`int_max_str_digits` (4300 digits), or nesting deep enough to exhaust the parser's
recursion. `JsonRoute` reads bodies through `parse_json`, which refuses each with a 400
naming `body` and the limit, and also refuses nesting past the setting `max_json_depth`
(no request field nests more than 5 levels; the parser itself gives out near 1000).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Coroutine

from fastapi import Request, Response
from fastapi.routing import APIRoute

from services.gateway.errors import ApiError

DEFAULT_MAX_DEPTH = 64


def _too_deep(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest deeper than `limit` (`{}` is depth 1); iterative, so a
    deep body cannot exhaust the stack here either."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_json(body: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """json.loads(body), refusing what it cannot hold with ApiError(400, param="body").
    A JSONDecodeError (not JSON at all) passes through for FastAPI's 422."""
    too_deep = ApiError(400, f"body: JSON nested deeper than the limit max_json_depth={max_depth}", "body")
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError as e:
        raise ApiError(
            400,
            f"body: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); JSON bodies must be UTF-8",
            "body",
        ) from None
    except RecursionError:
        raise too_deep from None
    except ValueError as e:
        if "integer string conversion" in str(e):  # CPython's guard against quadratic int parsing
            digits = sys.get_int_max_str_digits()
            raise ApiError(
                400, f"body: an integer literal has more digits than the limit of {digits}", "body"
            ) from None
        raise ApiError(400, f"body: cannot be read as JSON: {e}", "body") from None
    if _too_deep(value, max_depth):
        raise too_deep
    return value


class _JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            gw = getattr(self.app.state, "gw", None)
            limit = gw.settings.max_json_depth if gw is not None else DEFAULT_MAX_DEPTH
            self._json = parse_json(await self.body(), limit)
        return self._json


class JsonRoute(APIRoute):
    """An APIRoute whose handler reads JSON bodies through `parse_json` (FastAPI's
    documented way to change how a route reads its request)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def read_json_with_limits(request: Request) -> Response:
            return await handler(_JsonRequest(request.scope, request.receive))

        return read_json_with_limits
