from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import operator
import os
import re
import secrets
import select
import socket
import stat
import string
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import anyio
import httpx
import hypothesis
import openai
import pytest
import trustme
import uvicorn
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.testclient import TestClient

import clove

HERE = Path(__file__).resolve().parent
API_KEY = "test-proxy-key"
ACCESS_TOKEN = "sk-ant-oat01-access-aaaa"
REFRESH_TOKEN = "sk-ant-ort01-refresh-bbbb"
NEW_ACCESS_TOKEN = "sk-ant-oat01-access-cccc"
NEW_REFRESH_TOKEN = "sk-ant-ort01-refresh-dddd"
TOKEN_URL = "https://oauth.test/v1/oauth/token"
UPSTREAM = "https://api.test"

MESSAGE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "Hello from the fake upstream."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 7},
}
REQUEST_BODY = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def message_stream_events(text_parts: list[str]) -> list[bytes]:
    """The event sequence the Messages API sends for a streamed text reply."""
    start = {**MESSAGE, "content": [], "stop_reason": None, "usage": {"input_tokens": 12, "output_tokens": 1}}
    events = [
        sse_event("message_start", {"type": "message_start", "message": start}),
        sse_event(
            "content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        ),
        sse_event("ping", {"type": "ping"}),
    ]
    for part in text_parts:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": part}}
        events.append(sse_event("content_block_delta", delta))
    events += [
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse_event(
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 7}},
        ),
        sse_event("message_stop", {"type": "message_stop"}),
    ]
    return events


def token_payload(access_token: str = NEW_ACCESS_TOKEN, refresh_token: str | None = NEW_REFRESH_TOKEN) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": 28800,
        "scope": "user:profile user:inference",
        "organization": {"uuid": "org-1234"},
        "account": {"uuid": "acct-5678", "email_address": "person@example.com"},
    }
    if refresh_token is not None:
        payload["refresh_token"] = refresh_token
    return payload


class FakeAnthropic:
    """A MockTransport handler for the Messages API and the OAuth token endpoint.

    Queue responses per path with `queue`; when a path's queue is empty it returns a normal
    reply. Every request is recorded, with its body read.
    """

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.queued: dict[str, list[Callable[[httpx.Request], Any]]] = {}
        self.token_delay = 0.0

    def queue(self, path: str, *responders: Callable[[httpx.Request], Any]) -> None:
        self.queued.setdefault(path, []).extend(responders)

    def requests_to(self, path: str) -> list[httpx.Request]:
        return [request for request in self.requests if request.url.path == path]

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        path = request.url.path
        if path == "/v1/oauth/token" and self.token_delay:
            await anyio.sleep(self.token_delay)
        if self.queued.get(path):
            result = self.queued[path].pop(0)(request)
            if isinstance(result, Exception):
                raise result
            return result
        return self.default_response(request)

    def default_response(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/oauth/token":
            return httpx.Response(200, json=token_payload())
        if path == "/v1/messages/count_tokens":
            return httpx.Response(200, json={"input_tokens": 9})
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [], "has_more": False, "first_id": None, "last_id": None})
        if path == "/v1/messages":
            if json.loads(request.content).get("stream"):
                return httpx.Response(
                    200, headers={"content-type": "text/event-stream"}, content=b"".join(message_stream_events(["Hi", "!"]))
                )
            return httpx.Response(200, json=MESSAGE, headers={"request-id": "req_01"})
        return httpx.Response(404, json=clove.error_body("not_found_error", "not found"))


def make_account(**changes: Any) -> clove.Account:
    now = int(time.time())
    values: dict[str, Any] = {
        "organization_uuid": "org-1234",
        "access_token": ACCESS_TOKEN,
        "refresh_token": REFRESH_TOKEN,
        "expires_at": now + 8 * 3600,
        "status": "valid",
        "created_at": now,
        "updated_at": now,
    }
    values.update(changes)
    return clove.Account(**values)


def reply(status_code: int, **kwargs: Any) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status_code, **kwargs)


def fail_with(exception: Exception) -> Callable[[httpx.Request], Exception]:
    return lambda request: exception


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Path) -> clove.Settings:
    return clove.Settings(
        api_key=API_KEY,
        data_folder=tmp_path / "data",
        claude_api_baseurl=UPSTREAM,
        oauth_token_url=TOKEN_URL,
        retry_delay=0.0,
    )


@pytest.fixture
def store(settings: clove.Settings) -> clove.AccountStore:
    account_store = clove.AccountStore(settings.data_folder)
    account_store.save(make_account())
    return account_store


@pytest.fixture
def fake() -> FakeAnthropic:
    return FakeAnthropic()


@pytest.fixture
def client(settings: clove.Settings, store: clove.AccountStore, fake: FakeAnthropic) -> Iterator[TestClient]:
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        yield test_client


def post_message(client: TestClient, body: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
    return client.post("/v1/messages", content=json.dumps(body or REQUEST_BODY), **kwargs)


# --- Settings ---


def test_settings_defaults_match_the_table() -> None:
    assert clove.load_settings({"CLOVE_ENV_FILE": "/nonexistent/clove.env"}) == clove.Settings()


def test_settings_dataclass_lists_every_setting() -> None:
    names = {spec.name.lower() for spec in clove.SETTINGS}
    assert names == {item.name for item in clove.dataclasses.fields(clove.Settings)}


def test_settings_precedence(tmp_path: Path) -> None:
    data_folder = tmp_path / "data"
    data_folder.mkdir()
    (data_folder / "config.json").write_text(
        json.dumps({"port": 6001, "host": "10.0.0.1", "log_level": "debug", "oauth": {"client_id": "from-json"}})
    )
    env_file = tmp_path / "clove.env"
    env_file.write_text("PORT=6002\nHOST=127.0.0.2\n")
    environ = {"CLOVE_ENV_FILE": str(env_file), "DATA_FOLDER": str(data_folder), "PORT": "6003"}

    settings = clove.load_settings(environ)

    assert settings.port == 6003
    assert settings.host == "127.0.0.2"
    assert settings.log_level == "DEBUG"
    assert settings.oauth_client_id == "from-json"
    assert settings.retry_delay == 1.0


def test_settings_env_file_in_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clove.env").write_text("MAX_RETRIES=5\nRETRY_DELAY=0.25\n")
    settings = clove.load_settings({"DATA_FOLDER": str(tmp_path / "data")})
    assert settings.max_retries == 5
    assert settings.retry_delay == 0.25


def test_settings_expand_home_in_paths(tmp_path: Path) -> None:
    settings = clove.load_settings({"CLOVE_ENV_FILE": "/nonexistent", "HOME": str(tmp_path), "DATA_FOLDER": "~/clove"})
    assert settings.data_folder == Path("~/clove").expanduser()
    assert "~" not in str(settings.data_folder)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PORT", "http", "invalid PORT 'http': expected a whole number from 1 to 65535"),
        ("PORT", "70000", "invalid PORT '70000': expected a whole number from 1 to 65535"),
        ("LOG_LEVEL", "LOUD", "invalid LOG_LEVEL 'LOUD': expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("RETRY_DELAY", "soon", "invalid RETRY_DELAY 'soon': expected a number of seconds from 0 to 60"),
        ("RETRY_DELAY", "nan", "invalid RETRY_DELAY 'nan': expected a number of seconds from 0 to 60"),
        ("MAX_RETRIES", "0", "invalid MAX_RETRIES '0': expected a whole number from 1 to 20"),
        ("DEFAULT_MAX_TOKENS", "0", "invalid DEFAULT_MAX_TOKENS '0': expected a whole number from 1 to 1000000"),
        ("DEFAULT_MAX_TOKENS", "lots", "invalid DEFAULT_MAX_TOKENS 'lots': expected a whole number from 1 to 1000000"),
        ("CLAUDE_API_BASEURL", "api.anthropic.com", "invalid CLAUDE_API_BASEURL 'api.anthropic.com': expected an http"),
    ],
)
def test_settings_invalid_value_names_setting(name: str, value: str, message: str) -> None:
    with pytest.raises(clove.SettingsError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        clove.load_settings({"CLOVE_ENV_FILE": "/nonexistent", name: value})


def test_settings_empty_host_rejected() -> None:
    with pytest.raises(clove.SettingsError, match="^invalid HOST '': expected an address such as 127.0.0.1"):
        clove.load_settings({"CLOVE_ENV_FILE": "/nonexistent", "HOST": ""})


def test_settings_config_json_invalid(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(clove.SettingsError, match="invalid JSON in .*config.json"):
        clove.load_settings({"CLOVE_ENV_FILE": "/nonexistent", "DATA_FOLDER": str(tmp_path)})


def test_settings_error_hides_api_key() -> None:
    spec = clove.SettingSpec("API_KEY", ("api_key",), clove._make_int_parser(1, 2), "", "", secret=True)
    with pytest.raises(clove.SettingsError) as caught:
        clove._parse_setting(spec, "secret-value")
    assert "secret-value" not in str(caught.value)


def test_main_reports_bad_setting_in_one_line(tmp_path: Path) -> None:
    environment = {**os.environ, "PORT": "abc", "CLOVE_ENV_FILE": "/nonexistent", "DATA_FOLDER": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(HERE / "clove.py")], env=environment, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == clove.EXIT_USAGE
    assert result.stderr == "clove: invalid PORT 'abc': expected a whole number from 1 to 65535\n"


def test_env_example_lists_every_setting() -> None:
    text = (HERE / "clove.env.example").read_text()
    for spec in clove.SETTINGS:
        assert f"# {spec.name}={spec.default}" in text, spec.name


# --- Accounts ---


def test_account_repr_hides_tokens() -> None:
    text = repr(make_account())
    assert ACCESS_TOKEN not in text
    assert REFRESH_TOKEN not in text


def test_store_save_is_private_and_atomic(tmp_path: Path) -> None:
    store = clove.AccountStore(tmp_path / "data")
    store.save(make_account())
    store.save(make_account(access_token="second"))

    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "data").st_mode) == 0o700
    assert os.listdir(tmp_path / "data") == ["account.json"]
    assert store.load() == make_account(access_token="second", created_at=store.load().created_at, updated_at=store.load().updated_at)  # type: ignore[union-attr]


def test_store_failed_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = clove.AccountStore(tmp_path)
    store.save(make_account())
    before = store.path.read_bytes()

    def failing_fsync(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(clove.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        store.save(make_account(access_token="lost"))

    assert store.path.read_bytes() == before
    assert os.listdir(tmp_path) == ["account.json"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{", "is not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"refresh_token": "x"}', "missing field access_token"),
        ('{"access_token": 5}', "field access_token must be of type str"),
        ('{"access_token": "a", "expires_at": "soon"}', "field expires_at must be of type int"),
        ('{"access_token": "a", "status": "maybe"}', "status must be 'valid' or 'invalid'"),
        ('{"access_token": "a", "colour": "red"}', "unknown fields: colour"),
    ],
)
def test_store_load_rejects_bad_file(tmp_path: Path, content: str, reason: str) -> None:
    store = clove.AccountStore(tmp_path)
    store.path.write_text(content)
    with pytest.raises(clove.AccountFileError, match=reason):
        store.load()


def test_corrupt_account_file_is_kept(settings: clove.Settings, fake: FakeAnthropic) -> None:
    settings.data_folder.mkdir(parents=True)
    path = settings.data_folder / "account.json"
    path.write_text('{"access_token": "half')
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))

    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        health = test_client.get("/health")
        response = post_message(test_client)

    assert health.json() == {"status": "ok", "account_valid": False, "account_status": "unreadable"}
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert "import-claude-code" in response.json()["error"]["message"]
    assert path.read_text() == '{"access_token": "half'
    assert fake.requests == []


# --- Importing credentials ---


def test_import_claude_code_converts_milliseconds(settings: clove.Settings, tmp_path: Path) -> None:
    credentials = tmp_path / ".credentials.json"
    credentials.write_text(
        json.dumps(
            {
                "claudeAiOauth": {
                    "accessToken": ACCESS_TOKEN,
                    "refreshToken": REFRESH_TOKEN,
                    "expiresAt": 1767225600123,
                    "scopes": ["user:inference", "user:profile"],
                    "subscriptionType": "max",
                }
            }
        )
    )
    clove.import_claude_code(settings, credentials)

    account = clove.AccountStore(settings.data_folder).load()
    assert account is not None
    assert account.expires_at == 1767225600
    assert account.access_token == ACCESS_TOKEN
    assert account.refresh_token == REFRESH_TOKEN
    assert account.status == "valid"


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({}, "has no claudeAiOauth object"),
        ({"claudeAiOauth": {"refreshToken": "r"}}, "accessToken is missing"),
        ({"claudeAiOauth": {"accessToken": "a", "expiresAt": "tomorrow"}}, "expiresAt must be a number"),
    ],
)
def test_import_claude_code_rejects_bad_file(
    settings: clove.Settings, tmp_path: Path, document: dict[str, Any], reason: str
) -> None:
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps(document))
    with pytest.raises(clove.AccountFileError, match=reason):
        clove.import_claude_code(settings, credentials)
    assert not (settings.data_folder / "account.json").exists()


def test_import_token_is_never_refreshed(settings: clove.Settings, fake: FakeAnthropic) -> None:
    clove.import_token(settings, "sk-ant-oat01-long-lived\n")
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))

    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        health = test_client.get("/health").json()
        response = post_message(test_client)

    assert response.status_code == 200
    assert fake.requests_to("/v1/oauth/token") == []
    assert fake.requests_to("/v1/messages")[0].headers["authorization"] == "Bearer sk-ant-oat01-long-lived"
    assert health["account_valid"] is True
    assert health["refreshable"] is False


def test_import_command_sets_aside_unreadable_file(tmp_path: Path) -> None:
    data_folder = tmp_path / "data"
    data_folder.mkdir()
    (data_folder / "account.json").write_text("garbage")
    environment = {**os.environ, "CLOVE_ENV_FILE": "/nonexistent", "DATA_FOLDER": str(data_folder)}

    result = subprocess.run(
        [sys.executable, str(HERE / "clove.py"), "import-token", "-"],
        input="sk-ant-oat01-from-stdin\n",
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    assert "sk-ant-oat01-from-stdin" not in result.stdout + result.stderr
    backups = [name for name in os.listdir(data_folder) if name.startswith("account.json.unreadable-")]
    assert len(backups) == 1
    assert (data_folder / backups[0]).read_text() == "garbage"
    assert json.loads((data_folder / "account.json").read_text())["access_token"] == "sk-ant-oat01-from-stdin"


# --- Proxy key ---


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "wrong"},
        {"authorization": "Bearer wrong"},
        {"authorization": API_KEY},
        {"x-api-key": "kéy".encode()},  # type: ignore[dict-item]
    ],
    ids=["missing", "wrong x-api-key", "wrong bearer", "no bearer scheme", "non-ascii"],
)
def test_api_key_rejected(client: TestClient, fake: FakeAnthropic, headers: dict[str, str]) -> None:
    client.headers.pop("x-api-key")
    response = post_message(client, headers=headers)
    assert response.status_code == 401
    assert response.json() == clove.error_body(
        "authentication_error", "Missing or invalid clove API key. Send it as x-api-key or Authorization: Bearer."
    )
    assert fake.requests == []


