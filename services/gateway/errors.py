"""Errors in OpenAI's envelope, saying what to fix: {"error": {"message", "type", "param", "code"}}.

OpenAI clients read `error.message`; `param` names the offending field, and the message
names the limit when one was exceeded. No stack trace ever reaches a client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("gateway")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(HTTPException):
    """An HTTPException (so FastAPI's body reader lets it through) with the offending param."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def _field(loc: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; union tags are dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("rating", "comparison") and out == "":
            continue  # the discriminator's branch name, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "param", None), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
        param = _field(tuple(first["loc"]))
        if first["type"] == "json_invalid":
            param, first = "body", {**first, "msg": f"not valid JSON ({first.get('ctx', {}).get('error', 'parse error')} at character {first['loc'][-1]})"}
        elif first["type"].startswith("union_tag"):  # the feedback body's discriminator
            param = "kind"
        message = f"{param}: {first['msg']}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more: " + ", ".join(_field(tuple(e["loc"])) for e in errors[1:4]) + ")"
        return error_response(422, message, param)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(500, "internal error; see the gateway log")
