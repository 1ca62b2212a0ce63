from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import re
import socket
import stat
import string
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
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

    Queue responses per path with `queue`; when a path's queue is empty it answers with a normal
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
        ("CLAUDE_API_BASEURL", "api.anthropic.com", "invalid CLAUDE_API_BASEURL 'api.anthropic.com': expected an http"),
    ],
)
def test_settings_invalid_value_names_setting(name: str, value: str, message: str) -> None:
    with pytest.raises(clove.SettingsError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        clove.load_settings({"CLOVE_ENV_FILE": "/nonexistent", name: value})


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
        (b'{"max_tokens": 5, "messages": [{}]}', "model: Field required (expected a non-empty string)."),
        (b'{"model": 5, "max_tokens": 5, "messages": [{}]}', "model: expected a non-empty string, got int."),
        (b'{"model": "m", "max_tokens": 5}', "messages: Field required (expected a non-empty list)."),
        (b'{"model": "m", "max_tokens": 5, "messages": []}', "messages: expected a non-empty list, got list."),
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
            headers={
                "request-id": "req_9",
                "anthropic-ratelimit-unified-status": "rejected",
                "retry-after": "30",
                "set-cookie": "x=1",
            },
        ),
    )
    response = post_message(client)

    assert response.status_code == 429
    assert response.json() == clove.error_body("rate_limit_error", "slow down")
    assert response.headers["request-id"] == "req_9"
    assert response.headers["anthropic-ratelimit-unified-status"] == "rejected"
    assert response.headers["retry-after"] == "30"
    assert "set-cookie" not in response.headers
    assert response.headers["content-length"] == str(len(response.content))
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


def test_count_tokens_and_models_pass_through(client: TestClient, fake: FakeAnthropic) -> None:
    counted = client.post("/v1/messages/count_tokens?beta=true", content=json.dumps({"model": "m", "messages": []}))
    models = client.get("/v1/models?limit=5")

    assert counted.json() == {"input_tokens": 9}
    assert models.json() == {"data": [], "has_more": False, "first_id": None, "last_id": None}
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
    assert response.json() == clove.error_body("api_error", "The Anthropic API could not be reached: connection failed.")
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


@pytest.mark.anyio
async def test_client_disconnect_closes_upstream(settings: clove.Settings, store: clove.AccountStore, fake: FakeAnthropic) -> None:
    stream = BreakingStream(message_stream_events(["one"])[:2], None)
    fake.queue("/v1/messages", reply(200, headers={"content-type": "text/event-stream"}, stream=stream))
    app = clove.create_app(settings, transport=httpx.MockTransport(fake))
    body = json.dumps({**REQUEST_BODY, "stream": True}).encode()
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
        "path": "/v1/messages",
        "raw_path": b"/v1/messages",
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
                await stream.closed.wait()
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
async def test_failed_save_keeps_tokens_in_memory(
    settings: clove.Settings, fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    account_store = expired_store(settings)
    tokens = make_tokens(settings, fake)
    real_save = clove.AccountStore.save

    def full_disk(self: clove.AccountStore, account: clove.Account) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(clove.AccountStore, "save", full_disk)
    assert await tokens.get_access_token() == NEW_ACCESS_TOKEN
    assert await tokens.get_access_token() == NEW_ACCESS_TOKEN
    assert account_store.load().refresh_token == REFRESH_TOKEN  # type: ignore[union-attr]
    assert any("No space left on device" in message for message in caplog.messages)

    monkeypatch.setattr(clove.AccountStore, "save", real_save)
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
        logins.clock = lambda: time.monotonic() + 601
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
        clove.import_token(settings, "sk-ant-oat01-from-login")

    saved = clove.AccountStore(settings.data_folder).load()
    assert saved is not None
    assert saved.access_token == "sk-ant-oat01-from-login"
    assert saved.status == "valid"
    assert await tokens.get_access_token() == "sk-ant-oat01-from-login"


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


# --- End to end: a real clove process, a fake upstream on loopback, the anthropic SDK ---


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
        self.issued_codes: dict[str, dict[str, str]] = {}
        self.code_exchanges: list[dict[str, Any]] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        app = Starlette(
            routes=[
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/oauth/token", self.token, methods=["POST"]),
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
        if body.get("stream"):

            async def events() -> AsyncIterator[bytes]:
                for event in message_stream_events(["Hello", " from", " the stream."]):
                    yield event
                    await anyio.sleep(0.01)

            return StreamingResponse(events(), media_type="text/event-stream", headers={"request-id": "req_e2e_stream"})
        return JSONResponse(MESSAGE, headers={"request-id": "req_e2e"})


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
    expires_soon_ms = int((time.time() + 3) * 1000) + 300_000
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
    try:
        health = httpx.get(base_url + "/health").json()
        sdk = anthropic.Anthropic(base_url=base_url, api_key=API_KEY, max_retries=0)

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

        with anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0) as wrong_key_sdk:
            with pytest.raises(anthropic.AuthenticationError):
                wrong_key_sdk.messages.create(
                    model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
                )
        # An SDK client left open leaks its pooled socket, which warnings-as-errors then reports.
        sdk.close()
    finally:
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
    assert "GET /callback?(hidden)" in output
    for secret in (exchange["code"], exchange["code_verifier"], "sk-ant-oat01-login-1", "sk-ant-ort01-login-1", API_KEY):
        assert secret not in output


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