def test_api_key_as_bearer_accepted(client: TestClient) -> None:
    client.headers.pop("x-api-key")
    response = post_message(client, headers={"authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200


def test_api_key_non_ascii_header_bytes(settings: clove.Settings, store: clove.AccountStore, fake: FakeAnthropic) -> None:
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "path": "/v1/models",
        "raw_path": b"/v1/models",
        "query_string": b"",
        "headers": [(b"x-api-key", "\u00ff\u00fe日本".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 5201),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    anyio.run(app, scope, receive, send)
    assert sent[0]["status"] == 401


def test_generated_api_key_is_stored_privately(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = clove.Settings(data_folder=tmp_path / "data")
    clove.create_app(settings)
    first_output = capsys.readouterr().out
    key = (tmp_path / "data" / "api_key").read_text().strip()

    clove.create_app(settings)

    assert key in first_output
    assert key not in capsys.readouterr().out
    assert stat.S_IMODE(os.stat(tmp_path / "data" / "api_key").st_mode) == 0o600
    assert clove.load_or_create_api_key(settings) == (key, False)


# --- Health and routing ---


def test_health_needs_no_key(client: TestClient) -> None:
    client.headers.pop("x-api-key")
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["account_valid"] is True
    assert body["account_status"] == "valid"
    assert body["refreshable"] is True
    assert 8 * 3600 - 5 <= body["expires_in_seconds"] <= 8 * 3600
    assert ACCESS_TOKEN not in json.dumps(body)


def test_health_without_account(settings: clove.Settings, fake: FakeAnthropic) -> None:
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        health = test_client.get("/health")
        response = post_message(test_client)
    assert health.json() == {"status": "ok", "account_valid": False, "account_status": "missing"}
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert "import-claude-code" in response.json()["error"]["message"]


def test_unknown_route_is_not_found_error(client: TestClient) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json() == clove.error_body("not_found_error", "No route for GET /v1/nothing.")


def test_wrong_method_is_405(client: TestClient) -> None:
    response = client.get("/v1/messages")
    assert response.status_code == 405
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_cors_off_by_default(client: TestClient) -> None:
    response = client.get("/health", headers={"origin": "https://example.com"})
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_listed_origin(settings: clove.Settings, store: clove.AccountStore, fake: FakeAnthropic) -> None:
    settings = clove.dataclasses.replace(settings, cors_origins=["https://chat.example.com"])
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    with TestClient(app) as test_client:
        allowed = test_client.get("/health", headers={"origin": "https://chat.example.com"})
        other = test_client.get("/health", headers={"origin": "https://evil.example.com"})
    assert allowed.headers["access-control-allow-origin"] == "https://chat.example.com"
    assert "access-control-allow-origin" not in other.headers


# --- Request checks ---


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "Request body must be a JSON object."),
        (b"[1, 2]", "Request body must be a JSON object."),
        (b"\xff\xfe", "Request body must be a JSON object."),
        (b"[" * 100_000, "Request body must be a JSON object."),
        (b'{"max_tokens": 5, "messages": [{}]}', "model: Field required (expected a non-empty string)."),
        (b'{"model": 5, "max_tokens": 5, "messages": [{}]}', "model: expected a non-empty string, got int."),
        (b'{"model": "m", "max_tokens": 5}', "messages: Field required (expected a non-empty list)."),
        (b'{"model": "m", "max_tokens": 5, "messages": []}', "messages: expected a non-empty list, got an empty list."),
        (b'{"model": "m", "messages": [{}]}', "max_tokens: Field required (expected an integer)."),
        (b'{"model": "m", "max_tokens": "5", "messages": [{}]}', "max_tokens: expected an integer, got str."),
        (b'{"model": "m", "max_tokens": true, "messages": [{}]}', "max_tokens: expected an integer, got bool."),
    ],
)
def test_messages_invalid_body(client: TestClient, fake: FakeAnthropic, content: bytes, message: str) -> None:
    response = client.post("/v1/messages", content=content)
    assert response.status_code == 400
    assert response.json() == clove.error_body("invalid_request_error", message)
    assert fake.requests == []


def test_body_over_limit_by_content_length(settings: clove.Settings, store: clove.AccountStore, fake: FakeAnthropic) -> None:
    settings = clove.dataclasses.replace(settings, max_body_bytes=100)
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        response = test_client.post("/v1/messages", content=b"x" * 101)
    assert response.status_code == 413
    assert response.json() == clove.error_body("request_too_large", "Request body is 101 bytes; the maximum is 100 bytes.")
    assert fake.requests == []


def test_body_over_limit_streamed(settings: clove.Settings, store: clove.AccountStore, fake: FakeAnthropic) -> None:
    settings = clove.dataclasses.replace(settings, max_body_bytes=100)
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    chunks_sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal chunks_sent
        for _ in range(1000):
            chunks_sent += 1
            yield b"y" * 40

    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        response = test_client.post("/v1/messages", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"
    assert fake.requests == []


# --- Forwarding ---


def test_body_forwarded_byte_for_byte(client: TestClient, fake: FakeAnthropic) -> None:
    body = (
        b'{ "model":"claude-sonnet-4-5",  "max_tokens" : 64,\n "messages":[{"role":"user","content":"caf\\u00e9 \xe6\x97\xa5"}],'
        b'"thinking_signature":"abc==" , "extra": 1.50}'
    )
    response = client.post("/v1/messages", content=body)
    assert response.status_code == 200
    assert fake.requests_to("/v1/messages")[0].content == body


def test_upstream_headers_merged_and_stripped(client: TestClient, fake: FakeAnthropic) -> None:
    post_message(
        client,
        headers={
            "anthropic-beta": "prompt-caching-2024-07-31, oauth-2025-04-20,context-1m-2025-08-07",
            "anthropic-version": "2023-01-01",
            "cookie": "session=1",
            "x-stainless-lang": "python",
            "user-agent": "my-client/1.0",
            "connection": "keep-alive, x-drop-me",
            "x-drop-me": "1",
            "te": "trailers",
        },
    )
    headers = fake.requests_to("/v1/messages")[0].headers

    assert headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31,oauth-2025-04-20,context-1m-2025-08-07"
    assert headers["anthropic-version"] == "2023-01-01"
    assert headers["x-stainless-lang"] == "python"
    assert headers["user-agent"] == "my-client/1.0"
    assert headers["accept-encoding"] == "identity"
    assert "x-api-key" not in headers
    assert "cookie" not in headers
    assert "x-drop-me" not in headers
    assert "te" not in headers
    assert headers.get_list("authorization") == [f"Bearer {ACCESS_TOKEN}"]


def test_upstream_headers_defaults(client: TestClient, fake: FakeAnthropic) -> None:
    client.headers.pop("user-agent", None)
    post_message(client)
    headers = fake.requests_to("/v1/messages")[0].headers
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "oauth-2025-04-20"
    assert "user-agent" not in headers


def test_query_string_forwarded(client: TestClient, fake: FakeAnthropic) -> None:
    client.post("/v1/messages?beta=true", content=json.dumps(REQUEST_BODY))
    assert fake.requests_to("/v1/messages")[0].url.query == b"beta=true"


def test_response_headers_passed_back(client: TestClient, fake: FakeAnthropic) -> None:
    fake.queue(
        "/v1/messages",
        reply(
            429,
            json=clove.error_body("rate_limit_error", "slow down"),
            headers=[
                ("request-id", "req_9"),
                ("anthropic-ratelimit-unified-status", "rejected"),
                ("retry-after", "30"),
                ("set-cookie", "x=1"),
                ("x-repeated", "one"),
                ("x-repeated", "two"),
            ],
        ),
    )
    response = post_message(client)

    assert response.status_code == 429
    assert response.json() == clove.error_body("rate_limit_error", "slow down")
    assert response.headers["request-id"] == "req_9"
    assert response.headers["anthropic-ratelimit-unified-status"] == "rejected"
    assert response.headers["retry-after"] == "30"
    assert "set-cookie" not in response.headers
    assert response.headers.get_list("x-repeated") == ["one", "two"]
    assert response.headers.get_list("content-length") == [str(len(response.content))]
    assert len(fake.requests_to("/v1/messages")) == 1


def test_compressed_response_decoded(client: TestClient, fake: FakeAnthropic) -> None:
    compressed = gzip.compress(json.dumps(MESSAGE).encode())
    fake.queue(
        "/v1/messages",
        reply(200, content=compressed, headers={"content-encoding": "gzip", "content-type": "application/json"}),
    )
    response = post_message(client)
    assert response.content == json.dumps(MESSAGE).encode()
    assert "content-encoding" not in response.headers
    assert response.headers["content-length"] == str(len(response.content))


def test_count_tokens_and_models_forwarded(client: TestClient, fake: FakeAnthropic) -> None:
    counted = client.post("/v1/messages/count_tokens?beta=true", content=json.dumps({"model": "m", "messages": []}))
    models = client.get("/v1/models?limit=5")

    assert counted.json() == {"input_tokens": 9}
    assert models.json() == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
    assert fake.requests[0].headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert fake.requests[1].url.query == b"limit=5"
    assert fake.requests[1].headers["anthropic-beta"] == "oauth-2025-04-20"


# --- Retries ---


def test_retry_on_overloaded_then_success(client: TestClient, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture) -> None:
    fake.queue("/v1/messages", reply(529, json=clove.error_body("overloaded_error", "Overloaded")))
    with caplog.at_level(logging.INFO, logger="clove"):
        response = post_message(client)
    assert response.status_code == 200
    assert len(fake.requests_to("/v1/messages")) == 2
    assert "Upstream attempt 1 of 3 failed (status 529); retrying in 0.0s" in caplog.messages
    assert any(message.startswith("POST /v1/messages -> 200, 2 attempts") for message in caplog.messages)


def test_retry_on_connection_error(client: TestClient, fake: FakeAnthropic) -> None:
    fake.queue("/v1/messages", fail_with(httpx.ConnectError("refused")), fail_with(httpx.ReadTimeout("slow")))
    response = post_message(client)
    assert response.status_code == 200
    assert len(fake.requests_to("/v1/messages")) == 3


def test_retries_exhausted_returns_last_response(client: TestClient, fake: FakeAnthropic) -> None:
    for _ in range(3):
        fake.queue("/v1/messages", reply(503, json=clove.error_body("api_error", "down")))
    response = post_message(client)
    assert response.status_code == 503
    assert response.json() == clove.error_body("api_error", "down")
    assert len(fake.requests_to("/v1/messages")) == 3


def test_connection_errors_exhausted(client: TestClient, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(3):
        fake.queue("/v1/messages", fail_with(httpx.ConnectError("refused")))
    response = post_message(client)
    assert response.status_code == 502
    assert response.json() == clove.error_body(
        "api_error", f"The Anthropic API at {UPSTREAM} could not be reached: connection failed."
    )
    assert "Upstream POST /v1/messages failed after 3 attempts: connection failed" in caplog.messages


def test_timeouts_exhausted_give_504(client: TestClient, fake: FakeAnthropic) -> None:
    for _ in range(3):
        fake.queue("/v1/messages", fail_with(httpx.ReadTimeout("slow")))
    response = post_message(client)
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "api_error"


@pytest.mark.parametrize("status_code", [400, 403, 404, 413, 429])
def test_client_errors_not_retried(client: TestClient, fake: FakeAnthropic, status_code: int) -> None:
    fake.queue("/v1/messages", reply(status_code, json=clove.error_body("invalid_request_error", "no")))
    response = post_message(client)
    assert response.status_code == status_code
    assert len(fake.requests_to("/v1/messages")) == 1


def test_short_retry_after_is_honoured(client: TestClient, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture) -> None:
    fake.queue("/v1/messages", reply(503, headers={"retry-after": "0.2"}, json=clove.error_body("api_error", "busy")))
    started = time.monotonic()
    response = post_message(client)
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2
    assert "Upstream attempt 1 of 3 failed (status 503); retrying in 0.2s" in caplog.messages


def test_long_retry_after_is_passed_to_client(client: TestClient, fake: FakeAnthropic) -> None:
    fake.queue("/v1/messages", reply(529, headers={"retry-after": "120"}, json=clove.error_body("overloaded_error", "x")))
    response = post_message(client)
    assert response.status_code == 529
    assert response.headers["retry-after"] == "120"
    assert len(fake.requests_to("/v1/messages")) == 1


def test_upstream_401_refreshes_and_replays(client: TestClient, fake: FakeAnthropic, store: clove.AccountStore) -> None:
    fake.queue("/v1/messages", reply(401, json=clove.error_body("authentication_error", "Invalid bearer token")))
    response = post_message(client)

    sent = fake.requests_to("/v1/messages")
    assert response.status_code == 200
    assert [request.headers["authorization"] for request in sent] == [f"Bearer {ACCESS_TOKEN}", f"Bearer {NEW_ACCESS_TOKEN}"]
    assert len(fake.requests_to("/v1/oauth/token")) == 1
    assert store.load().access_token == NEW_ACCESS_TOKEN  # type: ignore[union-attr]


def test_upstream_401_twice_is_passed_on(client: TestClient, fake: FakeAnthropic) -> None:
    rejection = reply(401, json=clove.error_body("authentication_error", "Invalid bearer token"))
    fake.queue("/v1/messages", rejection, rejection)
    response = post_message(client)
    assert response.status_code == 401
    assert len(fake.requests_to("/v1/messages")) == 2
    assert len(fake.requests_to("/v1/oauth/token")) == 1


def test_upstream_401_with_long_lived_token(settings: clove.Settings, fake: FakeAnthropic) -> None:
    clove.import_token(settings, "sk-ant-oat01-long")
    fake.queue("/v1/messages", reply(401, json=clove.error_body("authentication_error", "expired")))
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        response = post_message(test_client)
    assert response.status_code == 401
    assert response.json() == clove.error_body("authentication_error", "expired")
    assert fake.requests_to("/v1/oauth/token") == []


# --- Streaming ---


def test_stream_passes_bytes_through(client: TestClient, fake: FakeAnthropic) -> None:
    events = message_stream_events(["Hel", "lo"])
    fake.queue(
        "/v1/messages",
        reply(200, headers={"content-type": "text/event-stream", "request-id": "req_s"}, content=b"".join(events)),
    )
    with client.stream("POST", "/v1/messages", content=json.dumps({**REQUEST_BODY, "stream": True})) as response:
        received = b"".join(response.iter_raw())
        headers = response.headers

    assert received == b"".join(events)
    assert headers["content-type"] == "text/event-stream"
    assert headers["request-id"] == "req_s"
    assert b"event: ping" in received


class BreakingStream(httpx.AsyncByteStream):
    """An upstream body that sends some chunks, then fails or waits forever."""

    def __init__(self, chunks: list[bytes], error: Exception | None) -> None:
        self.chunks = chunks
        self.error = error
        self.closed = anyio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error
        await anyio.sleep(3600)

    async def aclose(self) -> None:
        self.closed.set()


def test_stream_failure_after_first_byte(client: TestClient, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture) -> None:
    events = message_stream_events(["partial"])[:4]
    stream = BreakingStream(events, httpx.RemoteProtocolError("peer closed connection"))
    fake.queue("/v1/messages", reply(200, headers={"content-type": "text/event-stream"}, stream=stream))

    with client.stream("POST", "/v1/messages", content=json.dumps({**REQUEST_BODY, "stream": True})) as response:
        received = b"".join(response.iter_raw())

    error_event = clove.sse_error_event(
        "api_error", "The upstream stream broke: connection error (RemoteProtocolError). The response is incomplete."
    )
    assert response.status_code == 200
    assert received == b"".join(events) + error_event
    assert len(fake.requests_to("/v1/messages")) == 1
    assert "Upstream stream broke after the response started: connection error (RemoteProtocolError)" in caplog.messages


def test_stream_timeout_mid_stream(client: TestClient, fake: FakeAnthropic) -> None:
    events = message_stream_events(["partial"])[:3]
    stream = BreakingStream(events, httpx.ReadTimeout("no bytes"))
    fake.queue("/v1/messages", reply(200, headers={"content-type": "text/event-stream"}, stream=stream))
    with client.stream("POST", "/v1/messages", content=json.dumps({**REQUEST_BODY, "stream": True})) as response:
        received = b"".join(response.iter_raw())
    assert received.endswith(clove.sse_error_event("api_error", "The upstream stream broke: timed out waiting for the upstream. The response is incomplete."))


async def disconnect_after_first_chunk(app: Starlette, path: str, body: bytes, upstream: BreakingStream) -> list[dict[str, Any]]:
    """Call app directly, disconnect once the first body chunk went out, and wait for the upstream to close."""
    first_chunk_sent = anyio.Event()
    disconnect = anyio.Event()
    sent: list[dict[str, Any]] = []
    request_delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal request_delivered
        if not request_delivered:
            request_delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message.get("body"):
            first_chunk_sent.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"x-api-key", API_KEY.encode()), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 5201),
    }
    with anyio.fail_after(5):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(app, scope, receive, send)
            await first_chunk_sent.wait()
            disconnect.set()
            with anyio.fail_after(1):
                await upstream.closed.wait()
    return sent


@pytest.mark.anyio
async def test_client_disconnect_closes_upstream(settings: clove.Settings, store: clove.AccountStore, fake: FakeAnthropic) -> None:
    stream = BreakingStream(message_stream_events(["one"])[:2], None)
    fake.queue("/v1/messages", reply(200, headers={"content-type": "text/event-stream"}, stream=stream))
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    body = json.dumps({**REQUEST_BODY, "stream": True}).encode()

    sent = await disconnect_after_first_chunk(app, "/v1/messages", body, stream)

    assert sent[0]["status"] == 200


# --- Tokens ---


def expired_store(settings: clove.Settings, **changes: Any) -> clove.AccountStore:
    account_store = clove.AccountStore(settings.data_folder)
    account_store.save(make_account(expires_at=int(time.time()) - 10, **changes))
    return account_store


@pytest.mark.anyio
async def test_concurrent_requests_refresh_once(settings: clove.Settings, fake: FakeAnthropic) -> None:
    account_store = expired_store(settings)
    fake.token_delay = 0.05
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    statuses: list[int] = []

    async def send_one(proxy_client: httpx.AsyncClient) -> None:
        response = await proxy_client.post("/v1/messages", content=json.dumps(REQUEST_BODY))
        statuses.append(response.status_code)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://clove", headers={"x-api-key": API_KEY}) as proxy_client:
        async with anyio.create_task_group() as task_group:
            for _ in range(12):
                task_group.start_soon(send_one, proxy_client)

    token_requests = fake.requests_to("/v1/oauth/token")
    assert statuses == [200] * 12
    assert len(token_requests) == 1
    assert json.loads(token_requests[0].content) == {
        "grant_type": "refresh_token",
        "refresh_token": REFRESH_TOKEN,
        "client_id": settings.oauth_client_id,
        "scope": "user:profile user:inference",
    }
    assert {request.headers["authorization"] for request in fake.requests_to("/v1/messages")} == {f"Bearer {NEW_ACCESS_TOKEN}"}
    saved = account_store.load()
    assert saved is not None
    assert saved.refresh_token == NEW_REFRESH_TOKEN
    assert saved.account_email == "person@example.com"
    assert saved.account_uuid == "acct-5678"
    assert int(time.time()) + 28790 <= saved.expires_at <= int(time.time()) + 28800  # type: ignore[operator]


def make_tokens(settings: clove.Settings, fake: FakeAnthropic) -> clove.TokenManager:
    http_client = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    return clove.TokenManager(settings, clove.AccountStore(settings.data_folder), http_client)


@pytest.mark.anyio
async def test_refresh_within_leeway(settings: clove.Settings, fake: FakeAnthropic) -> None:
    clove.AccountStore(settings.data_folder).save(make_account(expires_at=int(time.time()) + 200))
    tokens = make_tokens(settings, fake)
    assert await tokens.get_access_token() == NEW_ACCESS_TOKEN


@pytest.mark.anyio
async def test_no_refresh_outside_leeway(settings: clove.Settings, fake: FakeAnthropic) -> None:
    clove.AccountStore(settings.data_folder).save(make_account(expires_at=int(time.time()) + 400))
    tokens = make_tokens(settings, fake)
    assert await tokens.get_access_token() == ACCESS_TOKEN
    assert fake.requests == []


@pytest.mark.anyio
async def test_refresh_keeps_old_refresh_token(settings: clove.Settings, fake: FakeAnthropic) -> None:
    account_store = expired_store(settings)
    fake.queue("/v1/oauth/token", reply(200, json=token_payload(refresh_token=None)))
    tokens = make_tokens(settings, fake)
    assert await tokens.get_access_token() == NEW_ACCESS_TOKEN
    assert account_store.load().refresh_token == REFRESH_TOKEN  # type: ignore[union-attr]


@pytest.mark.anyio
@pytest.mark.parametrize("error", ["invalid_grant", "invalid_client"])
async def test_refresh_rejected_marks_invalid(settings: clove.Settings, fake: FakeAnthropic, error: str) -> None:
    account_store = expired_store(settings)
    fake.queue("/v1/oauth/token", reply(400, json={"error": error, "error_description": "Refresh token not found"}))
    tokens = make_tokens(settings, fake)

    for _ in range(3):
        with pytest.raises(clove.CloveError) as caught:
            await tokens.get_access_token()
        assert caught.value.status_code == 401
        assert caught.value.error_type == "authentication_error"
        assert "Log in again" in caught.value.message

    saved = account_store.load()
    assert saved is not None
    assert saved.status == "invalid"
    assert saved.refresh_token == REFRESH_TOKEN
    assert len(fake.requests_to("/v1/oauth/token")) == 1


TRANSIENT_FAILURES: list[Callable[[httpx.Request], Any]] = [
    reply(500, json={"error": "server_error"}),
    reply(502, text="<html><body>Bad gateway</body></html>", headers={"content-type": "text/html"}),
    reply(200, text="<html>login page</html>", headers={"content-type": "text/html"}),
    reply(429, json={"error": "rate_limited"}, headers={"retry-after": "0"}),
    fail_with(httpx.ReadTimeout("slow")),
    fail_with(httpx.ConnectError("refused")),
]


@pytest.mark.anyio
@pytest.mark.parametrize("failure", TRANSIENT_FAILURES, ids=["500", "502 html", "200 html", "429", "timeout", "refused"])
async def test_refresh_transient_failure_expired(
    settings: clove.Settings, fake: FakeAnthropic, failure: Callable[[httpx.Request], Any]
) -> None:
    account_store = expired_store(settings)
    before = account_store.path.read_bytes()
    fake.queue("/v1/oauth/token", failure, failure, failure)
    tokens = make_tokens(settings, fake)

    with pytest.raises(clove.CloveError) as caught:
        await tokens.get_access_token()

    assert caught.value.status_code == 503
    assert caught.value.error_type == "api_error"
    assert TOKEN_URL in caught.value.message
    assert len(fake.requests_to("/v1/oauth/token")) == 3
    assert account_store.path.read_bytes() == before


@pytest.mark.anyio
@pytest.mark.parametrize("failure", TRANSIENT_FAILURES, ids=["500", "502 html", "200 html", "429", "timeout", "refused"])
async def test_refresh_transient_failure_still_valid(
    settings: clove.Settings, fake: FakeAnthropic, failure: Callable[[httpx.Request], Any]
) -> None:
    clove.AccountStore(settings.data_folder).save(make_account(expires_at=int(time.time()) + 60))
    fake.queue("/v1/oauth/token", failure, failure, failure)
    tokens = make_tokens(settings, fake)

    assert await tokens.get_access_token() == ACCESS_TOKEN
    assert await tokens.get_access_token() == ACCESS_TOKEN
    assert len(fake.requests_to("/v1/oauth/token")) == 3


@pytest.mark.anyio
async def test_burst_shares_failed_refresh(settings: clove.Settings, fake: FakeAnthropic) -> None:
    expired_store(settings)
    fake.token_delay = 0.05
    for _ in range(3):
        fake.queue("/v1/oauth/token", reply(502, text="<html>Bad gateway</html>"))
    tokens = make_tokens(settings, fake)
    statuses: list[int] = []

    async def request_token() -> None:
        try:
            await tokens.get_access_token()
        except clove.CloveError as exc:
            statuses.append(exc.status_code)

    async with anyio.create_task_group() as task_group:
        for _ in range(12):
            task_group.start_soon(request_token)

    assert statuses == [503] * 12
    assert len(fake.requests_to("/v1/oauth/token")) == 3


@pytest.mark.anyio
async def test_refresh_wrong_url_not_retried(settings: clove.Settings, fake: FakeAnthropic) -> None:
    expired_store(settings)
    fake.queue("/v1/oauth/token", reply(404, text="Not Found"))
    tokens = make_tokens(settings, fake)

    with pytest.raises(clove.CloveError) as caught:
        await tokens.get_access_token()

    assert caught.value.status_code == 503
    assert "returned status 404 with a non-JSON body; check OAUTH_TOKEN_URL and OAUTH_CLIENT_ID" in caught.value.message
    assert len(fake.requests_to("/v1/oauth/token")) == 1


def test_health_reports_failing_refresh(settings: clove.Settings, fake: FakeAnthropic) -> None:
    expired_store(settings)
    for _ in range(3):
        fake.queue("/v1/oauth/token", reply(503, text="down"))
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        before = test_client.get("/health").json()
        post_message(test_client)
        after = test_client.get("/health").json()
    assert before["account_valid"] is True
    assert "last_refresh_error" not in before
    assert after["account_valid"] is False
    assert after["last_refresh_error"] == f"POST {TOKEN_URL} returned status 503 with a non-JSON body"


def test_refresh_failure_gives_503_to_client(settings: clove.Settings, fake: FakeAnthropic) -> None:
    expired_store(settings)
    for _ in range(3):
        fake.queue("/v1/oauth/token", reply(503, text="down"))
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        response = post_message(test_client)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "api_error"
    assert "status 503" in response.json()["error"]["message"]
    assert fake.requests_to("/v1/messages") == []


@pytest.mark.anyio
@pytest.mark.parametrize(("errno", "reason"), [(28, "No space left on device"), (30, "Read-only file system")])
async def test_failed_save_keeps_tokens_in_memory(
    settings: clove.Settings,
    fake: FakeAnthropic,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    errno: int,
    reason: str,
) -> None:
    account_store = expired_store(settings)
    tokens = make_tokens(settings, fake)
    real_mkstemp = clove.tempfile.mkstemp

    def failing_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        raise OSError(errno, reason)

    monkeypatch.setattr(clove.tempfile, "mkstemp", failing_mkstemp)
    assert await tokens.get_access_token() == NEW_ACCESS_TOKEN
    assert await tokens.get_access_token() == NEW_ACCESS_TOKEN
    assert account_store.load().refresh_token == REFRESH_TOKEN  # type: ignore[union-attr]
    assert any(reason in message for message in caplog.messages)

    monkeypatch.setattr(clove.tempfile, "mkstemp", real_mkstemp)
    monkeypatch.setattr(clove, "SAVE_RETRY_INTERVAL_SECONDS", 0.0)
    tokens._next_save_attempt = 0.0
    assert await tokens.get_access_token() == NEW_ACCESS_TOKEN
    assert account_store.load().refresh_token == NEW_REFRESH_TOKEN  # type: ignore[union-attr]
    assert len(fake.requests_to("/v1/oauth/token")) == 1


@pytest.mark.anyio
async def test_store_change_is_picked_up(settings: clove.Settings, fake: FakeAnthropic) -> None:
    account_store = clove.AccountStore(settings.data_folder)
    account_store.save(make_account())
    tokens = make_tokens(settings, fake)
    assert await tokens.get_access_token() == ACCESS_TOKEN

    clove.import_token(settings, "sk-ant-oat01-replacement")
    assert await tokens.get_access_token() == "sk-ant-oat01-replacement"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("3", 3.0), ("1.5", 1.5), ("-4", 0.0), ("soon", None), ("nan", None)],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert clove.parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    moment = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    seconds = clove.parse_retry_after(moment)
    assert seconds is not None
    assert 27 <= seconds <= 31


@pytest.mark.parametrize(
    ("client_value", "expected"),
    [
        (None, "oauth-2025-04-20"),
        ("a,b", "a,b,oauth-2025-04-20"),
        ("a, oauth-2025-04-20 ,a", "a,oauth-2025-04-20"),
        (" , ", "oauth-2025-04-20"),
    ],
)
def test_merge_beta_header(client_value: str | None, expected: str) -> None:
    assert clove.merge_beta_header(client_value) == expected


# --- OAuth login ---


