"""The route table's description as an OpenAPI 3.1 document (served at /openapi.json).

One `Route` list drives both the aiohttp router and this document, so a served route is always
documented, with the parameters, bodies and answers its models validate and produce.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from analytics.auth import Role
from analytics.problems import PROBLEM_TYPE, Problem

ID_PATTERN = r"^[A-Za-z0-9._:@-]{1,200}$"  # ids of anomalies, recommendations and policies
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    response: type[BaseModel] | None = None
    params: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    role: Role | None = None  # None: a read (viewer when reads are protected)
    public: bool = False  # probes, metrics and the OpenAPI document
    errors: tuple[int, ...] = ()  # answers beyond the ones every route of its kind has


_ERROR_TEXT = {
    400: "Invalid parameters or body",
    401: "Missing or invalid token",
    403: "Role not allowed",
    404: "Unknown id",
    409: "Invalid status transition or conflicting change",
    503: "Redis or ClickHouse unavailable",
    504: "Still running",
}


def error_codes(route: Route, protected_reads: bool) -> list[int]:
    """Every problem status `route` can answer."""
    if route.public:
        return sorted({*route.errors})
    codes = {400, 503, *route.errors}
    if "{id}" in route.path:
        codes.add(404)
    if route.role is not None or protected_reads:
        codes |= {401, 403}
    return sorted(codes)


def openapi_document(routes: list[Route], description: str = "",
                     protected_reads: bool = False) -> dict[str, Any]:
    outputs = {route.response for route in routes if route.response is not None} | {Problem}
    inputs = {route.body for route in routes if route.body is not None}
    keyed = ([(m, "serialization") for m in sorted(outputs, key=lambda m: m.__name__)]
             + [(m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)])
    refs, defs = models_json_schema(keyed,  # type: ignore[arg-type]
                                    ref_template="#/components/schemas/{model}")
    ref_of = {model: schema for (model, mode), schema in refs.items() if mode == "serialization"}
    body_ref = {model: schema for (model, mode), schema in refs.items() if mode == "validation"}
    problem = {PROBLEM_TYPE: {"schema": ref_of[Problem]}}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "operationId": _operation_id(route), "summary": route.summary, "tags": [route.tag],
            "parameters": _parameters(route),
            "responses": {"200": _ok(route, ref_of)},
        }
        if route.body is not None:
            operation["requestBody"] = {"required": route.method == "PUT" or _required(route.body),
                                        "content": {"application/json": {
                                            "schema": body_ref[route.body]}}}
        operation["responses"] |= {str(code): {"description": _ERROR_TEXT[code],
                                               "content": problem}
                                   for code in error_codes(route, protected_reads)}
        if route.role is not None or (protected_reads and not route.public):
            operation["security"] = [{"bearer": []}]
            operation["x-required-role"] = (route.role or Role.VIEWER).value
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "apigw control plane", "version": "1", "description": description},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _required(model: type[BaseModel]) -> bool:
    return any(field.is_required() for field in model.model_fields.values())


def _operation_id(route: Route) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", route.path.replace("{id}", "by_id")).strip("_")
    return f"{route.method.lower()}_{words}"


def _ok(route: Route, ref_of: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    if route.path == "/metrics":
        return {"description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}}}
    if route.response is None:
        return {"description": "OK", "content": {"application/json": {"schema": {
            "type": "object"}}}}
    return {"description": "OK",
            "content": {"application/json": {"schema": ref_of[route.response]}}}


def _parameters(route: Route) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if "{id}" in route.path:
        found.append({"name": "id", "in": "path", "required": True,
                      "schema": {"type": "string", "pattern": ID_PATTERN}})
    if route.params is None:
        return found
    schema = route.params.model_json_schema()
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        entry: dict[str, Any] = {"name": name, "in": "query", "required": name in required,
                                 "schema": _not_null(prop)}
        if "description" in prop:
            entry["description"] = prop["description"]
        found.append(entry)
    if "$defs" in schema:  # enum parameters: inline their definitions
        for entry in found:
            entry["schema"] = _inline(entry["schema"], schema["$defs"])
    return found


def _not_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a value, never null: drop the null branch and default."""
    schema = {k: v for k, v in prop.items()
              if k != "description" and not (k == "default" and v is None)}
    branches = [b for b in schema.get("anyOf", []) if b != {"type": "null"}]
    if "anyOf" in schema:
        del schema["anyOf"]
        if len(branches) == 1:
            schema |= branches[0]
        else:
            schema["anyOf"] = branches
    return schema


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        if "$ref" in schema:
            return defs[schema["$ref"].rsplit("/", 1)[-1]]
        return {key: _inline(value, defs) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    return schema
