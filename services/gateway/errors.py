"""Errors in OpenAI's envelope, saying what to fix: {"error": {"message", "type", "param", "code"}}.

OpenAI clients read `error.message`; `param` names the offending field, the message names
the limit when one was exceeded, and `code` is a string as OpenAI's are
(`unsupported_parameter`, `unknown_parameter`, `invalid_value`, ...). A bad request to the
OpenAI endpoints is a 400, as OpenAI answers it (pydantic's validation errors included);
the feedback endpoint, the gateway's own, keeps 422 for a body that fails validation. No
stack trace ever reaches a client.
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


# `code` when the raiser names none
_CODES = {
    400: "invalid_value",
    401: "invalid_api_key",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    422: "invalid_value",
    429: "rate_limit_exceeded",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}

# pydantic error types -> OpenAI's codes
_VALIDATION_CODES = {
    "unsupported_parameter": "unsupported_parameter",
    "extra_forbidden": "unknown_parameter",
    "missing": "missing_required_parameter",
    "json_invalid": "invalid_json",
}

# Routes whose validation failures keep 422 (the gateway's own API, not OpenAI's)
_OWN_ROUTES = ("/v1/feedback",)


class ApiError(HTTPException):
    """An HTTPException (so FastAPI's body reader lets it through) with the offending param."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.param = param
        self.code = code


# A message may quote what the client sent (pydantic quotes a bad union tag): keep it
# short and encodable, so answering an error cannot itself fail.
MAX_MESSAGE_CHARS = 1000
MAX_PARAM_CHARS = 200


def _printable(text: str, limit: int) -> str:
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates -> \\udxxx
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    message = _printable(message, MAX_MESSAGE_CHARS)
    param = None if param is None else _printable(param, MAX_PARAM_CHARS)
    code = code or _CODES.get(status, "server_error" if status >= 500 else "invalid_request")
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# pydantic names the member of a plain union it tried: 'str', 'list[TextPart]',
# 'function-after[_utf8(), str]'. No field of the API looks like that.
_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "bytes"}


def _union_member(part: str) -> bool:
    return part in _UNION_MEMBERS or "[" in part


def _field(loc: tuple, error_type: str = "") -> str:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'; union tags are
    dropped (not the last part of an unknown-field error: that is the client's name)."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    out = ""
    for i, part in enumerate(parts):
        last_is_name = error_type == "extra_forbidden" and i == len(parts) - 1
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("rating", "comparison") and out == "":
            continue  # the discriminator's branch name, not a field
        elif _union_member(str(part)) and not last_is_name:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _unknown_field(path: str) -> str:
    if path in _OWN_ROUTES:
        return "unknown field: not a field of this request (docs/gateway.md lists them)"
    return (
        "unknown field: not a parameter of OpenAI's API nor one of the gateway's extensions "
        "(docs/gateway.md lists what is supported)"
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(
            exc.status_code, str(exc.detail), getattr(exc, "param", None), exc.headers, getattr(exc, "code", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors() or [{"loc": ("body",), "msg": "invalid request", "type": ""}]
        head = errors[:100]  # a body of 10^5 bad items has 10^5 errors; the message needs a few
        fields = [_field(tuple(e["loc"]), e["type"]) for e in head]
        # A value that fits no member of a union fails once per member. Report the member
        # the client evidently meant (the error deepest inside it: content[0].text over
        # "content: not a string"), and the members' sentences for one field as one.
        within = [i for i, f in enumerate(fields) if f.startswith((fields[0] + ".", fields[0] + "["))]
        i = within[0] if within else 0
        first, param = head[i], fields[i]
        if first["type"] == "json_invalid":
            param, first = (
                "body",
                {
                    **first,
                    "msg": f"not valid JSON ({first.get('ctx', {}).get('error', 'parse error')} "
                    f"at character {first['loc'][-1]})",
                },
            )
        elif first["type"].startswith("union_tag"):  # the feedback body's discriminator
            param = "kind"
        elif first["type"] == "extra_forbidden":
            first = {**first, "msg": _unknown_field(request.url.path)}
        same = [e["msg"] for j, (e, f) in enumerate(zip(head, fields)) if f == param and j != i]
        ancestors = [f for f in fields if param.startswith((f + ".", f + "["))]
        message = f"{param}: " + "; or ".join(dict.fromkeys([first["msg"], *same]))
        more = len(errors) - 1 - len(same) - len(ancestors)
        if more > 0:
            named = dict.fromkeys(f for f in fields if f != param and f not in ancestors)
            message += f" (and {more} more: " + ", ".join(list(named)[:3]) + ")"
        status = 422 if request.url.path in _OWN_ROUTES else 400
        return error_response(status, message, param, code=_VALIDATION_CODES.get(first["type"], "invalid_value"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(500, "internal error; see the gateway log")