def authorization_query(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def start_login(client: TestClient) -> dict[str, str]:
    response = client.get("/oauth/authorize")
    assert response.status_code == 200
    return authorization_query(response.json()["authorization_url"])


def exchange_body(fake: FakeAnthropic) -> dict[str, Any]:
    requests = fake.requests_to("/v1/oauth/token")
    assert len(requests) == 1
    body: dict[str, Any] = json.loads(requests[0].content)
    return body


def test_code_challenge_matches_verifier() -> None:
    verifier = clove.make_code_verifier()
    digest = hashlib.sha256(verifier.encode()).digest()

    assert 43 <= len(verifier) <= 128
    assert set(verifier) <= set(string.ascii_letters + string.digits + "-._~")
    assert clove.make_code_challenge(verifier) == base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert "=" not in clove.make_code_challenge(verifier)
    assert clove.make_code_verifier() != verifier


def test_code_challenge_rfc_example() -> None:
    # The S256 example in RFC 7636 appendix B.
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert clove.make_code_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_authorization_url_carries_each_parameter(settings: clove.Settings) -> None:
    login = clove.PendingLogins(settings).start()
    parts = urllib.parse.urlsplit(login.authorization_url)

    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == settings.oauth_authorize_url
    assert authorization_query(login.authorization_url) == {
        "code": "true",
        "client_id": settings.oauth_client_id,
        "response_type": "code",
        "redirect_uri": settings.oauth_redirect_uri,
        "scope": "user:profile user:inference",
        "code_challenge": clove.make_code_challenge(login.code_verifier),
        "code_challenge_method": "S256",
        "state": login.state,
    }
    assert " " not in parts.query
    assert "scope=user%3Aprofile%20user%3Ainference" in parts.query
    assert login.code_verifier not in login.authorization_url
    assert login.state != login.code_verifier


def test_pending_login_repr_hides_secrets(settings: clove.Settings) -> None:
    login = clove.PendingLogins(settings).start()
    assert login.code_verifier not in repr(login)
    assert login.state not in repr(login)


def test_pending_login_single_use(settings: clove.Settings) -> None:
    logins = clove.PendingLogins(settings)
    login = logins.start()

    assert logins.take(login.state) is login
    with pytest.raises(clove.LoginError, match="^No pending login has this state: it was used already"):
        logins.take(login.state)


def test_pending_login_expires_after_ten_minutes(settings: clove.Settings) -> None:
    now = [1000.0]
    logins = clove.PendingLogins(settings, clock=lambda: now[0])
    fresh = logins.start()
    stale = logins.start()

    now[0] += 600
    assert logins.take(fresh.state) is fresh
    now[0] += 1
    with pytest.raises(clove.LoginError, match="^This login expired: it was started more than 10 minutes ago"):
        logins.take(stale.state)


def test_pending_logins_drop_oldest_first(settings: clove.Settings) -> None:
    logins = clove.PendingLogins(settings)
    started = [logins.start() for _ in range(clove.MAX_PENDING_LOGINS + 2)]

    assert len(logins) == clove.MAX_PENDING_LOGINS
    for dropped in started[:2]:
        with pytest.raises(clove.LoginError, match="No pending login"):
            logins.take(dropped.state)
    assert logins.take(started[2].state) is started[2]
    assert logins.take(started[-1].state) is started[-1]


def test_pending_logins_shared_between_processes(settings: clove.Settings) -> None:
    # Two instances over one data folder behave as two worker processes do.
    first_worker = clove.PendingLogins(settings)
    second_worker = clove.PendingLogins(settings)
    login = first_worker.start()

    assert second_worker.take(login.state) == login
    with pytest.raises(clove.LoginError, match="^No pending login has this state: it was used already"):
        first_worker.take(login.state)
    path = settings.data_folder / "pending_logins.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text()) == []


def test_pending_logins_unwritable_folder_stays_in_memory(
    settings: clove.Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def read_only(path: Path, data: bytes) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(clove, "write_private_file", read_only)
    logins = clove.PendingLogins(settings)
    login = logins.start()

    assert logins.take(login.state) is login
    assert any("pending logins stay in this process only" in message for message in caplog.messages)
    assert login.code_verifier not in caplog.text


def test_pending_logins_drop_expired_on_start(settings: clove.Settings) -> None:
    now = [0.0]
    logins = clove.PendingLogins(settings, clock=lambda: now[0])
    logins.start()
    now[0] += 601
    logins.start()
    assert len(logins) == 1


@pytest.mark.parametrize(
    ("code", "state", "expected"),
    [
        ("abc", "xyz", ("abc", "xyz")),
        ("abc#xyz", None, ("abc", "xyz")),
        ("abc#xyz", "xyz", ("abc", "xyz")),
        (" abc#xyz\n", None, ("abc", "xyz")),
    ],
)
def test_split_code_and_state(code: str, state: str | None, expected: tuple[str, str]) -> None:
    assert clove.split_code_and_state(code, state) == expected


@pytest.mark.parametrize(
    ("code", "state", "message"),
    [
        ("abc#xyz", "other", "The state after # in the code does not match the state parameter."),
        ("abc", None, "The state is missing"),
        ("#xyz", None, "The authorization code is missing."),
        ("", "xyz", "The authorization code is missing."),
    ],
)
def test_split_code_and_state_rejects(code: str, state: str | None, message: str) -> None:
    with pytest.raises(clove.LoginError, match="^" + re.escape(message)):
        clove.split_code_and_state(code, state)


@pytest.mark.parametrize(
    "text",
    [
        "CODE#STATE",
        "CODE#STATE\n",
        "https://platform.claude.com/oauth/code/callback?code=CODE&state=STATE",
        "https://platform.claude.com/oauth/code/callback?code=CODE%23STATE",
        "https://platform.claude.com/oauth/code/callback?code=CODE%23STATE&state=STATE",
        "https://platform.claude.com/oauth/code/callback?code=CODE#STATE",
        "  http://localhost:5201/callback?state=STATE&code=CODE  ",
    ],
)
def test_parse_pasted_code(text: str) -> None:
    assert clove.parse_pasted_code(text) == ("CODE", "STATE")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "The authorization code is missing."),
        ("CODE", "The state is missing"),
        ("https://platform.claude.com/oauth/code/callback?state=STATE", "The pasted URL has no code parameter."),
        (
            "http://localhost:5201/callback?error=access_denied&error_description=The+user+declined&state=S",
            "The authorization server did not grant access (access_denied: The user declined).",
        ),
    ],
)
def test_parse_pasted_code_rejects(text: str, message: str) -> None:
    with pytest.raises(clove.LoginError, match="^" + re.escape(message)):
        clove.parse_pasted_code(text)


def test_authorize_needs_api_key(client: TestClient) -> None:
    client.headers.pop("x-api-key")
    response = client.get("/oauth/authorize")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_authorize_returns_url(client: TestClient, settings: clove.Settings) -> None:
    response = client.get("/oauth/authorize")
    url = response.json()["authorization_url"]
    assert list(response.json()) == ["authorization_url"]
    assert url.startswith(settings.oauth_authorize_url + "?code=true&")
    assert authorization_query(url)["state"] in client.app.state.logins._logins  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/oauth/callback", "/callback"])
@pytest.mark.parametrize("form", ["separate state", "code#state"])
def test_callback_completes_login(
    client: TestClient, fake: FakeAnthropic, store: clove.AccountStore, settings: clove.Settings, path: str, form: str
) -> None:
    query = start_login(client)
    client.headers.pop("x-api-key")
    if form == "separate state":
        params = {"code": "the-code", "state": query["state"]}
    else:
        params = {"code": "the-code#" + query["state"]}

    response = client.get(path, params=params)

    assert response.status_code == 200
    assert response.json() == {"success": True, "message": "Account configured successfully", "organization_uuid": "org-1234"}
    verifier = exchange_body(fake)["code_verifier"]
    assert exchange_body(fake) == {
        "grant_type": "authorization_code",
        "code": "the-code",
        "state": query["state"],
        "client_id": settings.oauth_client_id,
        "redirect_uri": settings.oauth_redirect_uri,
        "code_verifier": verifier,
    }
    assert clove.make_code_challenge(verifier) == query["code_challenge"]
    assert fake.requests_to("/v1/oauth/token")[0].headers["content-type"] == "application/json"
    saved = store.load()
    assert saved is not None
    assert saved.access_token == NEW_ACCESS_TOKEN
    assert saved.refresh_token == NEW_REFRESH_TOKEN
    assert saved.account_email == "person@example.com"
    assert saved.status == "valid"


def test_callback_account_serves_requests(client: TestClient, fake: FakeAnthropic) -> None:
    query = start_login(client)
    client.get("/callback", params={"code": "c", "state": query["state"]})
    response = post_message(client)
    assert response.status_code == 200
    assert fake.requests_to("/v1/messages")[0].headers["authorization"] == f"Bearer {NEW_ACCESS_TOKEN}"


def test_callback_replaces_invalid_account(settings: clove.Settings, fake: FakeAnthropic) -> None:
    account_store = expired_store(settings)
    fake.queue("/v1/oauth/token", reply(400, json={"error": "invalid_grant"}))
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        rejected = post_message(test_client)
        query = start_login(test_client)
        test_client.get("/callback", params={"code": "c", "state": query["state"]})
        health = test_client.get("/health").json()
        response = post_message(test_client)

    assert rejected.status_code == 401
    assert health["account_valid"] is True
    assert response.status_code == 200
    assert account_store.load().status == "valid"  # type: ignore[union-attr]


@pytest.mark.parametrize("case", ["unknown", "reused", "mismatched", "expired"])
def test_callback_bad_state_makes_no_token_call(
    client: TestClient, fake: FakeAnthropic, store: clove.AccountStore, case: str
) -> None:
    before = store.path.read_bytes()
    query = start_login(client)
    params = {"code": "c", "state": query["state"]}
    if case == "unknown":
        params["state"] = "not-a-pending-state"
    elif case == "reused":
        assert client.get("/callback", params=params).status_code == 200
        before = store.path.read_bytes()
    elif case == "mismatched":
        params = {"code": "c#not-the-state", "state": query["state"]}
    else:
        logins = client.app.state.logins  # type: ignore[attr-defined]
        logins.clock = lambda: time.time() + 601
    token_calls = len(fake.requests_to("/v1/oauth/token"))

    response = client.get("/callback", params=params)

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "Start the login again" in response.json()["error"]["message"]
    assert len(fake.requests_to("/v1/oauth/token")) == token_calls
    assert store.path.read_bytes() == before


def test_callback_without_code(client: TestClient, fake: FakeAnthropic) -> None:
    query = start_login(client)
    response = client.get("/callback", params={"state": query["state"]})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("The authorization code is missing.")
    assert fake.requests == []


def test_callback_access_denied_forgets_login(client: TestClient, fake: FakeAnthropic) -> None:
    query = start_login(client)
    denied = client.get("/callback", params={"error": "access_denied", "state": query["state"]})
    retried = client.get("/callback", params={"code": "c", "state": query["state"]})

    assert denied.status_code == 400
    assert denied.json()["error"]["message"].startswith("The authorization server did not grant access (access_denied).")
    assert retried.status_code == 400
    assert fake.requests == []


def test_callback_html_page(client: TestClient, fake: FakeAnthropic) -> None:
    fake.queue("/v1/oauth/token", reply(200, json={**token_payload(), "organization": {"uuid": "<b>org</b>"}}))
    query = start_login(client)
    response = client.get("/callback", params={"code": "c", "state": query["state"]}, headers={"accept": "text/html,*/*"})

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "<h1>Account configured successfully</h1>" in response.text
    assert "&lt;b&gt;org&lt;/b&gt;" in response.text
    assert "<b>org</b>" not in response.text


def test_callback_html_error_page(client: TestClient) -> None:
    response = client.get("/callback", params={"code": "<script>", "state": "x"}, headers={"accept": "text/html"})
    assert response.status_code == 400
    assert "<h1>Login failed</h1>" in response.text
    assert "Start the login again" in response.text


LOGIN_FAILURES: list[tuple[str, Callable[[httpx.Request], Any], int, str]] = [
    (
        "invalid_grant",
        reply(400, json={"error": "invalid_grant", "error_description": "Invalid 'code' in request."}),
        400,
        "rejected the authorization code (status 400, invalid_grant)",
    ),
    ("invalid_client", reply(401, json={"error": "invalid_client"}), 502, "failed with status 401, error invalid_client"),
    ("404 html", reply(404, text="<html>Not found</html>"), 502, "failed with status 404, with a body that is not JSON"),
    ("500", reply(500, json={"error": "server_error"}), 502, "failed with status 500, error server_error"),
    ("200 html", reply(200, text="<html>sign in</html>"), 502, "failed with status 200 without an access_token"),
    ("timeout", fail_with(httpx.ReadTimeout("slow")), 504, "timed out after 30 seconds"),
    ("refused", fail_with(httpx.ConnectError("refused")), 502, "failed (ConnectError)"),
]
with_each_login_failure = pytest.mark.parametrize(
    ("failure", "status_code", "message"),
    [case[1:] for case in LOGIN_FAILURES],
    ids=[case[0] for case in LOGIN_FAILURES],
)


@with_each_login_failure
def test_callback_failure_keeps_account(
    client: TestClient,
    fake: FakeAnthropic,
    store: clove.AccountStore,
    failure: Callable[[httpx.Request], Any],
    status_code: int,
    message: str,
) -> None:
    before = store.path.read_bytes()
    fake.queue("/v1/oauth/token", failure)
    query = start_login(client)

    response = client.get("/callback", params={"code": "c", "state": query["state"]})

    error = response.json()["error"]
    assert response.status_code == status_code
    assert message in error["message"]
    assert TOKEN_URL in error["message"]
    assert "Any stored account is unchanged." in error["message"]
    assert "start the login again" in error["message"].lower()
    assert len(fake.requests_to("/v1/oauth/token")) == 1
    assert store.path.read_bytes() == before
    assert post_message(client).status_code == 200
    assert fake.requests_to("/v1/messages")[0].headers["authorization"] == f"Bearer {ACCESS_TOKEN}"


def test_callback_profile_fallback(client: TestClient, fake: FakeAnthropic, store: clove.AccountStore) -> None:
    payload = token_payload()
    del payload["organization"]
    del payload["account"]
    fake.queue("/v1/oauth/token", reply(200, json=payload))
    fake.queue(
        "/api/oauth/profile",
        reply(200, json={"account": {"uuid": "acct-9", "email": "p@example.com"}, "organization": {"uuid": "org-from-profile"}}),
    )
    query = start_login(client)

    response = client.get("/callback", params={"code": "c", "state": query["state"]})

    profile_request = fake.requests_to("/api/oauth/profile")[0]
    assert response.json()["organization_uuid"] == "org-from-profile"
    assert str(profile_request.url) == UPSTREAM + "/api/oauth/profile"
    assert profile_request.headers["authorization"] == f"Bearer {NEW_ACCESS_TOKEN}"
    saved = store.load()
    assert saved is not None
    assert saved.organization_uuid == "org-from-profile"
    assert saved.account_email == "p@example.com"
    assert saved.account_uuid == "acct-9"


@pytest.mark.parametrize(
    "failure", [reply(500, text="down"), fail_with(httpx.ConnectError("refused"))], ids=["500", "refused"]
)
def test_callback_profile_failure_saves_account(
    client: TestClient, fake: FakeAnthropic, store: clove.AccountStore, failure: Callable[[httpx.Request], Any]
) -> None:
    payload = token_payload()
    del payload["organization"]
    fake.queue("/v1/oauth/token", reply(200, json=payload))
    fake.queue("/api/oauth/profile", failure)
    query = start_login(client)

    response = client.get("/callback", params={"code": "c", "state": query["state"]})

    assert response.json() == {"success": True, "message": "Account configured successfully", "organization_uuid": None}
    assert store.load().access_token == NEW_ACCESS_TOKEN  # type: ignore[union-attr]


def test_callback_no_profile_call_with_organization(client: TestClient, fake: FakeAnthropic) -> None:
    query = start_login(client)
    client.get("/callback", params={"code": "c", "state": query["state"]})
    assert fake.requests_to("/api/oauth/profile") == []


def paste_from_output(output: io.StringIO, make_text: Callable[[dict[str, str]], str]) -> Callable[[], str]:
    """Make a read_line for login_command that returns text built from the URL it printed."""

    def read_line() -> str:
        url = next(line.strip() for line in output.getvalue().splitlines() if line.strip().startswith("https://"))
        return make_text(authorization_query(url)) + "\n"

    return read_line


LOGIN_INPUTS: dict[str, Callable[[dict[str, str]], str]] = {
    "code#state": lambda query: "pasted-code#" + query["state"],
    "callback URL": lambda query: f"{query['redirect_uri']}?code=pasted-code&state={query['state']}",
    "URL with code#state": lambda query: f"{query['redirect_uri']}?code=pasted-code%23{query['state']}",
}


@pytest.mark.parametrize("make_text", LOGIN_INPUTS.values(), ids=LOGIN_INPUTS.keys())
def test_login_command_saves_account(
    settings: clove.Settings, fake: FakeAnthropic, make_text: Callable[[dict[str, str]], str]
) -> None:
    output = io.StringIO()
    account = clove.login_command(settings, paste_from_output(output, make_text), output, httpx.MockTransport(fake))

    body = exchange_body(fake)
    assert body["code"] == "pasted-code"
    assert body["redirect_uri"] == settings.oauth_redirect_uri
    assert set(body) == {"grant_type", "code", "state", "client_id", "redirect_uri", "code_verifier"}
    assert account.organization_uuid == "org-1234"
    assert clove.AccountStore(settings.data_folder).load() == account
    assert "Open this URL in a browser on any device" in output.getvalue()
    assert body["code_verifier"] not in output.getvalue()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pasted-code#some-other-state", "The pasted state does not belong to the URL printed above."),
        ("", "The authorization code is missing."),
        ("pasted-code", "The state is missing"),
    ],
)
def test_login_command_rejects_input(
    settings: clove.Settings, fake: FakeAnthropic, store: clove.AccountStore, text: str, message: str
) -> None:
    before = store.path.read_bytes()
    with pytest.raises(clove.LoginError, match="^" + re.escape(message)):
        clove.login_command(settings, lambda: text, io.StringIO(), httpx.MockTransport(fake))
    assert fake.requests == []
    assert store.path.read_bytes() == before


@with_each_login_failure
def test_login_command_failure_keeps_account(
    settings: clove.Settings,
    fake: FakeAnthropic,
    store: clove.AccountStore,
    failure: Callable[[httpx.Request], Any],
    status_code: int,
    message: str,
) -> None:
    before = store.path.read_bytes()
    fake.queue("/v1/oauth/token", failure)
    output = io.StringIO()
    read_line = paste_from_output(output, LOGIN_INPUTS["code#state"])

    with pytest.raises(clove.LoginError, match=re.escape(message)) as caught:
        clove.login_command(settings, read_line, output, httpx.MockTransport(fake))

    assert caught.value.status_code == status_code
    assert store.path.read_bytes() == before


