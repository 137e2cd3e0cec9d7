"""The OpenAPI document is derived: its paths are the app's routes, its query parameters the Structs that validate
the query, and it offers no Authorize button when there are no keys."""

from __future__ import annotations

import json

import msgspec
import pytest
from helpers import keys_file
from kafka_local import free_port
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from openapi import PLAN_EXAMPLE
from pusher import app_state, create_app
from schemas import SSE_KEEPALIVE, ListQuery, StatusQuery
from settings import load_settings

QUERIES = {("/api/v1/commands", "get"): ListQuery, ("/api/v1/commands/{request_id}/status", "get"): StatusQuery}


def _settings(tmp_path, **env: str):
    return load_settings(
        {"JOURNAL_PATH": str(tmp_path / "journal.db"), "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", **env},
        env_file="/nonexistent",
    )


def _document(app) -> dict:
    return json.loads(app_state(app).openapi)


@pytest.fixture(params=["open", "keys", "keys+metrics_public"])
def app(request, tmp_path):
    """The app as each authentication setting builds it (no lifespan: only its routes and document)."""
    env = {}
    if request.param != "open":
        env["API_KEYS_FILE"] = keys_file(tmp_path / "keys.toml")
    if request.param == "keys+metrics_public":
        env["METRICS_PUBLIC"] = "true"
    return create_app(_settings(tmp_path, **env))


def test_every_route_is_documented_and_every_operation_is_a_route(app):
    """The paths and methods of the document are exactly those of the route table (HEAD and the docs' static
    files aside)."""
    routes = {(r.path, m) for r in app.routes if isinstance(r, Route) for m in r.methods - {"HEAD"}}
    others = [r for r in app.routes if not isinstance(r, Route)]
    assert [(type(r), r.path) for r in others] == [(Mount, "/docs/assets")]
    documented = {(path, method.upper()) for path, item in _document(app)["paths"].items() for method in item}
    assert documented == routes
    assert ("/metrics", "GET") in documented


def test_operation_ids_are_unique_and_each_operation_answers_problems(app):
    """Each operation has its own id, a 500 problem, and is named in Swagger UI's tags."""
    operations = [op for item in _document(app)["paths"].values() for op in item.values()]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids))
    for op in operations:
        assert op["tags"] and op["summary"]
        assert "application/problem+json" in op["responses"]["500"]["content"]


def test_query_parameters_are_the_query_structs(app):
    """A query parameter's schema is its field's msgspec JSON Schema: device_id carries DeviceId's limits."""
    paths = _document(app)["paths"]
    for (path, method), struct in QUERIES.items():
        schema = msgspec.json.schema(struct)["$defs"][struct.__name__]
        parameters = {p["name"]: p for p in paths[path][method]["parameters"] if p["in"] == "query"}
        assert {name: p["schema"] for name, p in parameters.items()} == schema["properties"]
        assert all(p["required"] is (name in schema["required"]) for name, p in parameters.items())
    device_id = next(p for p in paths["/api/v1/commands"]["get"]["parameters"] if p["name"] == "device_id")
    assert device_id["schema"]["maxLength"] == 255 and device_id["schema"]["minLength"] == 1


def test_path_parameters_come_from_the_route(app):
    """`{request_id}` in a route's path is a required path parameter of its operations."""
    for path in ("/api/v1/commands/{request_id}/status", "/api/v1/commands/{request_id}/events"):
        [parameter] = [p for p in _document(app)["paths"][path]["get"]["parameters"] if p["in"] == "path"]
        assert parameter == {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}


def test_security_schemes_only_with_keys(app):
    """Without keys the document has no security scheme (Swagger UI shows an Authorize button for an empty one);
    with keys, every path but the open ones may answer 401."""
    doc = _document(app)
    settings = app_state(app).settings
    if not settings.auth:
        assert "securitySchemes" not in doc["components"] and "security" not in doc
        assert all("401" not in op["responses"] for item in doc["paths"].values() for op in item.values())
        return
    assert set(doc["components"]["securitySchemes"]) == {"apiKey", "bearer"}
    open_paths = {"/health", "/ready", "/docs", "/docs/init.js", "/openapi.json"}
    if settings.metrics_public:
        open_paths |= {"/metrics", "/api/v1/metrics", "/api/v1/status"}
    for path, item in doc["paths"].items():
        for op in item.values():
            if path in open_paths:
                assert op["security"] == [] and "401" not in op["responses"], path
            else:
                assert "security" not in op and "401" in op["responses"], path


def test_document_names_bodies_examples_and_settings(tmp_path):
    """Bodies in JSON and MessagePack with the plan's example, problem answers, and the settings that narrow the
    schemas (ALLOWED_PROTOCOLS, MAX_BATCH)."""
    doc = _document(create_app(_settings(tmp_path, ALLOWED_PROTOCOLS="mqtt", MAX_BATCH="7")))
    assert doc["openapi"] == "3.1.0"
    single = doc["paths"]["/api/v1/commands"]["post"]
    assert single["requestBody"]["content"]["application/json"]["example"] == PLAN_EXAMPLE
    assert "application/msgpack" in single["requestBody"]["content"]
    assert set(single["responses"]) >= {"200", "400", "408", "413", "415", "422", "431", "500", "503"}
    assert "application/problem+json" in single["responses"]["422"]["content"]
    schemas = doc["components"]["schemas"]
    assert {"CommandRequest", "CommandResponse", "Problem", "BatchCommandResponse", "CommandStatus"} <= set(schemas)
    assert schemas["CommandRequest"]["properties"]["qos"]["anyOf"][0]["maximum"] == 2
    assert schemas["CommandRequest"]["properties"]["protocol"] == {"enum": ["mqtt"]}
    assert schemas["BatchCommandRequest"]["properties"]["commands"]["maxItems"] == 7
    assert all(ref.split("/")[-1] in schemas for ref in _refs(doc)) and len(_refs(doc)) > 10
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    events = doc["paths"]["/api/v1/commands/{request_id}/events"]["get"]["description"]
    assert f"A comment line every {SSE_KEEPALIVE:g} s" in events


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_handlers_hold_the_documented_query_limits(tmp_path):
    """The documented bounds of each query parameter are where the handler starts answering 422."""
    app = create_app(_settings(tmp_path))
    doc = _document(app)
    within = {"/api/v1/commands": 200, "/api/v1/commands/{request_id}/status": 404}  # no command is known
    checked = set()
    with TestClient(app) as client:
        for (path, method), _ in QUERIES.items():
            url = path.replace("{request_id}", "unknown")
            for parameter in doc["paths"][path][method]["parameters"]:
                schema, name = parameter["schema"], parameter["name"]
                edges = []
                if "maximum" in schema:
                    edges.append((schema["maximum"], schema["maximum"] + 1))
                if "minimum" in schema:
                    edges.append((schema["minimum"], schema["minimum"] - 1))
                if "maxLength" in schema:
                    edges.append(("x" * schema["maxLength"], "x" * (schema["maxLength"] + 1)))
                for edge, beyond in edges:
                    assert client.get(url, params={name: edge}).status_code == within[path], (name, edge)
                    refused = client.get(url, params={name: beyond})
                    assert refused.status_code == 422, (name, beyond)
                    assert refused.json()["errors"][0]["loc"] == f"query.{name}"
                    checked.add(name)
    assert checked == {"device_id", "limit", "before", "timeout", "fanout_id"}
