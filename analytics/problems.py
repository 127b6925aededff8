"""RFC 9457 problem documents: the shape of every error the control-plane API answers."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from pydantic import BaseModel, Field, ValidationError

PROBLEM_TYPE = "application/problem+json"


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    instance: str = ""
    errors: list[dict[str, Any]] = Field(default_factory=list)


class ProblemError(Exception):
    """Raised by a handler; the error middleware turns it into a problem response."""

    def __init__(self, status: int, title: str, detail: str = "",
                 errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}


def problem_response(request: web.Request, status: int, title: str, detail: str = "",
                     errors: list[dict[str, Any]] | None = None,
                     headers: dict[str, str] | None = None) -> web.Response:
    body = Problem(title=title, status=status, detail=detail, instance=request.path,
                   errors=errors or [])
    return web.Response(status=status, body=orjson.dumps(body.model_dump()), headers=headers,
                        content_type=PROBLEM_TYPE)


def validation_problem(exc: ValidationError, what: str) -> ProblemError:
    """A 400 naming each invalid field (`loc`) and why (`msg`)."""
    errors = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(part) for part in error["loc"]) or what
        message = ("unknown parameter" if error["type"] == "extra_forbidden"
                   else str(error["msg"]))
        errors.append({"loc": loc, "msg": message})
    detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors)
    return ProblemError(400, f"Invalid {what}", detail, errors)


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means Redis or ClickHouse did not answer (-> 503, not 500)."""
    if isinstance(exc, aioredis.RedisError | OSError | asyncio.TimeoutError):
        return True
    module = type(exc).__module__
    return module.startswith(("clickhouse_connect", "chdb"))