def test_login_main_reads_stdin(
    settings: clove.Settings, fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(clove, "load_settings", lambda: settings)
    monkeypatch.setattr(clove, "configure_logging", lambda level: None)
    real_login_command = clove.login_command

    def login_with_fake(settings: clove.Settings, read_line: Callable[[], str], stdout: Any) -> clove.Account:
        assert read_line == sys.stdin.readline
        output = io.StringIO()
        return real_login_command(settings, paste_from_output(output, LOGIN_INPUTS["code#state"]), output, httpx.MockTransport(fake))

    monkeypatch.setattr(clove, "login_command", login_with_fake)
    assert clove.main(["login"]) == clove.EXIT_OK
    assert "Account configured successfully for organization org-1234." in capsys.readouterr().out


def test_login_main_reports_failure(
    settings: clove.Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(clove, "load_settings", lambda: settings)
    monkeypatch.setattr(clove, "configure_logging", lambda level: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("code-without-state\n"))

    assert clove.main(["login"]) == clove.EXIT_FAILURE
    assert capsys.readouterr().err.startswith("clove: login failed: The state is missing")


@pytest.mark.anyio
async def test_login_clears_refresh_backoff(settings: clove.Settings, fake: FakeAnthropic) -> None:
    clove.AccountStore(settings.data_folder).save(make_account(expires_at=int(time.time()) + 60))
    fake.queue("/v1/oauth/token", *[reply(503, text="down")] * 3)
    tokens = make_tokens(settings, fake)
    assert await tokens.get_access_token() == ACCESS_TOKEN
    assert tokens._refresh_not_before > time.time()

    output = io.StringIO()
    read_line = paste_from_output(output, LOGIN_INPUTS["code#state"])
    # login_command runs its own event loop, as it does under `python clove.py login`.
    await anyio.to_thread.run_sync(clove.login_command, settings, read_line, output, httpx.MockTransport(fake))

    assert await tokens.get_access_token() == NEW_ACCESS_TOKEN
    assert tokens._refresh_not_before == 0.0
    assert tokens.describe()["account_valid"] is True


@pytest.mark.anyio
async def test_login_replaces_unsaved_tokens(
    settings: clove.Settings, fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    expired_store(settings)
    tokens = make_tokens(settings, fake)
    monkeypatch.setattr(tokens, "_save", lambda account: setattr(tokens, "_unsaved", True))
    assert await tokens.get_access_token() == NEW_ACCESS_TOKEN
    monkeypatch.undo()

    clove.import_token(settings, "sk-ant-oat01-from-login")
    assert await tokens.get_access_token() == "sk-ant-oat01-from-login"
    assert clove.AccountStore(settings.data_folder).load().access_token == "sk-ant-oat01-from-login"  # type: ignore[union-attr]


@pytest.mark.anyio
@pytest.mark.parametrize("outcome", ["refreshed", "rejected"])
async def test_refresh_keeps_account_saved_meanwhile(settings: clove.Settings, fake: FakeAnthropic, outcome: str) -> None:
    expired_store(settings)
    tokens = make_tokens(settings, fake)
    if outcome == "rejected":
        fake.queue("/v1/oauth/token", reply(400, json={"error": "invalid_grant"}))

    async def refresh() -> None:
        with contextlib.suppress(clove.CloveError):
            await tokens.get_access_token()

    fake.token_delay = 0.2
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(refresh)
        await anyio.sleep(0.05)
        # A writer that does not take clove's lock, such as a hand edit, replaces the file.
        replacement = make_account(access_token="sk-ant-oat01-from-login", refresh_token=None, expires_at=None)
        clove.AccountStore(settings.data_folder).save(replacement)

    saved = clove.AccountStore(settings.data_folder).load()
    assert saved is not None
    assert saved.access_token == "sk-ant-oat01-from-login"
    assert saved.status == "valid"
    assert await tokens.get_access_token() == "sk-ant-oat01-from-login"


@pytest.mark.anyio
async def test_import_waits_for_running_refresh(settings: clove.Settings, fake: FakeAnthropic) -> None:
    expired_store(settings)
    tokens = make_tokens(settings, fake)
    fake.token_delay = 0.3
    tokens_seen: list[str] = []

    async def request_token() -> None:
        tokens_seen.append(await tokens.get_access_token())

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(request_token)
        await anyio.sleep(0.05)
        # The import blocks on the data folder lock until the refresh has saved its tokens.
        await anyio.to_thread.run_sync(clove.import_token, settings, "sk-ant-oat01-imported")

    assert tokens_seen == [NEW_ACCESS_TOKEN]
    assert clove.AccountStore(settings.data_folder).load().access_token == "sk-ant-oat01-imported"  # type: ignore[union-attr]
    assert await tokens.get_access_token() == "sk-ant-oat01-imported"
    assert len(fake.requests_to("/v1/oauth/token")) == 1


def test_callback_save_failure_keeps_account(
    client: TestClient, store: clove.AccountStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = store.path.read_bytes()
    query = start_login(client)

    def full_disk(self: clove.AccountStore, account: clove.Account) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(clove.AccountStore, "save", full_disk)
    response = client.get("/callback", params={"code": "c", "state": query["state"]})

    assert response.status_code == 500
    assert response.json()["error"]["message"].startswith(f"Saving {store.path} failed (No space left on device).")
    assert store.path.read_bytes() == before
    assert client.app.state.tokens.account.access_token == ACCESS_TOKEN  # type: ignore[attr-defined]


def test_login_logs_contain_no_secrets(client: TestClient, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture) -> None:
    fake.queue("/v1/oauth/token", reply(400, json={"error": "invalid_grant"}))
    with caplog.at_level(logging.DEBUG):
        for code in ("first-secret-code", "second-secret-code"):
            query = start_login(client)
            client.get("/callback", params={"code": code, "state": query["state"]})

    verifiers = [json.loads(request.content)["code_verifier"] for request in fake.requests_to("/v1/oauth/token")]
    # TestClient logs its own requests under "httpx2". Those lines are the browser's side, not clove's.
    logged = "\n".join(record.getMessage() for record in caplog.records if record.name != "httpx2")
    assert "Login failed: The token endpoint" in logged
    assert "Login completed for organization org-1234" in logged
    for secret in ("first-secret-code", "second-secret-code", *verifiers, NEW_ACCESS_TOKEN, NEW_REFRESH_TOKEN, API_KEY):
        assert secret not in logged


def test_access_log_hides_callback_query() -> None:
    hide = clove.HideCallbackQuery()
    records = [
        logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', (addr, "GET", path, "1.1", 200), None)
        for addr, path in [("127.0.0.1:1", "/callback?code=secret&state=s"), ("127.0.0.1:1", "/v1/models?limit=5")]
    ]

    assert all(hide.filter(record) for record in records)
    assert records[0].getMessage() == '127.0.0.1:1 - "GET /callback?(hidden) HTTP/1.1" 200'
    assert records[1].getMessage() == '127.0.0.1:1 - "GET /v1/models?limit=5 HTTP/1.1" 200'


# --- Logging ---


def test_logs_contain_no_secrets(settings: clove.Settings, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture) -> None:
    expired_store(settings)
    fake.queue("/v1/messages", reply(401, json=clove.error_body("authentication_error", "bad token")))
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    with caplog.at_level(logging.DEBUG):
        with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
            post_message(test_client)
            with test_client.stream("POST", "/v1/messages", content=json.dumps({**REQUEST_BODY, "stream": True})) as stream:
                stream.read()

    assert len(fake.requests_to("/v1/oauth/token")) == 2
    assert any(message.startswith("Refreshed the access token for organization org-1234") for message in caplog.messages)
    for secret in (API_KEY, ACCESS_TOKEN, REFRESH_TOKEN, NEW_ACCESS_TOKEN, NEW_REFRESH_TOKEN):
        assert secret not in caplog.text


# --- OpenAI compatibility ---

MODEL = "claude-sonnet-4-20250514"
DEFAULT_MAX_TOKENS = 4096
PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
FIXED_TIME = 1_700_000_000


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clove.time, "time", lambda: float(FIXED_TIME))


def convert(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    body.update(fields)
    return clove.chat_request_to_messages(body, DEFAULT_MAX_TOKENS)


def convert_messages(messages: list[Any]) -> dict[str, Any]:
    return convert(messages=messages)


def rejected_param(body: object) -> str | None:
    with pytest.raises(clove.ChatRequestError) as caught:
        clove.chat_request_to_messages(body, DEFAULT_MAX_TOKENS)
    return caught.value.param


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


# --- OpenAI compatibility: request conversion ---


def test_request_minimal_user_message() -> None:
    request = convert()

    assert request == {
        "model": MODEL,
        "max_tokens": DEFAULT_MAX_TOKENS,
        "messages": [{"role": "user", "content": [text("Hi")]}],
    }


def test_request_error_keeps_message_and_param() -> None:
    error = clove.ChatRequestError("Invalid 'model'.", "model")

    assert str(error) == "Invalid 'model'."
    assert error.message == "Invalid 'model'."
    assert error.param == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ("text", None),
        (None, None),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "model"),
        ({"model": "", "messages": [{"role": "user", "content": "Hi"}]}, "model"),
        ({"model": 5, "messages": [{"role": "user", "content": "Hi"}]}, "model"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": {"role": "user"}}, "messages"),
        ({"model": MODEL, "messages": ["Hi"]}, "messages[0]"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}, None]}, "messages[1]"),
    ],
)
def test_request_rejects_invalid_shape(body: object, param: str | None) -> None:
    assert rejected_param(body) == param


def test_request_model_passes_through() -> None:
    request = convert(model="gpt-4o")

    assert request["model"] == "gpt-4o"


def test_request_hoists_system_and_developer() -> None:
    request = convert_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "developer", "content": [text("Use French."), text("No emoji.")]},
            {"role": "assistant", "content": "Salut"},
        ]
    )

    assert request["system"] == [text("Be brief."), text("Use French."), text("No emoji.")]
    assert request["messages"] == [
        {"role": "user", "content": [text("Hi")]},
        {"role": "assistant", "content": [text("Salut")]},
    ]


def test_request_omits_empty_system() -> None:
    request = convert_messages([{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}])

    assert "system" not in request


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (None, "messages[0].content"),
        (5, "messages[0].content"),
        ([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], "messages[0].content[0]"),
        ([text("ok"), {"type": "text", "text": 3}], "messages[0].content[1]"),
    ],
)
def test_request_rejects_bad_system_content(content: object, param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "system", "content": content}, {"role": "user", "content": "Hi"}]}

    assert rejected_param(body) == param


def test_request_merges_consecutive_roles() -> None:
    request = convert_messages(
        [
            {"role": "user", "content": "One"},
            {"role": "user", "content": [text("Two"), text("Three")]},
            {"role": "assistant", "content": "Four"},
            {"role": "assistant", "content": [text("Five")]},
            {"role": "user", "content": "Six"},
        ]
    )

    assert request["messages"] == [
        {"role": "user", "content": [text("One"), text("Two"), text("Three")]},
        {"role": "assistant", "content": [text("Four"), text("Five")]},
        {"role": "user", "content": [text("Six")]},
    ]


def test_request_drops_empty_messages() -> None:
    request = convert_messages(
        [
            {"role": "user", "content": "One"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": [text(""), text("Two")]},
        ]
    )

    assert request["messages"] == [{"role": "user", "content": [text("One"), text("Two")]}]


@pytest.mark.parametrize(
    ("url", "source"),
    [
        (f"data:image/png;base64,{PNG_BASE64}", {"type": "base64", "media_type": "image/png", "data": PNG_BASE64}),
        (f"data:image/jpg;base64,{PNG_BASE64}", {"type": "base64", "media_type": "image/jpeg", "data": PNG_BASE64}),
        (f"data:IMAGE/WEBP;base64,{PNG_BASE64}", {"type": "base64", "media_type": "image/webp", "data": PNG_BASE64}),
        (f"data:image/gif;name=a.gif;base64,{PNG_BASE64}", {"type": "base64", "media_type": "image/gif", "data": PNG_BASE64}),
        ("https://example.com/cat.png", {"type": "url", "url": "https://example.com/cat.png"}),
        ("http://example.com/cat.png", {"type": "url", "url": "http://example.com/cat.png"}),
        ("HTTPS://example.com/cat.png", {"type": "url", "url": "HTTPS://example.com/cat.png"}),
    ],
)
def test_request_image_part_mapping(url: str, source: dict[str, Any]) -> None:
    content = [text("What is this?"), {"type": "image_url", "image_url": {"url": url, "detail": "high"}}]

    request = convert_messages([{"role": "user", "content": content}])

    assert request["messages"][0]["content"] == [text("What is this?"), {"type": "image", "source": source}]


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "ftp://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": "file:///tmp/cat.png"}},
        {"type": "image_url", "image_url": {"url": "cat.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png," + PNG_BASE64}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}},
        {"type": "image_url", "image_url": {"url": f"data:image/tiff;base64,{PNG_BASE64}"}},
        {"type": "image_url", "image_url": {"url": f"data:text/plain;base64,{PNG_BASE64}"}},
        {"type": "image_url", "image_url": "https://example.com/cat.png"},
        {"type": "image_url"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-1"}},
        {"type": "text"},
        {"text": "no type"},
        "bare string",
    ],
)
def test_request_rejects_bad_user_part(part: object) -> None:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": [text("Look:"), part]},
        ],
    }

    assert rejected_param(body) == "messages[2].content[1]"


def test_request_assistant_tool_calls() -> None:
    request = convert_messages(
        [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "call_2", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
                ],
            },
        ]
    )

    assert request["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}},
        ],
    }


def test_request_assistant_text_before_tools() -> None:
    request = convert_messages(
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": [text("Checking."), {"type": "refusal", "refusal": "Not that."}],
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
            },
        ]
    )

    assert request["messages"][1]["content"] == [
        text("Checking."),
        text("Not that."),
        {"type": "tool_use", "id": "call_1", "name": "weather", "input": {}},
    ]


ARGUMENTS_PARAM = "messages[1].tool_calls[0].function.arguments"


@pytest.mark.parametrize(
    ("tool_call", "param"),
    [
        ({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "not json"}}, ARGUMENTS_PARAM),
        ({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}, ARGUMENTS_PARAM),
        ({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}, ARGUMENTS_PARAM),
        ({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}, ARGUMENTS_PARAM),
        ({"id": "call_1", "type": "function", "function": {"name": "f"}}, ARGUMENTS_PARAM),
        ({"id": "", "type": "function", "function": {"name": "f", "arguments": "{}"}}, "messages[1].tool_calls[0].id"),
        ({"id": "call_1", "type": "function", "function": {"arguments": "{}"}}, "messages[1].tool_calls[0].function.name"),
        ({"id": "call_1", "type": "custom", "custom": {"name": "f", "input": "x"}}, "messages[1].tool_calls[0]"),
        ({"id": "call_1", "type": "function"}, "messages[1].tool_calls[0].function"),
        ("call_1", "messages[1].tool_calls[0]"),
    ],
)
def test_request_rejects_bad_tool_call(tool_call: object, param: str) -> None:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        ],
    }

    assert rejected_param(body) == param


def test_request_rejects_tool_calls_object() -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": {"id": "call_1"}}],
    }

    assert rejected_param(body) == "messages[1].tool_calls"


def test_request_tool_results_merge_into_user() -> None:
    request = convert_messages(
        [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [text("21 C"), text("sunny")]},
            {"role": "user", "content": "Which is warmer?"},
        ]
    )

    assert len(request["messages"]) == 3
    assert request["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "18 C"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [text("21 C"), text("sunny")]},
            text("Which is warmer?"),
        ],
    }


def test_request_empty_tool_result_omits_content() -> None:
    request = convert_messages(
        [
            {"role": "user", "content": "Run it"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "run", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": ""},
        ]
    )

    assert request["messages"][2] == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1"}]}


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "tool", "content": "18 C"}, "messages[1].tool_call_id"),
        ({"role": "tool", "tool_call_id": "", "content": "18 C"}, "messages[1].tool_call_id"),
        ({"role": "tool", "tool_call_id": "call_1", "content": 18}, "messages[1].content"),
        (
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]},
            "messages[1].content[0]",
        ),
        ({"role": "function", "name": "weather", "content": "18 C"}, "messages[1].role"),
        ({"role": "robot", "content": "beep"}, "messages[1].role"),
        ({"content": "no role"}, "messages[1].role"),
        ({"role": "assistant", "content": 5}, "messages[1].content"),
        ({"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}, "messages[1].content[0]"),
        ({"role": "user", "content": None}, "messages[1].content"),
    ],
)
def test_request_rejects_bad_message(message: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}, message]}

    assert rejected_param(body) == param


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "Be brief."}],
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": ""}],
        [{"role": "assistant", "content": None}],
    ],
)
def test_request_rejects_empty_conversation(messages: list[Any]) -> None:
    assert rejected_param({"model": MODEL, "messages": messages}) == "messages"


def test_request_rejects_leading_assistant() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Hi"},
    ]

    assert rejected_param({"model": MODEL, "messages": messages}) == "messages"


@pytest.mark.parametrize(
    ("fields", "max_tokens"),
    [
        ({}, DEFAULT_MAX_TOKENS),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 200}, 200),
        ({"max_tokens": 100, "max_completion_tokens": 200}, 200),
        ({"max_tokens": None, "max_completion_tokens": None}, DEFAULT_MAX_TOKENS),
        ({"max_tokens": 100, "max_completion_tokens": None}, 100),
    ],
)
def test_request_max_tokens_selection(fields: dict[str, Any], max_tokens: int) -> None:
    assert convert(**fields)["max_tokens"] == max_tokens


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": "100"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 100, "max_completion_tokens": "200"}, "max_completion_tokens"),
        ({"max_tokens": -1, "max_completion_tokens": 200}, "max_tokens"),
    ],
)
def test_request_rejects_bad_max_tokens(fields: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}

    assert rejected_param(body) == param


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"temperature": 0.5}, {"temperature": 0.5}),
        ({"temperature": 0}, {"temperature": 0}),
        ({"top_p": 0.9}, {"top_p": 0.9}),
        ({"temperature": None, "top_p": None}, {}),
        ({"stop": "END"}, {"stop_sequences": ["END"]}),
        ({"stop": ["END", "\n\n"]}, {"stop_sequences": ["END", "\n\n"]}),
        ({"stop": None}, {}),
        ({"stop": []}, {}),
        ({"stream": True}, {"stream": True}),
        ({"stream": False}, {}),
        ({"user": "user-42"}, {"metadata": {"user_id": "user-42"}}),
        ({"user": ""}, {}),
    ],
)
def test_request_sampling_params_mapping(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    request = convert(**fields)
    optional = {key: value for key, value in request.items() if key not in ("model", "max_tokens", "messages")}

    assert optional == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": [0.9]}, "top_p"),
        ({"stop": 5}, "stop"),
        ({"stop": ["END", 5]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"user": 42}, "user"),
    ],
)
def test_request_rejects_bad_sampling_params(fields: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}

    assert rejected_param(body) == param


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_request_tools_mapping() -> None:
    clock_tool = {"type": "function", "function": {"name": "clock"}}

    request = convert(tools=[WEATHER_TOOL, clock_tool])

    assert request["tools"] == [
        {
            "name": "weather",
            "description": "Current weather for a city.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
        {"name": "clock", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in request


def test_request_empty_tools_omitted() -> None:
    request = convert(tools=[])

    assert "tools" not in request


@pytest.mark.parametrize(
    ("tool", "param"),
    [
        ({"type": "custom", "custom": {"name": "grammar"}}, "tools[1]"),
        ({"function": {"name": "f"}}, "tools[1]"),
        ({"type": "function"}, "tools[1].function"),
        ({"type": "function", "function": {"name": ""}}, "tools[1].function.name"),
        ({"type": "function", "function": {"name": "f", "description": 5}}, "tools[1].function.description"),
        ({"type": "function", "function": {"name": "f", "parameters": "{}"}}, "tools[1].function.parameters"),
    ],
)
def test_request_rejects_bad_tool(tool: object, param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER_TOOL, tool]}

    assert rejected_param(body) == param


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "weather"}}, {"type": "tool", "name": "weather"}),
    ],
)
def test_request_tool_choice_mapping(tool_choice: object, expected: dict[str, Any]) -> None:
    request = convert(tools=[WEATHER_TOOL], tool_choice=tool_choice)

    assert request["tool_choice"] == expected


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        (None, {"type": "auto", "disable_parallel_tool_use": True}),
        ("auto", {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", {"type": "any", "disable_parallel_tool_use": True}),
        ("none", {"type": "none"}),
        (
            {"type": "function", "function": {"name": "weather"}},
            {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
        ),
    ],
)
def test_request_parallel_tool_calls_disabled(tool_choice: object, expected: dict[str, Any]) -> None:
    request = convert(tools=[WEATHER_TOOL], tool_choice=tool_choice, parallel_tool_calls=False)

    assert request["tool_choice"] == expected


def test_request_parallel_tool_calls_enabled() -> None:
    request = convert(tools=[WEATHER_TOOL], parallel_tool_calls=True)

    assert "tool_choice" not in request


@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_request_tool_choice_without_tools_dropped(tool_choice: str) -> None:
    request = convert(tool_choice=tool_choice, parallel_tool_calls=False)

    assert "tool_choice" not in request


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "weather"}}}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "clock"}}}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"tools": {"weather": WEATHER_TOOL}}, "tools"),
    ],
)
def test_request_rejects_bad_tool_choice(fields: dict[str, Any], param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}

    assert rejected_param(body) == param


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n", 2),
        ("n", 0),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("top_logprobs", 0),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("modalities", ["audio"]),
        ("response_format", {"type": "json_object"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        ("functions", [{"name": "weather", "parameters": {}}]),
        ("function_call", "auto"),
        ("logit_bias", {"50256": -100}),
        ("prediction", {"type": "content", "content": "draft"}),
    ],
)
def test_request_rejects_unsupported_param(name: str, value: object) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], name: value}

    assert rejected_param(body) == name


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n", 1),
        ("n", None),
        ("logprobs", False),
        ("top_logprobs", None),
        ("audio", None),
        ("modalities", ["text"]),
        ("response_format", {"type": "text"}),
        ("functions", None),
        ("function_call", None),
        ("logit_bias", {}),
        ("logit_bias", None),
        ("prediction", None),
    ],
)
def test_request_accepts_default_param_values(name: str, value: object) -> None:
    assert convert(**{name: value}) == convert()


def test_request_ignores_harmless_fields() -> None:
    request = convert(
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        store=True,
        metadata={"session": "abc"},
        service_tier="auto",
        reasoning_effort="low",
        stream_options={"include_usage": True},
        some_future_field={"x": 1},
    )

    assert request == convert()


# --- OpenAI compatibility: non-streaming response conversion ---


def anthropic_message(**fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": "msg_01ABC",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "Hello"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }
    message.update(fields)
    return message


def test_completion_text_message(fixed_clock: None) -> None:
    completion = clove.chat_completion_from_message(anthropic_message())

    assert completion == {
        "id": "chatcmpl-msg_01ABC",
        "object": "chat.completion",
        "created": FIXED_TIME,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


def test_completion_joins_text_skips_thinking() -> None:
    content = [
        {"type": "thinking", "thinking": "Let me think.", "signature": "sig"},
        {"type": "redacted_thinking", "data": "xxx"},
        {"type": "text", "text": "Bonjour, "},
        {"type": "text", "text": "日本"},
    ]

    message = clove.chat_completion_from_message(anthropic_message(content=content))["choices"][0]["message"]

    assert message["content"] == "Bonjour, 日本"
    assert "tool_calls" not in message


def test_completion_tool_calls() -> None:
    content = [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_01", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_02", "name": "clock", "input": {}},
    ]

    completion = clove.chat_completion_from_message(anthropic_message(content=content, stop_reason="tool_use"))
    choice = completion["choices"][0]

    assert choice["message"]["content"] == "Checking."
    assert choice["message"]["tool_calls"] == [
        {"id": "toolu_01", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"id": "toolu_02", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
    ]
    assert choice["finish_reason"] == "tool_calls"


def test_completion_tool_only_content_none() -> None:
    content = [{"type": "tool_use", "id": "toolu_01", "name": "clock", "input": {}}]

    message = clove.chat_completion_from_message(anthropic_message(content=content))["choices"][0]["message"]

    assert message["content"] is None


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        (None, "stop"),
        ("model_context_window_exceeded", "stop"),
    ],
)
def test_completion_finish_reason_mapping(stop_reason: str | None, finish_reason: str) -> None:
    completion = clove.chat_completion_from_message(anthropic_message(stop_reason=stop_reason))

    assert completion["choices"][0]["finish_reason"] == finish_reason


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (
            {"input_tokens": 10, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000, "output_tokens": 7},
            {"prompt_tokens": 1110, "completion_tokens": 7, "total_tokens": 1117, "prompt_tokens_details": {"cached_tokens": 1000}},
        ),
        (
            {"input_tokens": 3, "cache_creation_input_tokens": None, "cache_read_input_tokens": None, "output_tokens": 2},
            {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}},
        ),
        ({}, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0}}),
    ],
)
def test_completion_usage_mapping(usage: dict[str, Any], expected: dict[str, Any]) -> None:
    completion = clove.chat_completion_from_message(anthropic_message(usage=usage))

    assert completion["usage"] == expected


# --- OpenAI compatibility: streaming ---

RECORDED_STREAM = (
    "event: message_start\n"
    'data: {"type":"message_start","message":{"id":"msg_01STREAM","type":"message","role":"assistant",'
    '"model":"claude-sonnet-4-20250514","content":[],"stop_reason":null,"stop_sequence":null,'
    '"usage":{"input_tokens":25,"cache_creation_input_tokens":10,"cache_read_input_tokens":5,"output_tokens":1}}}\n'
    "\n"
    ": upstream comment\n"
    "event: content_block_start\n"
    'data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Weather tool."}}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"c2ln"}}\n'
    "\n"
    "event: content_block_stop\n"
    'data: {"type":"content_block_stop","index":0}\n'
    "\n"
    "event: content_block_start\n"
    'data: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}\n'
    "\n"
    "event: ping\n"
    'data: {"type": "ping"}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Café in 日本"}}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":" is open."}}\n'
    "\n"
    "event: content_block_stop\n"
    'data: {"type":"content_block_stop","index":1}\n'
    "\n"
    "event: content_block_start\n"
    'data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01A","name":"weather","input":{}}}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\\"city\\": \\"Par"}}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"is\\"}"}}\n'
    "\n"
    "event: content_block_stop\n"
    'data: {"type":"content_block_stop","index":2}\n'
    "\n"
    "event: content_block_start\n"
    'data: {"type":"content_block_start","index":3,"content_block":{"type":"tool_use","id":"toolu_01B","name":"clock","input":{}}}\n'
    "\n"
    "event: content_block_delta\n"
    'data: {"type":"content_block_delta","index":3,"delta":{"type":"input_json_delta","partial_json":"{}"}}\n'
    "\n"
    "event: content_block_stop\n"
    'data: {"type":"content_block_stop","index":3}\n'
    "\n"
    "event: message_delta\n"
    'data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":42}}\n'
    "\n"
    "event: message_stop\n"
    'data: {"type":"message_stop"}\n'
    "\n"
)

LINE_ENDINGS = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}


def recorded_stream(line_ending: str) -> bytes:
    return RECORDED_STREAM.replace("\n", LINE_ENDINGS[line_ending]).encode("utf-8")


def translate(pieces: list[bytes], include_usage: bool = False) -> bytes:
    translator = clove.ChatStreamTranslator(MODEL, include_usage)
    output = b"".join(translator.feed(piece) for piece in pieces)
    return output + translator.finish()


def parse_sse(output: bytes) -> list[Any]:
    """Decode OpenAI SSE output into JSON payloads, with "[DONE]" kept as a string."""
    text_output = output.decode("utf-8")
    assert text_output.endswith("\n\n")
    events = []
    for event in text_output[:-2].split("\n\n"):
        assert event.startswith("data: ")
        payload = event[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def deltas(events: list[Any]) -> list[dict[str, Any]]:
    return [event["choices"][0]["delta"] for event in events if isinstance(event, dict) and event.get("choices")]


def test_stream_recorded_output(fixed_clock: None) -> None:
    events = parse_sse(translate([recorded_stream("lf")]))

    assert events[-1] == "[DONE]"
    assert all(event["id"] == "chatcmpl-msg_01STREAM" for event in events[:-1])
    assert all(event["object"] == "chat.completion.chunk" for event in events[:-1])
    assert all(event["created"] == FIXED_TIME for event in events[:-1])
    assert all(event["model"] == MODEL for event in events[:-1])
    assert all("usage" not in event for event in events[:-1])
    assert deltas(events) == [
        {"role": "assistant", "content": ""},
        {"content": "Café in 日本"},
        {"content": " is open."},
        {"tool_calls": [{"index": 0, "id": "toolu_01A", "type": "function", "function": {"name": "weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Par'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]},
        {"tool_calls": [{"index": 1, "id": "toolu_01B", "type": "function", "function": {"name": "clock", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {},
    ]


def test_stream_chunk_choice_fields() -> None:
    events = parse_sse(translate([recorded_stream("lf")]))
    choices = [event["choices"] for event in events[:-1]]

    assert all(len(choice) == 1 for choice in choices)
    assert all(choice[0]["index"] == 0 for choice in choices)
    assert all(choice[0]["logprobs"] is None for choice in choices)
    assert [choice[0]["finish_reason"] for choice in choices] == [None] * 8 + ["tool_calls"]


@pytest.mark.parametrize("line_ending", ["crlf", "cr"])
def test_stream_line_endings_match_lf(line_ending: str, fixed_clock: None) -> None:
    expected = translate([recorded_stream("lf")])

    assert translate([recorded_stream(line_ending)]) == expected


@pytest.mark.parametrize("line_ending", ["lf", "crlf", "cr"])
def test_stream_two_piece_splits(line_ending: str, fixed_clock: None) -> None:
    stream = recorded_stream(line_ending)
    expected = parse_sse(translate([stream]))

    for offset in range(len(stream) + 1):
        events = parse_sse(translate([stream[:offset], stream[offset:]]))
        assert events == expected, f"split at byte {offset}"


@pytest.mark.parametrize("line_ending", ["lf", "crlf", "cr"])
def test_stream_one_byte_feeds(line_ending: str, fixed_clock: None) -> None:
    stream = recorded_stream(line_ending)
    expected = parse_sse(translate([stream]))

    events = parse_sse(translate([stream[i:i + 1] for i in range(len(stream))]))

    assert events == expected


def parse_upstream(pieces: list[bytes]) -> list[tuple[str, str]]:
    parser = clove._SseParser()
    events = [event for piece in pieces for event in parser.feed(piece)]
    events.extend(parser.close())
    return [(event.name, event.data) for event in events]


@pytest.mark.parametrize("line_ending", ["lf", "crlf", "cr"])
def test_sse_parser_two_piece_splits(line_ending: str) -> None:
    stream = recorded_stream(line_ending)
    expected = parse_upstream([stream])

    assert len(expected) == 20
    assert expected[0][0] == "message_start"
    assert expected[-1] == ("message_stop", '{"type":"message_stop"}')
    for offset in range(len(stream) + 1):
        events = parse_upstream([stream[:offset], stream[offset:]])
        assert events == expected, f"split at byte {offset}"


def test_sse_parser_field_rules() -> None:
    stream = (
        b": comment line\n"
        b"event: first\n"
        b"data: line one\n"
        b"data:line two\n"
        b"id: 7\n"
        b"retry: 100\n"
        b"\n"
        b"event: without data\n"
        b"\n"
        b"data\n"
        b"\n"
        b"data: unterminated"
    )

    events = parse_upstream([stream])

    assert events == [("first", "line one\nline two"), ("message", "")]


def test_stream_splits_multibyte_char() -> None:
    stream = recorded_stream("lf")
    offset = stream.index("日".encode()) + 1
    translator = clove.ChatStreamTranslator(MODEL, False)

    first = translator.feed(stream[:offset])
    rest = translator.feed(stream[offset:]) + translator.finish()

    assert deltas(parse_sse(first)) == [{"role": "assistant", "content": ""}]
    assert deltas(parse_sse(rest))[0] == {"content": "Café in 日本"}


def test_stream_include_usage_on() -> None:
    events = parse_sse(translate([recorded_stream("crlf")], include_usage=True))

    assert events[-1] == "[DONE]"
    assert all(event["usage"] is None for event in events[:-2])
    assert events[-2]["choices"] == []
    assert events[-2]["id"] == "chatcmpl-msg_01STREAM"
    assert events[-2]["usage"] == {
        "prompt_tokens": 40,
        "completion_tokens": 42,
        "total_tokens": 82,
        "prompt_tokens_details": {"cached_tokens": 5},
    }
    assert events[-3]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_include_usage_off() -> None:
    events = parse_sse(translate([recorded_stream("crlf")], include_usage=False))

    assert all("usage" not in event for event in events[:-1])
    assert all(event["choices"] for event in events[:-1])


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


MESSAGE_START = sse(
    "message_start",
    {"type": "message_start", "message": {"id": "msg_1", "model": MODEL, "usage": {"input_tokens": 3, "output_tokens": 1}}},
)
TEXT_START = sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
TEXT_DELTA = sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}})
MESSAGE_STOP = sse("message_stop", {"type": "message_stop"})
OVERLOADED = sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


def test_stream_error_event_without_done() -> None:
    events = parse_sse(translate([MESSAGE_START, TEXT_START, TEXT_DELTA, OVERLOADED]))

    assert "[DONE]" not in events
    assert deltas(events) == [{"role": "assistant", "content": ""}, {"content": "Hi"}]
    assert events[-1] == {"error": {"message": "Overloaded", "type": "server_error", "param": None, "code": "overloaded"}}


def test_stream_ignores_input_after_error() -> None:
    translator = clove.ChatStreamTranslator(MODEL, False)
    translator.feed(MESSAGE_START + OVERLOADED)

    assert translator.feed(TEXT_DELTA + MESSAGE_STOP) == b""
    assert translator.finish() == b""
    assert translator.fail("late") == b""


def test_stream_error_in_same_feed_stops() -> None:
    output = translate([MESSAGE_START + OVERLOADED + TEXT_DELTA + MESSAGE_STOP])
    events = parse_sse(output)

    assert "[DONE]" not in events
    assert "error" in events[-1]
    assert len(deltas(events)) == 1


@pytest.mark.parametrize(
    ("error", "expected_type"),
    [
        ({"type": "api_error", "message": "Internal"}, "server_error"),
        ({"type": "rate_limit_error", "message": "Slow down"}, "rate_limit_error"),
        ({"type": "invalid_request_error", "message": "Bad"}, "invalid_request_error"),
        ({"type": "brand_new_error", "message": "New"}, "server_error"),
    ],
)
def test_stream_error_type_mapping(error: dict[str, Any], expected_type: str) -> None:
    events = parse_sse(translate([sse("error", {"type": "error", "error": error})]))

    assert events == [{"error": {"message": error["message"], "type": expected_type, "param": None, "code": None}}]


@pytest.mark.parametrize(
    "upstream",
    [
        b"",
        MESSAGE_START,
        MESSAGE_START + TEXT_START + TEXT_DELTA,
        MESSAGE_START + TEXT_START + TEXT_DELTA + b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n",
    ],
)
def test_stream_truncated_finish_errors(upstream: bytes) -> None:
    events = parse_sse(translate([upstream]))

    assert "[DONE]" not in events
    assert events[-1]["error"]["type"] == "server_error"
    assert "ended before message_stop" in events[-1]["error"]["message"]


def test_stream_finish_accepts_trailing_cr() -> None:
    stream = recorded_stream("cr")
    translator = clove.ChatStreamTranslator(MODEL, False)

    output = translator.feed(stream) + translator.finish()

    assert parse_sse(output)[-1] == "[DONE]"


def test_stream_fail_emits_error() -> None:
    translator = clove.ChatStreamTranslator(MODEL, True)
    output = translator.feed(MESSAGE_START + TEXT_START + TEXT_DELTA)

    failure = translator.fail("Upstream read timed out after 600 s.")

    assert "[DONE]" not in parse_sse(output)
    assert parse_sse(failure) == [
        {"error": {"message": "Upstream read timed out after 600 s.", "type": "server_error", "param": None, "code": None}}
    ]
    assert translator.finish() == b""


def test_stream_fail_after_done_empty() -> None:
    translator = clove.ChatStreamTranslator(MODEL, False)
    translator.feed(MESSAGE_START + MESSAGE_STOP)

    assert translator.fail("connection reset") == b""
    assert translator.finish() == b""


def test_stream_ignores_input_after_done() -> None:
    translator = clove.ChatStreamTranslator(MODEL, False)
    translator.feed(MESSAGE_START + MESSAGE_STOP)

    assert translator.feed(TEXT_DELTA) == b""


def test_stream_multiline_data_joined() -> None:
    message_start = b'event: message_start\ndata: {"type": "message_start",\ndata:  "message": {"id": "msg_2"}}\n\n'
    comment = b": keep-alive\n\n"

    events = parse_sse(translate([message_start, comment, MESSAGE_STOP]))

    assert events[0]["id"] == "chatcmpl-msg_2"
    assert events[-1] == "[DONE]"


def test_stream_uses_constructor_model_fallback() -> None:
    message_start = sse("message_start", {"type": "message_start", "message": {"id": "msg_3"}})

    events = parse_sse(translate([message_start, MESSAGE_STOP]))

    assert events[0]["model"] == MODEL


def test_stream_invalid_json_errors() -> None:
    events = parse_sse(translate([MESSAGE_START, b"event: content_block_delta\ndata: {not json\n\n", MESSAGE_STOP]))

    assert "[DONE]" not in events
    assert "content_block_delta" in events[-1]["error"]["message"]


def test_stream_unknown_event_skipped() -> None:
    unknown = sse("future_event", {"type": "future_event", "value": 1})

    events = parse_sse(translate([MESSAGE_START, unknown, MESSAGE_STOP]))

    assert events[-1] == "[DONE]"
    assert len(events) == 3


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [("end_turn", "stop"), ("max_tokens", "length"), ("refusal", "content_filter"), (None, "stop")],
)
def test_stream_finish_reason_mapping(stop_reason: str | None, finish_reason: str) -> None:
    delta = {"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": {"output_tokens": 2}}
    message_delta = sse("message_delta", delta)

    events = parse_sse(translate([MESSAGE_START, message_delta, MESSAGE_STOP]))

    assert events[-2]["choices"][0]["finish_reason"] == finish_reason


# --- OpenAI compatibility: models ---


def test_models_list_mapping() -> None:
    upstream = {
        "data": [
            {
                "type": "model",
                "id": "claude-3-7-sonnet-20250219",
                "display_name": "Claude Sonnet 3.7",
                "created_at": "2025-02-19T00:00:00Z",
            },
            {"type": "model", "id": "claude-x", "display_name": "Claude X", "created_at": "soon"},
        ],
        "has_more": True,
        "first_id": "claude-3-7-sonnet-20250219",
        "last_id": "claude-x",
    }

    assert clove.models_list_for_both(upstream) == {
        "object": "list",
        "data": [
            {
                "type": "model",
                "id": "claude-3-7-sonnet-20250219",
                "display_name": "Claude Sonnet 3.7",
                "created_at": "2025-02-19T00:00:00Z",
                "object": "model",
                "created": 1739923200,
                "owned_by": "anthropic",
            },
            {
                "type": "model",
                "id": "claude-x",
                "display_name": "Claude X",
                "created_at": "soon",
                "object": "model",
                "created": 0,
                "owned_by": "anthropic",
            },
        ],
        "has_more": True,
        "first_id": "claude-3-7-sonnet-20250219",
        "last_id": "claude-x",
    }


@pytest.mark.parametrize(
    ("created_at", "created"),
    [
        ("2025-02-19T00:00:00Z", 1739923200),
        ("2025-02-19T00:00:00+00:00", 1739923200),
        ("2025-02-19T01:00:00+01:00", 1739923200),
        ("2025-02-19T00:00:00", 1739923200),
        ("2025-02-19T00:00:00.500Z", 1739923200),
        ("", 0),
        ("yesterday", 0),
        (None, 0),
        (1739923200, 0),
    ],
)
def test_models_created_parsing(created_at: object, created: int) -> None:
    result = clove.models_list_for_both({"data": [{"id": "m", "created_at": created_at}]})

    assert result["data"][0]["created"] == created


def test_models_empty_upstream() -> None:
    assert clove.models_list_for_both({}) == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


# --- OpenAI compatibility: errors ---


def test_error_body_shape() -> None:
    body = clove.openai_error_body("Invalid 'model'.", "invalid_request_error", "model", "bad_model")

    assert body == {"error": {"message": "Invalid 'model'.", "type": "invalid_request_error", "param": "model", "code": "bad_model"}}


def test_error_body_defaults_null() -> None:
    body = clove.openai_error_body("Boom", "server_error")

    assert body["error"]["param"] is None
    assert body["error"]["code"] is None


@pytest.mark.parametrize(
    ("status", "anthropic_type", "error_type", "code"),
    [
        (400, "invalid_request_error", "invalid_request_error", None),
        (401, "authentication_error", "authentication_error", None),
        (403, "permission_error", "permission_error", None),
        (404, "not_found_error", "not_found_error", None),
        (413, "request_too_large", "invalid_request_error", "request_too_large"),
        (429, "rate_limit_error", "rate_limit_error", None),
        (500, "api_error", "server_error", None),
        (529, "overloaded_error", "server_error", "overloaded"),
        (418, "teapot_error", "invalid_request_error", None),
        (503, "brand_new_error", "server_error", None),
    ],
)
def test_error_from_anthropic_mapping(status: int, anthropic_type: str, error_type: str, code: str | None) -> None:
    upstream = {"type": "error", "error": {"type": anthropic_type, "message": "Details here."}, "request_id": "req_1"}

    body = clove.openai_error_from_anthropic(status, json.dumps(upstream).encode())

    assert body == {"error": {"message": "Details here.", "type": error_type, "param": None, "code": code}}


@pytest.mark.parametrize(
    ("status", "upstream", "error_type", "code"),
    [
        (502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "server_error", None),
        (529, b"Overloaded", "server_error", "overloaded"),
        (429, b"", "rate_limit_error", None),
        (401, b'{"detail": "no"}', "authentication_error", None),
        (400, b"[1, 2]", "invalid_request_error", None),
        (500, b"\xff\xfe broken", "server_error", None),
    ],
)
def test_error_from_unexpected_body(status: int, upstream: bytes, error_type: str, code: str | None) -> None:
    error = clove.openai_error_from_anthropic(status, upstream)["error"]

    assert f"HTTP {status}" in error["message"]
    assert error["type"] == error_type
    assert error["code"] == code
    assert error["param"] is None


def test_error_html_body_excerpt() -> None:
    page = b"<html>\n  <body>\n" + b"x" * 1000 + b"\n</body></html>"

    message = clove.openai_error_from_anthropic(502, page)["error"]["message"]

    assert "<html> <body> xxx" in message
    assert message.endswith("...")
    assert len(message) < 300


def test_error_missing_message_uses_status() -> None:
    upstream = b'{"type": "error", "error": {"type": "api_error"}}'

    error = clove.openai_error_from_anthropic(500, upstream)["error"]

    assert "HTTP 500" in error["message"]
    assert error["type"] == "server_error"


# --- OpenAI compatibility: routes ---

CHAT_BODY = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Hi"}]}


def post_chat(client: TestClient, body: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", content=json.dumps(CHAT_BODY if body is None else body), **kwargs)


def chat_stream_lines(client: TestClient, body: dict[str, Any]) -> list[str]:
    """Post a streamed chat request and return the non-empty lines of the response body."""
    with client.stream("POST", "/v1/chat/completions", content=json.dumps({**body, "stream": True})) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        return [line for line in response.read().decode().split("\n") if line]


def chat_completion_request_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [message for message in caplog.messages if message.startswith("POST /v1/chat/completions ->")]


def test_chat_route_translates_both_ways(client: TestClient, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture) -> None:
    client.headers.pop("x-api-key")
    headers = {
        "authorization": f"Bearer {API_KEY}",
        "openai-organization": "org-openai",
        "openai-project": "proj-openai",
        "x-stainless-lang": "python",
        "user-agent": "OpenAI/Python 1.99.0",
        "accept": "application/json",
    }
    body = {**CHAT_BODY, "messages": [{"role": "system", "content": "Be brief."}, *CHAT_BODY["messages"]], "max_tokens": 50}
    with caplog.at_level(logging.INFO, logger="clove"):
        response = post_chat(client, body, headers=headers)

    upstream = fake.requests_to("/v1/messages")[0]
    assert json.loads(upstream.content) == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "system": [{"type": "text", "text": "Be brief."}],
    }
    assert upstream.headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert upstream.headers["anthropic-beta"] == "oauth-2025-04-20"
    assert upstream.headers["content-type"] == "application/json"
    assert upstream.headers["x-stainless-lang"] == "python"
    assert upstream.headers["user-agent"] == "OpenAI/Python 1.99.0"
    assert "openai-organization" not in upstream.headers
    assert "openai-project" not in upstream.headers
    assert "accept" not in upstream.headers
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req_01"
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["total_tokens"] == 19
    assert len(chat_completion_request_log(caplog)) == 1


def test_chat_route_default_max_tokens(settings: clove.Settings, store: clove.AccountStore, fake: FakeAnthropic) -> None:
    app = clove.create_app(dataclasses.replace(settings, default_max_tokens=321), transport=httpx.MockTransport(fake))
    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        post_chat(test_client)
    assert json.loads(fake.requests_to("/v1/messages")[0].content)["max_tokens"] == 321


@pytest.mark.parametrize(
    ("headers", "content", "status_code", "error"),
    [
        (
            {"x-api-key": "wrong"},
            json.dumps(CHAT_BODY),
            401,
            {
                "message": "Missing or invalid clove API key. Send it as x-api-key or Authorization: Bearer.",
                "type": "authentication_error",
                "param": None,
                "code": None,
            },
        ),
        (
            {},
            "{not json",
            400,
            {"message": "Invalid request body: expected a JSON object.", "type": "invalid_request_error", "param": None, "code": None},
        ),
        (
            {},
            json.dumps({**CHAT_BODY, "n": 2}),
            400,
            {
                "message": "Unsupported value for 'n': only n=1 is supported, because Claude returns one choice per request.",
                "type": "invalid_request_error",
                "param": "n",
                "code": None,
            },
        ),
        (
            {},
            json.dumps({**CHAT_BODY, "stream": True, "stream_options": {"include_usage": "yes"}}),
            400,
            {
                "message": "Invalid 'stream_options.include_usage': expected a boolean, got 'yes'.",
                "type": "invalid_request_error",
                "param": "stream_options.include_usage",
                "code": None,
            },
        ),
    ],
)
def test_chat_route_rejects_in_openai_shape(
    client: TestClient, fake: FakeAnthropic, headers: dict[str, str], content: str, status_code: int, error: dict[str, Any]
) -> None:
    response = client.post("/v1/chat/completions", content=content, headers=headers)
    assert response.status_code == status_code
    assert response.json() == {"error": error}
    assert fake.requests == []


def test_chat_route_body_too_large(settings: clove.Settings, store: clove.AccountStore, fake: FakeAnthropic) -> None:
    app = clove.create_app(dataclasses.replace(settings, max_body_bytes=100), transport=httpx.MockTransport(fake))
    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        response = post_chat(test_client, {**CHAT_BODY, "messages": [{"role": "user", "content": "x" * 200}]})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["code"] == "request_too_large"
    assert fake.requests == []


def test_chat_route_wrong_method(client: TestClient) -> None:
    response = client.get("/v1/chat/completions")
    assert response.status_code == 405
    assert response.json() == {
        "error": {
            "message": "Method GET is not allowed for /v1/chat/completions.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


def test_chat_route_without_account(settings: clove.Settings, fake: FakeAnthropic) -> None:
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        response = post_chat(test_client)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.json()["error"]["message"].startswith("clove has no Claude account yet.")


def test_chat_route_token_refresh_failure(settings: clove.Settings, fake: FakeAnthropic) -> None:
    expired_store(settings)
    fake.queue("/v1/oauth/token", *[reply(503)] * settings.max_retries)
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    with TestClient(app, headers={"x-api-key": API_KEY}) as test_client:
        response = post_chat(test_client)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "server_error"
    assert fake.requests_to("/v1/messages") == []


def test_chat_route_upstream_error_translated(client: TestClient, fake: FakeAnthropic) -> None:
    error = clove.error_body("invalid_request_error", "max_tokens: 100000 > 64000")
    fake.queue("/v1/messages", reply(400, json=error, headers={"request-id": "req_bad"}))
    response = post_chat(client)
    assert response.status_code == 400
    assert response.headers["x-request-id"] == "req_bad"
    assert response.json() == {
        "error": {"message": "max_tokens: 100000 > 64000", "type": "invalid_request_error", "param": None, "code": None}
    }


def test_chat_route_rate_limit_keeps_retry_after(client: TestClient, fake: FakeAnthropic) -> None:
    error = clove.error_body("rate_limit_error", "Rate limited")
    fake.queue("/v1/messages", reply(429, json=error, headers={"retry-after": "30"}))
    response = post_chat(client)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "30"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_chat_route_shares_retries(client: TestClient, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture) -> None:
    overloaded = clove.error_body("overloaded_error", "Overloaded")
    fake.queue("/v1/messages", reply(529, json=overloaded), fail_with(httpx.ConnectError("refused")))
    with caplog.at_level(logging.INFO, logger="clove"):
        response = post_chat(client)
    assert response.status_code == 200
    assert len(fake.requests_to("/v1/messages")) == 3
    assert "Upstream attempt 1 of 3 failed (status 529); retrying in 0.0s" in caplog.messages
    assert chat_completion_request_log(caplog)[0].startswith("POST /v1/chat/completions -> 200, 3 attempts")


def test_chat_route_upstream_unreachable(client: TestClient, fake: FakeAnthropic) -> None:
    fake.queue("/v1/messages", *[fail_with(httpx.ConnectError("refused"))] * 3)
    response = post_chat(client)
    assert response.status_code == 502
    assert response.json() == {
        "error": {
            "message": f"The Anthropic API at {UPSTREAM} could not be reached: connection failed.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


def test_chat_route_streams_chunks(client: TestClient, fake: FakeAnthropic) -> None:
    lines = chat_stream_lines(client, {**CHAT_BODY, "stream_options": {"include_usage": True}})

    upstream_body = json.loads(fake.requests_to("/v1/messages")[0].content)
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert upstream_body["stream"] is True
    assert "stream_options" not in upstream_body
    assert [chunk["choices"][0]["delta"] for chunk in chunks[:-1]] == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {"content": "!"},
        {},
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 7,
        "total_tokens": 19,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert lines[-1] == "data: [DONE]"


def test_chat_route_stream_error_event(client: TestClient, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture) -> None:
    error_event = sse_event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    events = message_stream_events(["partial"])[:4] + [error_event]
    fake.queue("/v1/messages", reply(200, headers={"content-type": "text/event-stream"}, content=b"".join(events)))
    with caplog.at_level(logging.INFO, logger="clove"):
        lines = chat_stream_lines(client, CHAT_BODY)

    assert "data: [DONE]" not in lines
    assert json.loads(lines[-1].removeprefix("data: ")) == {
        "error": {"message": "Overloaded", "type": "server_error", "param": None, "code": "overloaded"}
    }
    assert chat_completion_request_log(caplog)[0].endswith(", stream ended with an error: Overloaded")


def test_chat_route_stream_connection_breaks(client: TestClient, fake: FakeAnthropic) -> None:
    stream = BreakingStream(message_stream_events(["partial"])[:4], httpx.RemoteProtocolError("peer closed connection"))
    fake.queue("/v1/messages", reply(200, headers={"content-type": "text/event-stream"}, stream=stream))
    lines = chat_stream_lines(client, CHAT_BODY)

    assert "data: [DONE]" not in lines
    assert json.loads(lines[1].removeprefix("data: "))["choices"][0]["delta"] == {"content": "partial"}
    assert json.loads(lines[-1].removeprefix("data: ")) == {
        "error": {
            "message": "The upstream stream broke: connection error (RemoteProtocolError). The response is incomplete.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


def test_chat_route_stream_timeout(client: TestClient, fake: FakeAnthropic) -> None:
    stream = BreakingStream(message_stream_events(["partial"])[:3], httpx.ReadTimeout("no bytes"))
    fake.queue("/v1/messages", reply(200, headers={"content-type": "text/event-stream"}, stream=stream))
    lines = chat_stream_lines(client, CHAT_BODY)
    assert "data: [DONE]" not in lines
    assert "timed out waiting for the upstream" in json.loads(lines[-1].removeprefix("data: "))["error"]["message"]


def test_chat_route_stream_error_before_start(client: TestClient, fake: FakeAnthropic) -> None:
    error = clove.error_body("permission_error", "Not allowed")
    fake.queue("/v1/messages", reply(403, json=error))
    response = post_chat(client, {**CHAT_BODY, "stream": True})
    assert response.status_code == 403
    assert response.json() == {"error": {"message": "Not allowed", "type": "permission_error", "param": None, "code": None}}


@pytest.mark.anyio
async def test_chat_route_disconnect_closes_upstream(
    settings: clove.Settings, store: clove.AccountStore, fake: FakeAnthropic
) -> None:
    stream = BreakingStream(message_stream_events(["one"])[:2], None)
    fake.queue("/v1/messages", reply(200, headers={"content-type": "text/event-stream"}, stream=stream))
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    body = json.dumps({**CHAT_BODY, "stream": True}).encode()

    sent = await disconnect_after_first_chunk(app, "/v1/chat/completions", body, stream)

    assert sent[0]["status"] == 200
    assert b"chat.completion.chunk" in sent[1]["body"]


MODEL_ENTRY = {"type": "model", "id": "claude-sonnet-4-5", "display_name": "Claude Sonnet 4.5", "created_at": "2025-09-29T00:00:00Z"}
MODEL_WITH_OPENAI_FIELDS = {**MODEL_ENTRY, "object": "model", "created": 1759104000, "owned_by": "anthropic"}


def test_models_list_has_both_shapes(client: TestClient, fake: FakeAnthropic) -> None:
    upstream_list = {"data": [MODEL_ENTRY], "has_more": False, "first_id": "claude-sonnet-4-5", "last_id": "claude-sonnet-4-5"}
    fake.queue("/v1/models", reply(200, json=upstream_list))
    response = client.get("/v1/models")
    assert response.json() == {
        "object": "list",
        "data": [MODEL_WITH_OPENAI_FIELDS],
        "has_more": False,
        "first_id": "claude-sonnet-4-5",
        "last_id": "claude-sonnet-4-5",
    }
    assert fake.requests_to("/v1/models")[0].url.query == b"limit=1000"


def test_models_list_keeps_client_paging(client: TestClient, fake: FakeAnthropic) -> None:
    client.get("/v1/models?after_id=claude-x&limit=2")
    assert fake.requests_to("/v1/models")[0].url.query == b"after_id=claude-x&limit=2"


def test_models_list_adds_limit_to_query(client: TestClient, fake: FakeAnthropic) -> None:
    client.get("/v1/models?after_id=claude-x")
    assert fake.requests_to("/v1/models")[0].url.query == b"after_id=claude-x&limit=1000"


def test_model_by_id_has_both_shapes(client: TestClient, fake: FakeAnthropic) -> None:
    fake.queue("/v1/models/claude-sonnet-4-5", reply(200, json=MODEL_ENTRY))
    response = client.get("/v1/models/claude-sonnet-4-5")
    assert response.json() == MODEL_WITH_OPENAI_FIELDS


def test_models_error_keeps_anthropic_shape(client: TestClient, fake: FakeAnthropic) -> None:
    error = clove.error_body("not_found_error", "model: claude-nope")
    fake.queue("/v1/models/claude-nope", reply(404, json=error))
    response = client.get("/v1/models/claude-nope")
    assert response.status_code == 404
    assert response.json() == error


# --- Faults ---
#
# Upstream faults run against a real clove process and FaultyUpstream, a raw HTTP/1.1 server on a
# loopback port. clove forwards unknown client headers, so each test picks the fault per request.

FAULT_READ_TIMEOUT = 1.0
FAULT_MAX_RETRIES = 2
# Chunked, as HTTP/1.1 streams a body of unknown length, so a connection that closes before the
# last chunk is a broken body and not a clean end.
FAULT_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\n"
    b"connection: close\r\n"
    b"request-id: req_fault\r\n"
    b"\r\n"
)
FAULT_EVENTS = message_stream_events(["Hello", " there"])
# message_start, content_block_start, ping and the "Hello" delta: what a cut stream delivers.
FAULT_EVENTS_BEFORE_CUT = FAULT_EVENTS[:4]
# Maximum time a fake connection is held open, so that a test that goes wrong cannot hang the run.
FAULT_MAX_HOLD_SECONDS = 30.0


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def close_with_reset(connection: socket.socket) -> None:
    # SO_LINGER with a zero timeout makes close() send an RST instead of a FIN.
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


class FaultyUpstream:
    """A raw HTTP/1.1 server on a loopback port that fails in the way each request selects.

    The x-fake-fault request header names the fault (see _respond), and x-fake-tag labels the
    request so that a test can count its attempts and see when clove closed the connection. Each
    connection serves one request.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.tags: list[str] = []
        # Monotonic time at which clove closed a held stream, by tag.
        self.peer_closed_at: dict[str, float] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> FaultyUpstream:
        self.listener.settimeout(0.1)
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.listener.close()

    def attempts(self, tag: str) -> int:
        with self.lock:
            return self.tags.count(tag)

    def wait_for_peer_close(self, tag: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if tag in self.peer_closed_at:
                    return self.peer_closed_at[tag]
            time.sleep(0.01)
        return None

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            try:
                headers = self._read_request(connection)
            except OSError:
                return
            tag = headers.get("x-fake-tag", "")
            with self.lock:
                self.tags.append(tag)
            try:
                self._respond(connection, headers.get("x-fake-fault", "complete"), tag)
            except OSError:
                pass  # clove closed the connection first, which several faults expect.

    def _read_request(self, connection: socket.socket) -> dict[str, str]:
        connection.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                raise ConnectionError("the request ended before its headers")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = connection.recv(65536)
            if not chunk:
                raise ConnectionError("the request ended before its body")
            body += chunk
        return headers

    def _respond(self, connection: socket.socket, fault: str, tag: str) -> None:
        """Send the response, or the failure, that fault names.

        Before headers: reset (RST), close (FIN), stall (send nothing). After the SSE headers and
        FAULT_EVENTS_BEFORE_CUT: cut (FIN), cut-reset (RST), stall-mid (send nothing more), hold
        (a ping every 0.1 s until clove closes). complete sends the whole stream.
        """
        if fault == "reset":
            close_with_reset(connection)
            return
        if fault == "close":
            return
        if fault == "stall":
            self._hold(connection, tag, ping=False)
            return
        connection.sendall(FAULT_SSE_HEAD)
        if fault == "complete":
            connection.sendall(b"".join(http_chunk(event) for event in FAULT_EVENTS) + b"0\r\n\r\n")
            return
        connection.sendall(b"".join(http_chunk(event) for event in FAULT_EVENTS_BEFORE_CUT))
        if fault == "cut":
            return
        if fault == "cut-reset":
            close_with_reset(connection)
            return
        if fault in ("stall-mid", "hold"):
            self._hold(connection, tag, ping=fault == "hold")
            return
        raise ValueError(f"unknown x-fake-fault {fault!r}")

    def _hold(self, connection: socket.socket, tag: str, *, ping: bool) -> None:
        """Keep the connection open until clove closes it, and record when that happened."""
        deadline = time.monotonic() + FAULT_MAX_HOLD_SECONDS
        while time.monotonic() < deadline and not self.stopping.is_set():
            readable, _, _ = select.select([connection], [], [], 0.1)
            try:
                if readable and not connection.recv(1):
                    break
                if ping:
                    connection.sendall(http_chunk(sse_event("ping", {"type": "ping"})))
            except OSError:
                break
        else:
            return  # Held until the limit or shutdown, so clove never closed it.
        with self.lock:
            self.peer_closed_at[tag] = time.monotonic()


@pytest.fixture(scope="module")
def faulty_upstream() -> Iterator[FaultyUpstream]:
    with FaultyUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def faulty_clove(
    tmp_path_factory: pytest.TempPathFactory, faulty_upstream: FaultyUpstream
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A clove process in front of faulty_upstream, with a one-second read timeout and two attempts."""
    data_folder = tmp_path_factory.mktemp("faults") / "data"
    clove.AccountStore(data_folder).save(make_account())
    # WARNING keeps the per-request log lines out of the pipe. It is read only when clove stops, and
    # a full pipe would block clove.
    process, base_url = start_clove(
        data_folder,
        faulty_upstream,  # type: ignore[arg-type]  # start_clove reads only base_url
        READ_TIMEOUT=str(FAULT_READ_TIMEOUT),
        MAX_RETRIES=str(FAULT_MAX_RETRIES),
        RETRY_DELAY="0",
        LOG_LEVEL="WARNING",
    )
    yield process, base_url
    stop_clove(process)


def fault_headers(fault: str) -> dict[str, str]:
    """Return headers that select fault at faulty_upstream, with a tag unique to this request."""
    return {"x-api-key": API_KEY, "x-fake-fault": fault, "x-fake-tag": secrets.token_hex(8)}


STREAM_BODY = json.dumps({**REQUEST_BODY, "stream": True})


def test_faults_connection_refused_gives_502(tmp_path: Path) -> None:
    data_folder = tmp_path / "data"
    clove.AccountStore(data_folder).save(make_account())
    # free_port closes its listener, so nothing accepts connections on that port.
    closed_upstream = types.SimpleNamespace(base_url=f"http://127.0.0.1:{free_port()}")
    process, base_url = start_clove(
        data_folder,
        closed_upstream,  # type: ignore[arg-type]  # start_clove reads only base_url
        MAX_RETRIES=str(FAULT_MAX_RETRIES),
        RETRY_DELAY="0",
    )
    try:
        started = time.monotonic()
        response = httpx.post(base_url + "/v1/messages", content=STREAM_BODY, headers={"x-api-key": API_KEY}, timeout=10)
        elapsed = time.monotonic() - started
    finally:
        output = stop_clove(process)

    assert response.status_code == 502
    assert response.json() == clove.error_body(
        "api_error", f"The Anthropic API at {closed_upstream.base_url} could not be reached: connection failed."
    )
    assert elapsed < 2.0
    assert f"failed after {FAULT_MAX_RETRIES} attempts: connection failed" in output


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("reset", "connection error (ReadError)"), ("close", "connection error (RemoteProtocolError)")],
)
def test_faults_lost_before_headers_retried(
    faulty_clove: tuple[subprocess.Popen[str], str], faulty_upstream: FaultyUpstream, fault: str, reason: str
) -> None:
    _, base_url = faulty_clove
    headers = fault_headers(fault)
    response = httpx.post(base_url + "/v1/messages", content=STREAM_BODY, headers=headers, timeout=10)

    assert response.status_code == 502
    assert response.json() == clove.error_body(
        "api_error", f"The Anthropic API at {faulty_upstream.base_url} could not be reached: {reason}."
    )
    assert faulty_upstream.attempts(headers["x-fake-tag"]) == FAULT_MAX_RETRIES


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("cut", "connection error (RemoteProtocolError)"), ("cut-reset", "connection error (ReadError)")],
)
def test_faults_cut_stream_ends_with_error(
    faulty_clove: tuple[subprocess.Popen[str], str], faulty_upstream: FaultyUpstream, fault: str, reason: str
) -> None:
    _, base_url = faulty_clove
    headers = fault_headers(fault)
    with httpx.stream("POST", base_url + "/v1/messages", content=STREAM_BODY, headers=headers, timeout=10) as response:
        received = b"".join(response.iter_raw())

    error_event = clove.sse_error_event("api_error", f"The upstream stream broke: {reason}. The response is incomplete.")
    assert response.status_code == 200
    assert received == b"".join(FAULT_EVENTS_BEFORE_CUT) + error_event
    assert faulty_upstream.attempts(headers["x-fake-tag"]) == 1


def test_faults_cut_stream_raises_in_sdk(faulty_clove: tuple[subprocess.Popen[str], str]) -> None:
    _, base_url = faulty_clove
    sdk = anthropic.Anthropic(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=10)
    texts: list[str] = []
    # The SDK turns an SSE error event into the status error class for the response's status.
    with pytest.raises(anthropic.APIStatusError, match="The upstream stream broke") as raised:
        with sdk.messages.stream(**REQUEST_BODY, extra_headers=fault_headers("cut")) as stream:  # type: ignore[arg-type]
            for text in stream.text_stream:
                texts.append(text)

    assert texts == ["Hello"]
    assert raised.value.body == clove.error_body(
        "api_error", "The upstream stream broke: connection error (RemoteProtocolError). The response is incomplete."
    )


def test_faults_stall_before_headers_gives_504(
    faulty_clove: tuple[subprocess.Popen[str], str], faulty_upstream: FaultyUpstream
) -> None:
    _, base_url = faulty_clove
    headers = fault_headers("stall")
    started = time.monotonic()
    response = httpx.post(base_url + "/v1/messages", content=STREAM_BODY, headers=headers, timeout=10)
    elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert response.json() == clove.error_body(
        "api_error", f"The Anthropic API at {faulty_upstream.base_url} could not be reached: timed out waiting for the upstream."
    )
    assert faulty_upstream.attempts(headers["x-fake-tag"]) == FAULT_MAX_RETRIES
    assert elapsed >= FAULT_MAX_RETRIES * FAULT_READ_TIMEOUT
    assert elapsed < FAULT_MAX_RETRIES * FAULT_READ_TIMEOUT + 2.0


def test_faults_stall_mid_stream_ends_with_error(faulty_clove: tuple[subprocess.Popen[str], str]) -> None:
    _, base_url = faulty_clove
    started = time.monotonic()
    with httpx.stream(
        "POST", base_url + "/v1/messages", content=STREAM_BODY, headers=fault_headers("stall-mid"), timeout=10
    ) as response:
        received = b"".join(response.iter_raw())
    elapsed = time.monotonic() - started

    error_event = clove.sse_error_event(
        "api_error", "The upstream stream broke: timed out waiting for the upstream. The response is incomplete."
    )
    assert received == b"".join(FAULT_EVENTS_BEFORE_CUT) + error_event
    assert elapsed >= FAULT_READ_TIMEOUT
    assert elapsed < FAULT_READ_TIMEOUT + 2.0


def test_faults_client_disconnect_closes_upstream(
    faulty_clove: tuple[subprocess.Popen[str], str], faulty_upstream: FaultyUpstream
) -> None:
    _, base_url = faulty_clove
    headers = fault_headers("hold")
    with httpx.stream("POST", base_url + "/v1/messages", content=STREAM_BODY, headers=headers, timeout=10) as response:
        first_chunk = next(response.iter_raw())
        # Closing a response before its body ends closes the connection to clove.
        response.close()
        disconnected_at = time.monotonic()

    closed_at = faulty_upstream.wait_for_peer_close(headers["x-fake-tag"], timeout=5)
    assert first_chunk.startswith(b"event: message_start")
    assert closed_at is not None, "clove never closed the upstream connection"
    assert closed_at - disconnected_at < 1.0


def open_file_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_open_file_count(pid: int, target: int | None = None, timeout: float = 5.0) -> int:
    """Return pid's open file count once it reaches target, or once it stops changing."""
    deadline = time.monotonic() + timeout
    previous = open_file_count(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        count = open_file_count(pid)
        if count == target or (target is None and count == previous):
            return count
        previous = count
    return open_file_count(pid)


async def abort_streams(base_url: str, count: int, concurrency: int) -> None:
    """Open count streams through clove, each left after its first chunk, concurrency at a time."""
    limiter = anyio.CapacityLimiter(concurrency)
    # No keep-alive pool: each aborted response closes its connection to clove.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=10) as client:

        async def abort_one() -> None:
            async with limiter:
                request = client.build_request("POST", "/v1/messages", content=STREAM_BODY, headers=fault_headers("hold"))
                response = await client.send(request, stream=True)
                try:
                    await response.aiter_raw().__anext__()
                finally:
                    await response.aclose()

        async with anyio.create_task_group() as task_group:
            for _ in range(count):
                task_group.start_soon(abort_one)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count open files")
def test_faults_aborted_streams_leak_nothing(faulty_clove: tuple[subprocess.Popen[str], str]) -> None:
    process, base_url = faulty_clove
    # The warm-up opens whatever clove keeps for its lifetime (selectors, the httpx client).
    anyio.run(abort_streams, base_url, 25, 25)
    baseline = settled_open_file_count(process.pid)

    started = time.monotonic()
    anyio.run(abort_streams, base_url, 1000, 25)
    elapsed = time.monotonic() - started
    after = settled_open_file_count(process.pid, target=baseline)

    # No pool slack is allowed: clove cannot reuse an upstream connection whose body was not read
    # to the end, so every aborted stream must close its upstream connection as well as the client's.
    assert after == baseline, f"clove has {after - baseline} more open files after 1,000 aborted streams"
    assert elapsed < 60


@pytest.mark.parametrize("model_path", ["a%00b", "a%3Fb%23c", "a%2Fb", "%E2%9C%93"])
def test_models_path_forwarded_encoded(client: TestClient, fake: FakeAnthropic, model_path: str) -> None:
    client.get("/v1/models/" + model_path)

    assert len(fake.requests) == 1
    assert fake.requests[0].url.raw_path == f"/v1/models/{model_path}".encode()


def test_encoded_path_without_raw_path() -> None:
    assert clove.encoded_path({"path": "/v1/models/a b%/\u2713"}) == "/v1/models/a%20b%25/%E2%9C%93"


# Raw ASGI requests, in-process, shaped the way uvicorn's h11 parser delivers them.


def asgi_scope(method: str, raw_path: str, headers: list[tuple[bytes, bytes]], query: bytes = b"") -> dict[str, Any]:
    """Build an HTTP scope from a percent-encoded path, decoding it as uvicorn's h11 protocol does."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": urllib.parse.unquote(raw_path),
        "raw_path": raw_path.encode("ascii"),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 5201),
    }


async def call_asgi(app: Starlette, scope: dict[str, Any], body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Run one request through app and return the status, headers and body it sent."""
    messages: list[dict[str, Any]] = []
    body_delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal body_delivered
        if not body_delivered:
            body_delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        # The client stays connected. A streamed response stops waiting for a disconnect once its
        # body ends.
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    with anyio.fail_after(10):
        await app(scope, receive, send)
    start = messages[0]
    assert start["type"] == "http.response.start"
    content = b"".join(message.get("body", b"") for message in messages[1:])
    return start["status"], dict(start.get("headers", [])), content


def test_body_content_length_superscript_digit(client: TestClient, fake: FakeAnthropic) -> None:
    # "\xb2" is "²" in Latin-1, which str.isdigit() accepts and int() rejects. h11 rejects such a
    # header with a 400 before clove receives it, but other ASGI servers may pass it on.
    headers = [(b"x-api-key", API_KEY.encode()), (b"content-length", b"\xb2")]
    assert client.portal is not None
    scope = asgi_scope("POST", "/v1/messages", headers)
    status, _, _ = client.portal.call(call_asgi, client.app, scope, json.dumps(REQUEST_BODY).encode())

    assert status == 200
    assert len(fake.requests_to("/v1/messages")) == 1


# Arbitrary requests for the property-based test: strategies, then the test.

HTTP_TOKEN_CHARACTERS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
COMMON_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]
ERROR_TYPES = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "overloaded_error",
}


def as_field_value(raw: bytes) -> bytes:
    """Make raw bytes a header value that h11 accepts: no NUL or line breaks, no outer whitespace."""
    return raw.translate(bytes.maketrans(b"\x00\n\r\x0b\x0c", b".....")).strip(b" \t")


HEADER_VALUES = st.one_of(
    st.binary(max_size=40),
    st.builds(operator.mul, st.binary(min_size=1, max_size=3), st.integers(1000, 20_000)),
    # Latin-1 digits that str.isdigit() accepts but int() does not, and other odd numbers.
    st.sampled_from([b"\xb2", b"\xb9\xb3", b"1" * 40, b"-1", b"7 ", b"0x10", b"1e3", b"\xff\xfe"]),
).map(as_field_value)
HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            "content-length",
            "content-type",
            "content-encoding",
            "transfer-encoding",
            "connection",
            "anthropic-version",
            "anthropic-beta",
            "accept-encoding",
            "authorization",
            "x-api-key",
            "cookie",
            "host",
        ]
    ),
    st.text(HTTP_TOKEN_CHARACTERS, min_size=1, max_size=20).map(str.lower),
).map(str.encode)
CORRECT_KEYS = st.sampled_from([[(b"x-api-key", API_KEY.encode())], [(b"authorization", b"Bearer " + API_KEY.encode())]])
ODD_KEYS = st.lists(st.tuples(st.sampled_from([b"x-api-key", b"authorization"]), HEADER_VALUES), max_size=2)
EXTRA_HEADERS = st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6)

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def vary_document(base: dict[str, Any], changes: dict[str, Any], removed: set[str]) -> bytes:
    document = {**base, **changes}
    for name in removed:
        document.pop(name, None)
    return json.dumps(document).encode()


def vary_fields(base: dict[str, Any], names: list[str]) -> st.SearchStrategy[bytes]:
    """Bodies that start from the valid document base, then set or remove a few fields."""
    # Half of them keep every field, so that they reach the upstream.
    changes = st.one_of(st.just({}), st.dictionaries(st.sampled_from(names), JSON_VALUES, min_size=1, max_size=3))
    removed = st.one_of(st.just(set()), st.just(set()), st.sets(st.sampled_from(sorted(base)), min_size=1, max_size=1))
    return st.builds(vary_document, st.just(base), changes, removed)


MESSAGE_BODIES = vary_fields(
    {**REQUEST_BODY, "stream": False},
    ["model", "messages", "max_tokens", "stream", "system", "metadata", "tools", "temperature"],
)
CHAT_BODIES = vary_fields(
    {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Hi"}], "stream": False},
    [
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "stop",
        "n",
        "tools",
        "tool_choice",
        "response_format",
        "reasoning_effort",
        "user",
    ],
)


def nest(depth: int, brackets: tuple[bytes, bytes]) -> bytes:
    opener, closer = brackets
    return b'{"model":"m","max_tokens":1,"messages":[' + opener * depth + closer * depth + b"]}"


def splice(body: bytes, position: int, inserted: bytes) -> bytes:
    return body[:position] + inserted + body[position:]


ODD_BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    st.builds(
        nest, st.one_of(st.integers(1, 100), st.integers(1000, 100_000)), st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")])
    ),
    st.builds(
        lambda digits, suffix: b'{"model":"m","messages":[1],"max_tokens":' + b"9" * digits + suffix + b"}",
        st.integers(1, 10_000),
        st.sampled_from([b"", b".5", b"e999999", b"e-999999"]),
    ),
    # Invalid UTF-8 and NUL bytes spliced into otherwise valid bodies.
    st.builds(splice, MESSAGE_BODIES, st.integers(0, 60), st.sampled_from([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80"])),
)
# Near-valid bodies for the routes that read one. A new route that reads a body gets an entry here.
ROUTE_BODIES = {
    "/v1/messages": MESSAGE_BODIES,
    "/v1/messages/count_tokens": MESSAGE_BODIES,
    clove.CHAT_COMPLETIONS_PATH: CHAT_BODIES,
}
# h11 accepts request targets made of visible ASCII characters only.
QUERY_STRINGS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80).map(str.encode)
PATH_PARAMETERS = st.binary(max_size=30).map(lambda raw: urllib.parse.quote_from_bytes(raw, safe=""))
ODD_PATH_SUFFIXES = st.sampled_from(["/", "/extra", "%00", "%2F..%2F"])
ARBITRARY_PATHS = st.binary(max_size=40).map(lambda raw: "/" + urllib.parse.quote_from_bytes(raw, safe="/"))
METHOD_TOKENS = st.text(HTTP_TOKEN_CHARACTERS, min_size=1, max_size=12)


def route_templates(app: Starlette) -> list[tuple[str, list[str]]]:
    """List every route of app with its methods, so that routes added to create_app get fuzzed too."""
    return [(route.path, sorted(route.methods or [])) for route in app.routes if isinstance(route, Route)]


def usually(draw: st.DrawFn) -> bool:
    """Return True three times in four, so that most requests get past routing and the key check."""
    return draw(st.sampled_from([True, True, True, False]))


@st.composite
def asgi_requests(draw: st.DrawFn, templates: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """Draw an HTTP request as an ASGI scope plus its body, within what uvicorn's h11 parser accepts."""
    template, route_methods = draw(st.sampled_from(templates))
    # Each {name} or {name:path} placeholder gets the same percent-encoded bytes.
    raw_path = re.sub(r"{[^}]*}", draw(PATH_PARAMETERS), template)
    if not usually(draw):
        raw_path = draw(st.one_of(ODD_PATH_SUFFIXES.map(raw_path.__add__), ARBITRARY_PATHS))
    odd_methods = st.one_of(st.sampled_from(COMMON_METHODS), METHOD_TOKENS)
    method = draw(st.sampled_from(route_methods) if usually(draw) else odd_methods)
    headers = draw(CORRECT_KEYS if usually(draw) else ODD_KEYS) + draw(EXTRA_HEADERS)
    scope = asgi_scope(method, raw_path, headers, draw(QUERY_STRINGS))
    body = draw(ROUTE_BODIES.get(template, ODD_BODIES) if usually(draw) else ODD_BODIES)
    return {"scope": scope, "body": body}


@pytest.fixture
def fuzz_client(settings: clove.Settings, store: clove.AccountStore, fake: FakeAnthropic) -> Iterator[TestClient]:
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    with TestClient(app) as test_client:
        yield test_client


@hypothesis.settings(
    max_examples=500,
    deadline=None,
    database=None,
    # The explain phase reruns a failing example for minutes, and the shrunk example is enough.
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
    # The app, its account file and caplog are meant to be shared by every example.
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture, hypothesis.HealthCheck.too_slow],
)
@hypothesis.given(data=st.data())
def test_routes_survive_arbitrary_requests(
    data: st.DataObject, fuzz_client: TestClient, store: clove.AccountStore, caplog: pytest.LogCaptureFixture
) -> None:
    assert fuzz_client.portal is not None
    app: Starlette = fuzz_client.app  # type: ignore[assignment]
    request = data.draw(asgi_requests(route_templates(app)))
    account_file = store.path.read_bytes()
    logged_before = len(caplog.records)

    with caplog.at_level(logging.INFO, logger="clove"):
        status, _, body = fuzz_client.portal.call(call_asgi, app, request["scope"], request["body"])

    errors = [record for record in caplog.records[logged_before:] if record.levelno >= logging.ERROR or record.exc_info]
    assert status < 500
    assert errors == []
    assert store.path.read_bytes() == account_file
    if status < 400 or request["scope"]["method"] == "HEAD":
        return
    document = json.loads(body)
    if request["scope"]["path"] == clove.CHAT_COMPLETIONS_PATH:
        # The OpenAI-format route returns errors in OpenAI's error shape.
        assert set(document) == {"error"}
        assert set(document["error"]) == {"message", "type", "param", "code"}
        assert isinstance(document["error"]["message"], str)
        return
    assert set(document) == {"type", "error"}
    assert document["type"] == "error"
    assert set(document["error"]) == {"type", "message"}
    assert document["error"]["type"] in ERROR_TYPES
    assert isinstance(document["error"]["message"], str)


# --- End to end: a real clove process, a fake upstream on loopback, the anthropic SDK ---


TOOL_USE_MESSAGE = {
    **MESSAGE,
    "content": [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
}
WEATHER_FUNCTION = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def tool_use_stream_events() -> list[bytes]:
    """The event sequence the Messages API sends for a streamed call of the weather tool."""
    start = {**MESSAGE, "content": [], "stop_reason": None, "usage": {"input_tokens": 30, "output_tokens": 1}}
    block = {"type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {}}
    events = [
        sse_event("message_start", {"type": "message_start", "message": start}),
        sse_event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
    ]
    for fragment in ['{"city', '": "Par', 'is"}']:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": fragment}}
        events.append(sse_event("content_block_delta", delta))
    return events + [
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
        sse_event("message_stop", {"type": "message_stop"}),
    ]


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port: int = listener.getsockname()[1]
        return port


def s256_challenge(code_verifier: str) -> str:
    digest = hashlib.sha256(code_verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


class FakeUpstreamServer:
    """A fake Anthropic API and OAuth server (authorize page, token endpoint) on a loopback port.

    The authorize page redirects at once to redirect_uri with a code and the state, as the real
    one does after the person signs in. The token endpoint redeems each code once, and only with
    the verifier whose S256 challenge the authorize page saw.
    """

    def __init__(self) -> None:
        self.token_calls = 0
        self.refresh_tokens_seen: list[str] = []
        self.authorizations: list[str] = []
        self.message_bodies: list[dict[str, Any]] = []
        self.issued_codes: dict[str, dict[str, str]] = {}
        self.code_exchanges: list[dict[str, Any]] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        app = Starlette(
            routes=[
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/oauth/token", self.token, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/authorize", self.authorize, methods=["GET"]),
            ]
        )
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeUpstreamServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake upstream did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    async def authorize(self, request: Request) -> Response:
        query = dict(request.query_params)
        code = f"fake-code-{len(self.issued_codes) + 1}"
        self.issued_codes[code] = query
        location = query["redirect_uri"] + "?" + urllib.parse.urlencode({"code": code, "state": query["state"]})
        return RedirectResponse(location, status_code=302)

    async def token(self, request: Request) -> Response:
        body = await request.json()
        if body["grant_type"] == "authorization_code":
            return self.exchange_code(body)
        self.token_calls += 1
        self.refresh_tokens_seen.append(body["refresh_token"])
        await anyio.sleep(0.2)
        number = self.token_calls
        return JSONResponse(token_payload(f"sk-ant-oat01-e2e-{number}", f"sk-ant-ort01-e2e-{number}"))

    def exchange_code(self, body: dict[str, Any]) -> Response:
        self.code_exchanges.append(body)
        issued = self.issued_codes.pop(body["code"], None)
        if (
            issued is None
            or s256_challenge(body["code_verifier"]) != issued["code_challenge"]
            or body["redirect_uri"] != issued["redirect_uri"]
            or body["state"] != issued["state"]
        ):
            return JSONResponse({"error": "invalid_grant", "error_description": "Invalid code"}, status_code=400)
        number = len(self.code_exchanges)
        return JSONResponse(token_payload(f"sk-ant-oat01-login-{number}", f"sk-ant-ort01-login-{number}"))

    async def messages(self, request: Request) -> Response:
        authorization = request.headers.get("authorization", "")
        self.authorizations.append(authorization)
        if "oauth-2025-04-20" not in request.headers.get("anthropic-beta", ""):
            return JSONResponse(clove.error_body("authentication_error", "OAuth authentication is currently not supported."), 401)
        body = await request.json()
        self.message_bodies.append(body)
        if body["model"] == "claude-missing":
            return JSONResponse(clove.error_body("not_found_error", "model: claude-missing"), 404)
        if body.get("tools"):
            return self.tool_reply(body)
        if body.get("stream"):
            return self.stream_reply(message_stream_events(["Hello", " from", " the stream."]))
        return JSONResponse(MESSAGE, headers={"request-id": "req_e2e"})

    def tool_reply(self, body: dict[str, Any]) -> Response:
        """Ask for the weather tool, or reply once the conversation ends with its result."""
        last_block = body["messages"][-1]["content"][-1]
        if last_block["type"] == "tool_result":
            answer = f"It is {last_block['content']} in Paris."
            if body.get("stream"):
                return self.stream_reply(message_stream_events([answer]))
            return JSONResponse({**MESSAGE, "content": [{"type": "text", "text": answer}]})
        if body.get("stream"):
            return self.stream_reply(tool_use_stream_events())
        return JSONResponse(TOOL_USE_MESSAGE)

    def stream_reply(self, events: list[bytes]) -> Response:
        async def slow_events() -> AsyncIterator[bytes]:
            for event in events:
                yield event
                await anyio.sleep(0.01)

        return StreamingResponse(slow_events(), media_type="text/event-stream", headers={"request-id": "req_e2e_stream"})

    async def models(self, request: Request) -> Response:
        if "oauth-2025-04-20" not in request.headers.get("anthropic-beta", ""):
            return JSONResponse(clove.error_body("authentication_error", "OAuth authentication is currently not supported."), 401)
        return JSONResponse(
            {"data": [MODEL_ENTRY], "has_more": False, "first_id": MODEL_ENTRY["id"], "last_id": MODEL_ENTRY["id"]}
        )


@pytest.fixture
def upstream_server() -> Iterator[FakeUpstreamServer]:
    with FakeUpstreamServer() as server:
        yield server


def clove_environment(data_folder: Path, upstream: FakeUpstreamServer, **environment: str) -> dict[str, str]:
    return {
        **os.environ,
        "CLOVE_ENV_FILE": "/nonexistent/clove.env",
        "DATA_FOLDER": str(data_folder),
        "CLAUDE_API_BASEURL": upstream.base_url,
        "OAUTH_TOKEN_URL": upstream.base_url + "/v1/oauth/token",
        "OAUTH_AUTHORIZE_URL": upstream.base_url + "/authorize",
        **environment,
    }


def start_clove(
    data_folder: Path, upstream: FakeUpstreamServer, port: int | None = None, **environment: str
) -> tuple[subprocess.Popen[str], str]:
    port = port or free_port()
    env = clove_environment(data_folder, upstream, HOST="127.0.0.1", PORT=str(port), API_KEY=API_KEY, **environment)
    process = subprocess.Popen(
        [sys.executable, str(HERE / "clove.py")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        assert process.poll() is None, process.communicate()[0]
        try:
            if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "clove did not start"
        time.sleep(0.05)


def stop_clove(process: subprocess.Popen[str]) -> str:
    process.terminate()
    output, _ = process.communicate(timeout=15)
    return output


def test_end_to_end_with_anthropic_sdk(tmp_path: Path, upstream_server: FakeUpstreamServer) -> None:
    data_folder = tmp_path / "data"
    credentials = tmp_path / "credentials.json"
    # Due for refresh 6 s from now: after clove has started and served the first two calls.
    expires_soon_ms = int((time.time() + 6) * 1000) + 300_000
    credentials.write_text(
        json.dumps({"claudeAiOauth": {"accessToken": "sk-ant-oat01-e2e-0", "refreshToken": "sk-ant-ort01-e2e-0", "expiresAt": expires_soon_ms}})
    )
    imported = subprocess.run(
        [sys.executable, str(HERE / "clove.py"), "import-claude-code", str(credentials)],
        env={**os.environ, "CLOVE_ENV_FILE": "/nonexistent", "DATA_FOLDER": str(data_folder)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert imported.returncode == 0, imported.stderr

    process, base_url = start_clove(data_folder, upstream_server)
    sdk = anthropic.Anthropic(base_url=base_url, api_key=API_KEY, max_retries=0)
    wrong_key_sdk = anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0)
    try:
        health = httpx.get(base_url + "/health").json()

        message = sdk.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Hi"}])
        with sdk.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]) as stream:
            streamed_text = "".join(stream.text_stream)
        assert upstream_server.token_calls == 0

        # Let the token pass into the refresh leeway, then send a burst of concurrent calls.
        time.sleep(max(0.0, expires_soon_ms / 1000 - 300 - time.time()) + 0.1)
        burst_results: list[str] = []

        def call_sdk() -> None:
            reply_message = sdk.messages.create(
                model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
            )
            burst_results.append(reply_message.content[0].text)  # type: ignore[union-attr]

        threads = [threading.Thread(target=call_sdk) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

        with pytest.raises(anthropic.AuthenticationError):
            wrong_key_sdk.messages.create(
                model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
            )
    finally:
        sdk.close()
        wrong_key_sdk.close()
        output = stop_clove(process)

    assert health["account_valid"] is True
    assert message.content[0].text == "Hello from the fake upstream."  # type: ignore[union-attr]
    assert streamed_text == "Hello from the stream."
    assert burst_results == ["Hello from the fake upstream."] * 10
    assert upstream_server.token_calls == 1
    assert upstream_server.refresh_tokens_seen == ["sk-ant-ort01-e2e-0"]
    assert upstream_server.authorizations[-1] == "Bearer sk-ant-oat01-e2e-1"
    saved = json.loads((data_folder / "account.json").read_text())
    assert saved["refresh_token"] == "sk-ant-ort01-e2e-1"
    assert "Refreshed the access token" in output
    assert "sk-ant-oat01-e2e" not in output
    assert API_KEY not in output


@contextlib.contextmanager
def running_clove(tmp_path: Path, upstream: FakeUpstreamServer) -> Iterator[tuple[str, list[str]]]:
    """Run clove with a long-lived token; the list receives clove's output once it has stopped."""
    data_folder = tmp_path / "data"
    clove.AccountStore(data_folder).save(make_account(access_token="sk-ant-oat01-e2e-0", refresh_token=None, expires_at=None))
    process, base_url = start_clove(data_folder, upstream)
    output: list[str] = []
    try:
        yield base_url, output
    finally:
        output.append(stop_clove(process))


def test_end_to_end_with_openai_sdk(tmp_path: Path, upstream_server: FakeUpstreamServer) -> None:
    messages: list[Any] = [{"role": "user", "content": "Hi"}]
    with running_clove(tmp_path, upstream_server) as (base_url, output):
        with openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0) as sdk:
            completion = sdk.chat.completions.create(model="claude-sonnet-4-5", messages=messages)
            chunks = list(
                sdk.chat.completions.create(
                    model="claude-sonnet-4-5", messages=messages, stream=True, stream_options={"include_usage": True}
                )
            )
            with pytest.raises(openai.BadRequestError) as bad_request:
                sdk.chat.completions.create(model="claude-sonnet-4-5", messages=messages, n=2)
            with pytest.raises(openai.NotFoundError) as not_found:
                sdk.chat.completions.create(model="claude-missing", messages=messages)
        with openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0) as wrong_key_sdk:
            with pytest.raises(openai.AuthenticationError):
                wrong_key_sdk.chat.completions.create(model="claude-sonnet-4-5", messages=messages)

    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 12
    assert completion.model == "claude-sonnet-4-5"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "Hello from the stream."
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 19
    assert bad_request.value.param == "n"
    assert not_found.value.body == {"message": "model: claude-missing", "type": "not_found_error", "param": None, "code": None}
    assert upstream_server.message_bodies[0] == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 8192,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    }
    assert len(upstream_server.message_bodies) == 3
    lines = output[0].splitlines()
    proxied_lines = [line for line in lines if "POST /v1/chat/completions -> " in line and " 1 attempt, " in line]
    rejected_lines = [line for line in lines if "POST /v1/chat/completions -> 401: Missing or invalid" in line]
    assert len(proxied_lines) == 3
    assert len(rejected_lines) == 1
    assert API_KEY not in output[0]


def test_end_to_end_openai_tool_round_trip(tmp_path: Path, upstream_server: FakeUpstreamServer) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    tools: list[Any] = [WEATHER_FUNCTION]
    with running_clove(tmp_path, upstream_server) as (base_url, _):
        with openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0) as sdk:
            first = sdk.chat.completions.create(model="claude-sonnet-4-5", messages=messages, tools=tools)
            tool_call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
            messages.append(first.choices[0].message.model_dump(exclude_none=True))
            messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": "21 degrees"})
            final = sdk.chat.completions.create(model="claude-sonnet-4-5", messages=messages, tools=tools)

            streamed_arguments = ""
            streamed_call_ids: list[str] = []
            stream = sdk.chat.completions.create(
                model="claude-sonnet-4-5", messages=messages[:1], tools=tools, tool_choice="required", stream=True
            )
            for chunk in stream:
                if not chunk.choices:
                    continue
                finish_reason = chunk.choices[0].finish_reason
                for delta_call in chunk.choices[0].delta.tool_calls or []:
                    if delta_call.id:
                        streamed_call_ids.append(delta_call.id)
                    if delta_call.function and delta_call.function.arguments:
                        streamed_arguments += delta_call.function.arguments

    assert first.choices[0].finish_reason == "tool_calls"
    assert first.choices[0].message.content == "Let me check."
    assert tool_call.id == "toolu_01"
    assert tool_call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.choices[0].message.content == "It is 21 degrees in Paris."
    assert streamed_call_ids == ["toolu_02"]
    assert json.loads(streamed_arguments) == {"city": "Paris"}
    assert finish_reason == "tool_calls"

    first_body, second_body, stream_body = upstream_server.message_bodies
    assert first_body["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }
    ]
    assert second_body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "21 degrees"}]},
    ]
    assert stream_body["tool_choice"] == {"type": "any"}
    assert stream_body["stream"] is True


def test_end_to_end_models_for_both_sdks(tmp_path: Path, upstream_server: FakeUpstreamServer) -> None:
    with running_clove(tmp_path, upstream_server) as (base_url, _):
        with openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0) as openai_sdk:
            openai_models = list(openai_sdk.models.list())
        with anthropic.Anthropic(base_url=base_url, api_key=API_KEY, max_retries=0) as anthropic_sdk:
            anthropic_models = list(anthropic_sdk.models.list())

    assert [(model.id, model.owned_by, model.created) for model in openai_models] == [("claude-sonnet-4-5", "anthropic", 1759104000)]
    assert [(model.id, model.display_name) for model in anthropic_models] == [("claude-sonnet-4-5", "Claude Sonnet 4.5")]


def send_hello(base_url: str) -> str:
    with anthropic.Anthropic(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
        message = sdk.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Hi"}])
    text: str = message.content[0].text  # type: ignore[union-attr]
    return text


def test_end_to_end_browser_login(tmp_path: Path, upstream_server: FakeUpstreamServer) -> None:
    port = free_port()
    redirect_uri = f"http://127.0.0.1:{port}/callback"
    process, base_url = start_clove(tmp_path / "data", upstream_server, port, OAUTH_REDIRECT_URI=redirect_uri)
    try:
        health_before = httpx.get(base_url + "/health").json()
        started = httpx.get(base_url + "/oauth/authorize", headers={"x-api-key": API_KEY})
        # The browser's part: open the URL, sign in (the fake skips that) and follow the redirect.
        callback = httpx.get(started.json()["authorization_url"], follow_redirects=True, timeout=30)
        reply_text = send_hello(base_url)
        health_after = httpx.get(base_url + "/health").json()
    finally:
        output = stop_clove(process)

    exchange = upstream_server.code_exchanges[0]
    assert health_before["account_status"] == "missing"
    assert [response.status_code for response in callback.history] == [302]
    assert callback.url.path == "/callback"
    assert callback.json() == {"success": True, "message": "Account configured successfully", "organization_uuid": "org-1234"}
    assert set(exchange) == {"grant_type", "code", "state", "client_id", "redirect_uri", "code_verifier"}
    assert exchange["redirect_uri"] == redirect_uri
    assert reply_text == "Hello from the fake upstream."
    assert upstream_server.authorizations == ["Bearer sk-ant-oat01-login-1"]
    assert health_after["account_valid"] is True
    assert "Login completed for organization org-1234" in output
    for secret in (exchange["code"], exchange["code_verifier"], "sk-ant-oat01-login-1", "sk-ant-ort01-login-1", API_KEY):
        assert secret not in output


def test_browser_login_across_workers(tmp_path: Path, upstream_server: FakeUpstreamServer) -> None:
    port = free_port()
    redirect_uri = f"http://127.0.0.1:{port}/callback"
    process, base_url = start_clove(
        tmp_path / "data", upstream_server, port, OAUTH_REDIRECT_URI=redirect_uri, WORKERS="3"
    )
    try:
        # Each request goes on a new connection, so the URLs and the callbacks spread over the workers.
        urls = [
            httpx.get(base_url + "/oauth/authorize", headers={"x-api-key": API_KEY}).json()["authorization_url"]
            for _ in range(6)
        ]
        callbacks = [httpx.get(url, follow_redirects=True, timeout=30) for url in urls]
    finally:
        stop_clove(process)

    assert [callback.status_code for callback in callbacks] == [200] * 6
    assert len(upstream_server.code_exchanges) == 6
    assert json.loads((tmp_path / "data" / "pending_logins.json").read_text()) == []


def test_login_command_updates_running_server(tmp_path: Path, upstream_server: FakeUpstreamServer) -> None:
    data_folder = tmp_path / "data"
    clove.import_token(clove.Settings(data_folder=data_folder), "sk-ant-oat01-before-login")
    process, base_url = start_clove(data_folder, upstream_server)
    try:
        text_before = send_hello(base_url)
        login = subprocess.Popen(
            [sys.executable, str(HERE / "clove.py"), "login"],
            env=clove_environment(data_folder, upstream_server),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert login.stdout is not None
        lines = [login.stdout.readline() for _ in range(3)]
        authorization_url = lines[2].strip()
        # The person opens the URL elsewhere and copies the address the OAuth server sent them to.
        callback_url = httpx.get(authorization_url).headers["location"]
        login_output, login_errors = login.communicate(callback_url + "\n", timeout=30)
        text_after = send_hello(base_url)
    finally:
        output = stop_clove(process)

    assert lines[0] == "Open this URL in a browser on any device and sign in to Claude:\n"
    assert login.returncode == 0, login_errors
    assert "Account configured successfully for organization org-1234." in login_output
    assert text_before == text_after == "Hello from the fake upstream."
    assert upstream_server.authorizations == ["Bearer sk-ant-oat01-before-login", "Bearer sk-ant-oat01-login-1"]
    assert "Account file changed on disk" in output
    assert "sk-ant-oat01-login-1" not in login_output + login_errors + output


class TlsUpstreamServer(FakeUpstreamServer):
    """The fake upstream served over HTTPS, with a certificate for 127.0.0.1 from a test CA."""

    def __init__(self, certificate_chain: Path) -> None:
        super().__init__()
        app = self.server.config.app
        self.base_url = f"https://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            ssl_certfile=str(certificate_chain),
            ssl_keyfile=str(certificate_chain),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)


def test_end_to_end_over_tls(tmp_path: Path) -> None:
    # The real upstream is HTTPS, so clove's own connection pool must do TLS with the system's
    # trust store; SSL_CERT_FILE points httpx's default context at the test CA instead.
    authority = trustme.CA()
    chain = tmp_path / "server.pem"
    authority.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(chain))
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    data_folder = tmp_path / "data"
    clove.AccountStore(data_folder).save(
        make_account(access_token="sk-ant-oat01-e2e-0", refresh_token="sk-ant-ort01-e2e-0", expires_at=int(time.time()) - 1)
    )

    with TlsUpstreamServer(chain) as upstream:
        process, base_url = start_clove(data_folder, upstream, SSL_CERT_FILE=str(ca_file))
        try:
            with anthropic.Anthropic(base_url=base_url, api_key=API_KEY, max_retries=0) as sdk:
                message = sdk.messages.create(
                    model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
                )
                with sdk.messages.stream(
                    model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
                ) as stream:
                    streamed_text = "".join(stream.text_stream)
        finally:
            output = stop_clove(process)

    assert message.content[0].text == "Hello from the fake upstream."  # type: ignore[union-attr]
    assert streamed_text == "Hello from the stream."
    assert upstream.token_calls == 1
    assert upstream.authorizations == ["Bearer sk-ant-oat01-e2e-1"] * 2
    assert "ERROR" not in output


def test_uvicorn_factory_serves_health(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "CLOVE_ENV_FILE": "/nonexistent", "DATA_FOLDER": str(tmp_path), "API_KEY": API_KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "clove:create_app", "--factory", "--host", "127.0.0.1", "--port", str(port)],
        cwd=HERE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
    finally:
        output = stop_clove(process)
    assert response.json() == {"status": "ok", "account_valid": False, "account_status": "missing"}
    assert "clove started" in output


# --- Several workers and process faults: real clove processes and a rotating token server ---


class RotatingTokenServer(FakeUpstreamServer):
    """A fake upstream whose token endpoint rotates refresh tokens as Anthropic's does.

    Only the newest refresh token is accepted; redeeming an older one gives 400 invalid_grant.
    `fault` makes the token endpoint fail: "html", "500", "429", "invalid_grant" or "slow".
    """

    def __init__(self, expires_in: int = 28800) -> None:
        super().__init__()
        self.expires_in = expires_in
        self.current_refresh_token = "sk-ant-ort01-rot-0"
        self.issued: list[str] = ["sk-ant-ort01-rot-0"]
        self.fault: str | None = None
        self.rejected = 0
        self.lock = threading.Lock()

    async def token(self, request: Request) -> Response:
        body = await request.json()
        with self.lock:
            self.token_calls += 1
            self.refresh_tokens_seen.append(body["refresh_token"])
        if self.fault is not None:
            return await self.failure()
        with self.lock:
            if body["refresh_token"] != self.current_refresh_token:
                self.rejected += 1
                return JSONResponse({"error": "invalid_grant", "error_description": "Refresh token not found"}, 400)
            number = len(self.issued)
            self.current_refresh_token = f"sk-ant-ort01-rot-{number}"
            self.issued.append(self.current_refresh_token)
        payload = token_payload(f"sk-ant-oat01-rot-{number}", self.current_refresh_token)
        payload["expires_in"] = self.expires_in
        return JSONResponse(payload)

    async def failure(self) -> Response:
        if self.fault == "html":
            return Response("<html><body>Service unavailable</body></html>", 503, media_type="text/html")
        if self.fault == "500":
            return JSONResponse({"error": "server_error"}, 500)
        if self.fault == "429":
            return JSONResponse({"error": "rate_limited"}, 429, headers={"retry-after": "0"})
        if self.fault == "slow":
            await anyio.sleep(3)
            return JSONResponse({"error": "server_error"}, 500)
        return JSONResponse({"error": "invalid_grant", "error_description": "Refresh token not found"}, 400)

    async def messages(self, request: Request) -> Response:
        gap = float(request.headers.get("x-test-event-gap", "0"))
        if gap:
            self.authorizations.append(request.headers.get("authorization", ""))

            async def slow_events() -> AsyncIterator[bytes]:
                for event in message_stream_events([f"part {number} " for number in range(10)]):
                    yield event
                    await anyio.sleep(gap)

            return StreamingResponse(slow_events(), media_type="text/event-stream")
        return await super().messages(request)


def write_account(data_folder: Path, expires_at: int, access_token: str = "sk-ant-oat01-rot-0") -> None:
    clove.AccountStore(data_folder).save(
        make_account(access_token=access_token, refresh_token="sk-ant-ort01-rot-0", expires_at=expires_at)
    )


def send_burst(base_url: str, count: int, headers: dict[str, str] | None = None) -> list[int]:
    """Send count concurrent requests, each on its own connection so they spread over workers."""
    statuses: list[int] = []
    lock = threading.Lock()

    def send_one() -> None:
        with httpx.Client(headers={"x-api-key": API_KEY, **(headers or {})}, timeout=30) as http_client:
            status = http_client.post(base_url + "/v1/messages", content=json.dumps(REQUEST_BODY)).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=send_one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return sorted(statuses)


def start_uvicorn_workers(data_folder: Path, upstream: FakeUpstreamServer, workers: int) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    env = {
        **os.environ,
        "CLOVE_ENV_FILE": "/nonexistent/clove.env",
        "API_KEY": API_KEY,
        "DATA_FOLDER": str(data_folder),
        "CLAUDE_API_BASEURL": upstream.base_url,
        "OAUTH_TOKEN_URL": upstream.base_url + "/v1/oauth/token",
    }
    command = [sys.executable, "-m", "uvicorn", "clove:create_app", "--factory", "--workers", str(workers)]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        cwd=HERE,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    wait_for_health(process, base_url)
    return process, base_url


def wait_for_health(process: subprocess.Popen[str], base_url: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        assert process.poll() is None, process.communicate()[0]
        try:
            if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "clove did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("launcher", ["WORKERS=4 python clove.py", "uvicorn --factory --workers 4"])
def test_workers_refresh_once_per_expiry(tmp_path: Path, launcher: str) -> None:
    data_folder = tmp_path / "data"
    # Each new token is due for refresh two seconds after it was issued (300 s leeway).
    with RotatingTokenServer(expires_in=302) as upstream:
        write_account(data_folder, expires_at=int(time.time()) - 1)
        if launcher.startswith("WORKERS"):
            process, base_url = start_clove(data_folder, upstream, WORKERS="4")
        else:
            process, base_url = start_uvicorn_workers(data_folder, upstream, 4)
        try:
            bursts = []
            for cycle in range(3):
                if cycle:
                    time.sleep(2.2)
                bursts.append(send_burst(base_url, 24))
            clove.import_token(clove.Settings(data_folder=data_folder), "sk-ant-oat01-imported")
            after_import = send_burst(base_url, 16)
        finally:
            output = stop_clove(process)

        assert bursts == [[200] * 24] * 3, output
        assert upstream.token_calls == 3
        assert upstream.rejected == 0
        assert upstream.refresh_tokens_seen == upstream.issued[:3]
        assert after_import == [200] * 16
        assert upstream.authorizations[-16:] == ["Bearer sk-ant-oat01-imported"] * 16


def test_sigkill_during_refreshes_keeps_account(tmp_path: Path) -> None:
    data_folder = tmp_path / "data"
    random_source = __import__("random").Random(4)
    # expires_in equal to the leeway makes every request refresh the token.
    with RotatingTokenServer(expires_in=300) as upstream:
        write_account(data_folder, expires_at=int(time.time()) - 1)
        kills = 0
        deadline = time.monotonic() + 60
        while upstream.token_calls < 200 and time.monotonic() < deadline:
            process, base_url = start_clove(data_folder, upstream, LOG_LEVEL="WARNING")
            stop_at = time.monotonic() + random_source.uniform(0.05, 0.4)
            with httpx.Client(headers={"x-api-key": API_KEY}, timeout=5) as http_client:
                while time.monotonic() < stop_at:
                    http_client.post(base_url + "/v1/messages", content=json.dumps(REQUEST_BODY))
            process.kill()
            process.communicate(timeout=10)
            kills += 1

            saved = json.loads((data_folder / "account.json").read_text())
            assert saved["refresh_token"] in upstream.issued[-2:], f"after kill {kills}"
            assert saved["status"] == "valid"
            # A kill between the token response and the save leaves the previous token on disk.
            # The fake accepts it again, so the next round can go on as after a new login.
            upstream.current_refresh_token = saved["refresh_token"]

        process, base_url = start_clove(data_folder, upstream)
        leftovers = [name for name in os.listdir(data_folder) if name.endswith(".tmp")]
        stop_clove(process)

    assert upstream.token_calls >= 200
    assert leftovers == []


def test_sigterm_lets_stream_finish(tmp_path: Path) -> None:
    data_folder = tmp_path / "data"
    with RotatingTokenServer() as upstream:
        write_account(data_folder, expires_at=int(time.time()) + 3600)
        process, base_url = start_clove(data_folder, upstream, SHUTDOWN_GRACE_SECONDS="10")
        body = json.dumps({**REQUEST_BODY, "stream": True})
        headers = {"x-api-key": API_KEY, "x-test-event-gap": "0.1"}
        with httpx.Client(timeout=10) as http_client:
            with http_client.stream("POST", base_url + "/v1/messages", content=body, headers=headers) as response:
                chunks = response.iter_raw()
                received = next(chunks)
                process.terminate()
                received += b"".join(chunks)
        output, _ = process.communicate(timeout=15)

    assert process.returncode == 0, output
    assert received.endswith(sse_event("message_stop", {"type": "message_stop"}))
    assert received.count(b"event: content_block_delta") == 10
    assert json.loads((data_folder / "account.json").read_text())["status"] == "valid"


def test_sigterm_grace_period_ends_stream(tmp_path: Path) -> None:
    data_folder = tmp_path / "data"
    with RotatingTokenServer() as upstream:
        write_account(data_folder, expires_at=int(time.time()) + 3600)
        process, base_url = start_clove(data_folder, upstream, SHUTDOWN_GRACE_SECONDS="0.5")
        body = json.dumps({**REQUEST_BODY, "stream": True})
        headers = {"x-api-key": API_KEY, "x-test-event-gap": "1"}
        with httpx.Client(timeout=10) as http_client:
            with http_client.stream("POST", base_url + "/v1/messages", content=body, headers=headers) as response:
                chunks = response.iter_raw()
                next(chunks)
                process.terminate()
                terminated_at = time.monotonic()
                with pytest.raises(httpx.RemoteProtocolError):
                    for _ in chunks:
                        pass
        process.communicate(timeout=15)
        stopped_after = time.monotonic() - terminated_at

    assert process.returncode == 0
    assert stopped_after < 5


def test_full_disk_keeps_serving_and_retries_save(tmp_path: Path) -> None:
    import resource

    data_folder = tmp_path / "data"
    # Writes of more than 64 bytes to a file fail with EFBIG, as on a full disk; account.json is
    # larger than that. Python ignores SIGXFSZ, so the write raises OSError instead of killing it.
    file_size_limit = 64

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))

    with RotatingTokenServer() as upstream:
        write_account(data_folder, expires_at=int(time.time()) - 1)
        before = (data_folder / "account.json").read_bytes()
        port = free_port()
        env = {
            **os.environ,
            "CLOVE_ENV_FILE": "/nonexistent",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "API_KEY": API_KEY,
            "DATA_FOLDER": str(data_folder),
            "CLAUDE_API_BASEURL": upstream.base_url,
            "OAUTH_TOKEN_URL": upstream.base_url + "/v1/oauth/token",
        }
        process = subprocess.Popen(
            [sys.executable, "-B", str(HERE / "clove.py")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=limit_file_size,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(process, base_url)
            first = send_burst(base_url, 3)
            unsaved = (data_folder / "account.json").read_bytes()
            resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            time.sleep(clove.SAVE_RETRY_INTERVAL_SECONDS + 0.2)
            second = send_burst(base_url, 1)
        finally:
            output = stop_clove(process)

    saved = json.loads((data_folder / "account.json").read_text())
    assert first == [200, 200, 200]
    assert second == [200]
    assert unsaved == before
    assert upstream.token_calls == 1
    assert upstream.authorizations == ["Bearer sk-ant-oat01-rot-1"] * 4
    assert saved["refresh_token"] == "sk-ant-ort01-rot-1"
    assert "File too large" in output
    assert "after an earlier failure" in output


@pytest.mark.parametrize(
    ("fault", "status_code", "token_calls"),
    [("html", 503, 2), ("500", 503, 2), ("429", 503, 2), ("slow", 503, 2), ("invalid_grant", 401, 1), ("down", 503, 0)],
)
def test_token_endpoint_fault_during_burst(tmp_path: Path, fault: str, status_code: int, token_calls: int) -> None:
    data_folder = tmp_path / "data"
    with RotatingTokenServer() as upstream:
        upstream.fault = None if fault == "down" else fault
        write_account(data_folder, expires_at=int(time.time()) - 1)
        before = (data_folder / "account.json").read_bytes()
        overrides = {"MAX_RETRIES": "2", "RETRY_DELAY": "0.1", "TOKEN_TIMEOUT": "1"}
        if fault == "down":
            overrides["OAUTH_TOKEN_URL"] = f"http://127.0.0.1:{free_port()}/v1/oauth/token"
        process, base_url = start_clove(data_folder, upstream, **overrides)
        try:
            statuses = send_burst(base_url, 20)
        finally:
            output = stop_clove(process)

    saved = json.loads((data_folder / "account.json").read_text())
    assert statuses == [status_code] * 20, output
    assert upstream.token_calls == token_calls
    assert upstream.authorizations == []
    if fault == "invalid_grant":
        assert saved["status"] == "invalid"
        assert saved["refresh_token"] == "sk-ant-ort01-rot-0"
    else:
        assert (data_folder / "account.json").read_bytes() == before


def test_token_endpoint_fault_before_expiry(tmp_path: Path) -> None:
    data_folder = tmp_path / "data"
    with RotatingTokenServer() as upstream:
        upstream.fault = "html"
        write_account(data_folder, expires_at=int(time.time()) + 120)
        process, base_url = start_clove(data_folder, upstream, MAX_RETRIES="2", RETRY_DELAY="0")
        try:
            statuses = send_burst(base_url, 20)
        finally:
            stop_clove(process)

    assert statuses == [200] * 20
    assert upstream.token_calls == 2
    assert set(upstream.authorizations) == {"Bearer sk-ant-oat01-rot-0"}
