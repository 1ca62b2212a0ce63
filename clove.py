"""clove: a small reverse proxy that serves the Anthropic API with one Claude account's OAuth tokens.

Clients (the anthropic SDKs, Claude Code, curl) send requests with clove's own API key. clove
replaces it with the account's OAuth access token, refreshes that token before it expires, and
passes request and response bodies through unchanged. /v1/chat/completions serves OpenAI-format
clients by translating their requests to the Messages API and the replies back.

    python clove.py                            serve (also: uvicorn clove:create_app --factory)
    python clove.py import-claude-code [PATH]  import ~/.claude/.credentials.json
    python clove.py login                      log in through a browser on any device, then paste the code
    python clove.py import-token [TOKEN|-]     import a long-lived token from `claude setup-token`

Settings are read from, highest first: the process environment, the env file `clove.env` in the
working directory (or the file named by CLOVE_ENV_FILE), DATA_FOLDER/config.json, and the defaults
in SETTINGS below.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import email.utils
import fcntl
import getpass
import hashlib
import html
import json
import logging
import math
import os
import re
import secrets
import signal
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import anyio
import httpcore
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.config import Config
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

# --- Constants and logger ---

logger = logging.getLogger("clove")

ANTHROPIC_VERSION = "2023-06-01"
# The Messages API rejects OAuth access tokens unless this beta is listed in anthropic-beta.
OAUTH_BETA = "oauth-2025-04-20"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# After a transient refresh failure, a token that is still usable is served for this long before
# the token endpoint is tried again, so requests are not held up by a refresh that keeps failing.
REFRESH_BACKOFF_SECONDS = 30.0
# After a refresh of an expired token failed, requests get the same error for this long.
FAILED_REFRESH_HOLD_SECONDS = 5.0
# An upstream retry-after longer than this is not waited for; the response goes to the client.
MAX_HONOURED_RETRY_AFTER_SECONDS = 20.0
SAVE_RETRY_INTERVAL_SECONDS = 5.0
RETRYABLE_STATUS_CODES = frozenset({500, 502, 503, 504, 529})
LONG_LIVED_TOKEN_NOTE = "long-lived token: never refreshed"

# A login must finish this long after its authorization URL was made.
PENDING_LOGIN_TTL_SECONDS = 600
# Maximum number of unfinished logins kept in memory. Starting one more drops the oldest.
MAX_PENDING_LOGINS = 32
# Both paths serve the OAuth redirect. /callback is the path that a loopback redirect URI uses.
CALLBACK_PATHS = ("/oauth/callback", "/callback")
START_AGAIN = "Start the login again with GET /oauth/authorize or `python clove.py login`."
RETRY_LOGIN_LATER = "Wait a few minutes, then start the login again with GET /oauth/authorize or `clove.py login`."
ACCOUNT_UNCHANGED = "Any stored account is unchanged."

# Headers that describe one connection (RFC 9110 section 7.6.1) or that clove sets itself. They
# are never copied between the client and the upstream.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
CLIENT_HEADERS_NOT_FORWARDED = HOP_BY_HOP_HEADERS | {
    "host",
    "content-length",
    "x-api-key",
    "authorization",
    "cookie",
    "anthropic-version",
    "anthropic-beta",
    # clove requests identity encoding upstream, so streamed bytes normally pass through as sent.
    "accept-encoding",
}
# Bodies reach the client decoded (aiter_bytes), so the upstream's length and encoding no longer apply.
UPSTREAM_HEADERS_NOT_RETURNED = HOP_BY_HOP_HEADERS | {"content-length", "content-encoding", "set-cookie", "date", "server"}

# --- Errors ---


class CloveError(Exception):
    """An error that clove turns into an Anthropic-shaped error response."""

    status_code = 500
    error_type = "api_error"

    def __init__(self, message: str, *, status_code: int | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        if error_type is not None:
            self.error_type = error_type


class ChatRequestError(CloveError):
    """A chat completions request that clove cannot honour. param names the offending parameter."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class LoginError(CloveError):
    """A failed OAuth login step. Its message names what failed and how to start again."""

    status_code = 400
    error_type = "invalid_request_error"


class SettingsError(ValueError):
    """A setting with a value clove cannot use; the message names the setting and the value."""


class AccountFileError(ValueError):
    """An account file or credentials file that cannot be read or parsed."""


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def load_json_object(content: bytes) -> dict[str, Any] | None:
    """Decode content as JSON; return the object, or None for invalid JSON or any other value.

    RecursionError is caught too: nesting deeper than the interpreter's recursion limit.
    """
    try:
        document = json.loads(content)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def error_response(status_code: int, error_type: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(error_type, message), status_code=status_code, headers=headers)


# --- Settings ---


def _parse_text(value: str) -> str:
    return value.strip()


def _parse_host(value: str) -> str:
    # An empty host would make uvicorn listen on every IPv4 and IPv6 address.
    if not value.strip():
        raise ValueError("expected an address such as 127.0.0.1 or 0.0.0.0")
    return value.strip()


def _parse_optional_text(value: str) -> str | None:
    return value.strip() or None


def _parse_url(value: str) -> str:
    value = value.strip()
    if not value.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return value.rstrip("/")


def _parse_path(value: str) -> Path:
    if not value.strip():
        raise ValueError("expected a folder path")
    return Path(value.strip()).expanduser()


def _parse_list(value: str) -> list[str]:
    return [item for item in value.replace(",", " ").split() if item]


def _make_int_parser(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"expected a whole number from {minimum} to {maximum}") from None
        if not minimum <= number <= maximum:
            raise ValueError(f"expected a whole number from {minimum} to {maximum}")
        return number

    return parse


def _make_float_parser(minimum: float, maximum: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number of seconds from {minimum:g} to {maximum:g}") from None
        if not math.isfinite(number) or not minimum <= number <= maximum:
            raise ValueError(f"expected a number of seconds from {minimum:g} to {maximum:g}")
        return number

    return parse


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _parse_log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError("expected one of " + ", ".join(LOG_LEVELS))
    return level


@dataclass(frozen=True)
class SettingSpec:
    """One setting: its environment name, its key in config.json, how to parse it and its default."""

    name: str
    json_path: tuple[str, ...]
    parse: Callable[[str], Any]
    default: str
    help: str
    secret: bool = False


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("HOST", ("host",), _parse_host, "0.0.0.0", "Address to listen on; 127.0.0.1 keeps clove local."),
    SettingSpec("PORT", ("port",), _make_int_parser(1, 65535), "5201", "TCP port to listen on."),
    SettingSpec(
        "API_KEY",
        ("api_key",),
        _parse_optional_text,
        "",
        "Key clients must send (x-api-key or Authorization: Bearer). Empty: generate one in DATA_FOLDER.",
        secret=True,
    ),
    SettingSpec(
        "CLAUDE_API_BASEURL", ("claude_api_baseurl",), _parse_url, "https://api.anthropic.com", "Upstream Anthropic API."
    ),
    SettingSpec(
        "OAUTH_CLIENT_ID",
        ("oauth", "client_id"),
        _parse_text,
        "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        "OAuth client id (Claude Code's public PKCE client).",
    ),
    SettingSpec(
        "OAUTH_AUTHORIZE_URL",
        ("oauth", "authorize_url"),
        _parse_url,
        "https://claude.com/cai/oauth/authorize",
        "OAuth authorization page.",
    ),
    SettingSpec(
        "OAUTH_TOKEN_URL",
        ("oauth", "token_url"),
        _parse_url,
        "https://platform.claude.com/v1/oauth/token",
        "OAuth token endpoint (JSON request bodies).",
    ),
    SettingSpec(
        "OAUTH_REDIRECT_URI",
        ("oauth", "redirect_uri"),
        _parse_url,
        "https://platform.claude.com/oauth/code/callback",
        "OAuth redirect URI; the default page shows CODE#STATE to paste.",
    ),
    SettingSpec(
        "OAUTH_SCOPES", ("oauth", "scopes"), _parse_text, "user:profile user:inference", "Space-separated OAuth scopes."
    ),
    SettingSpec("DATA_FOLDER", ("data_folder",), _parse_path, "~/.clove/data", "Folder for account.json, api_key and config.json."),
    SettingSpec(
        "MAX_RETRIES", ("max_retries",), _make_int_parser(1, 20), "3", "Upstream attempts in total, first one included."
    ),
    SettingSpec(
        "RETRY_DELAY",
        ("retry_delay",),
        _make_float_parser(0, 60),
        "1",
        "Seconds before the first retry; doubles for each further one.",
    ),
    SettingSpec(
        "REFRESH_LEEWAY_SECONDS",
        ("refresh_leeway_seconds",),
        _make_int_parser(0, 86400),
        "300",
        "Refresh the access token this many seconds before it expires.",
    ),
    SettingSpec(
        "MAX_BODY_BYTES",
        ("max_body_bytes",),
        _make_int_parser(1, 1 << 31),
        str(32 * 1024 * 1024),
        "Largest request body accepted, in bytes (the Messages API's own limit is 32 MiB).",
    ),
    SettingSpec(
        "DEFAULT_MAX_TOKENS",
        ("default_max_tokens",),
        _make_int_parser(1, 1_000_000),
        "8192",
        "max_tokens sent upstream when a /v1/chat/completions request sets no token limit.",
    ),
    SettingSpec(
        "CONNECT_TIMEOUT",
        ("connect_timeout",),
        _make_float_parser(0.1, 300),
        "10",
        "Seconds to wait for a connection to the upstream.",
    ),
    SettingSpec(
        "READ_TIMEOUT",
        ("read_timeout",),
        _make_float_parser(1, 3600),
        "600",
        "Seconds allowed between two bytes from the upstream; a non-streaming reply must arrive within it.",
    ),
    SettingSpec(
        "TOKEN_TIMEOUT",
        ("token_timeout",),
        _make_float_parser(1, 300),
        "30",
        "Seconds allowed for one request to the OAuth token endpoint.",
    ),
    SettingSpec(
        "CORS_ORIGINS", ("cors_origins",), _parse_list, "", "Browser origins allowed by CORS, comma-separated; empty: off."
    ),
    SettingSpec(
        "WORKERS",
        ("workers",),
        _make_int_parser(1, 64),
        "1",
        "Worker processes for `python clove.py`; they share the account through a file lock.",
    ),
    SettingSpec(
        "SHUTDOWN_GRACE_SECONDS",
        ("shutdown_grace_seconds",),
        _make_float_parser(0, 3600),
        "30",
        "On SIGTERM, seconds that open requests and streams get to finish.",
    ),
    SettingSpec("LOG_LEVEL", ("log_level",), _parse_log_level, "INFO", "One of DEBUG, INFO, WARNING, ERROR, CRITICAL."),
)


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 5201
    api_key: str | None = field(default=None, repr=False)
    claude_api_baseurl: str = "https://api.anthropic.com"
    oauth_client_id: str = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    oauth_authorize_url: str = "https://claude.com/cai/oauth/authorize"
    oauth_token_url: str = "https://platform.claude.com/v1/oauth/token"
    oauth_redirect_uri: str = "https://platform.claude.com/oauth/code/callback"
    oauth_scopes: str = "user:profile user:inference"
    data_folder: Path = field(default_factory=lambda: Path("~/.clove/data").expanduser())
    max_retries: int = 3
    retry_delay: float = 1.0
    refresh_leeway_seconds: int = 300
    max_body_bytes: int = 32 * 1024 * 1024
    default_max_tokens: int = 8192
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    token_timeout: float = 30.0
    cors_origins: list[str] = field(default_factory=list)
    workers: int = 1
    shutdown_grace_seconds: float = 30.0
    log_level: str = "INFO"


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise SettingsError(f"invalid JSON in {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise SettingsError(f"invalid {path}: expected a JSON object at the top level")
    return document


def _lookup_json(document: Mapping[str, Any], json_path: tuple[str, ...]) -> str | None:
    value: Any = document
    for key in json_path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return str(value)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment, the env file, DATA_FOLDER/config.json and defaults.

    Raises SettingsError naming the setting, the value and what is accepted.
    """
    environ = os.environ if environ is None else environ
    env_file = Path(environ.get("CLOVE_ENV_FILE", "clove.env")).expanduser()
    config = Config(env_file if env_file.is_file() else None, environ=environ)

    def from_environment(spec: SettingSpec) -> str | None:
        value: str | None = config(spec.name, default=None)
        return value

    data_folder_spec = next(spec for spec in SETTINGS if spec.name == "DATA_FOLDER")
    first_data_folder = _parse_setting(data_folder_spec, from_environment(data_folder_spec) or data_folder_spec.default)
    document = _read_config_json(first_data_folder / "config.json")

    values: dict[str, Any] = {}
    for spec in SETTINGS:
        raw = from_environment(spec)
        if raw is None:
            raw = _lookup_json(document, spec.json_path)
        if raw is None:
            raw = spec.default
        values[spec.name.lower()] = _parse_setting(spec, raw)
    return Settings(**values)


def _parse_setting(spec: SettingSpec, raw: str) -> Any:
    try:
        return spec.parse(raw)
    except ValueError as exc:
        shown = "(hidden)" if spec.secret else repr(raw)
        raise SettingsError(f"invalid {spec.name} {shown}: {exc}") from None


# --- Accounts ---


@dataclass
class Account:
    """The one Claude account clove serves, stored as DATA_FOLDER/account.json.

    expires_at is in Unix seconds; None together with refresh_token None marks a long-lived token
    that is never refreshed.
    """

    organization_uuid: str | None
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: int | None
    status: str = "valid"
    created_at: int = 0
    updated_at: int = 0
    account_email: str | None = None
    account_uuid: str | None = None

    @property
    def refreshable(self) -> bool:
        return self.refresh_token is not None

    def needs_refresh(self, now: float, leeway_seconds: float) -> bool:
        if not self.refreshable or self.expires_at is None:
            return False
        return now >= self.expires_at - leeway_seconds

    def has_expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    @classmethod
    def from_record(cls, record: object) -> Account:
        """Build an Account from a decoded JSON record; raises AccountFileError on a bad field."""
        if not isinstance(record, dict):
            raise AccountFileError("expected a JSON object")
        names = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise AccountFileError("unknown fields: " + ", ".join(unknown))
        _check_field(record, "access_token", str, required=True)
        _check_field(record, "refresh_token", str)
        _check_field(record, "expires_at", int)
        _check_field(record, "created_at", int)
        _check_field(record, "updated_at", int)
        for name in ("organization_uuid", "account_email", "account_uuid"):
            _check_field(record, name, str)
        if record.get("status", "valid") not in ("valid", "invalid"):
            raise AccountFileError("status must be 'valid' or 'invalid'")
        if not record["access_token"]:
            raise AccountFileError("access_token is empty")
        defaults = {"organization_uuid": None, "refresh_token": None, "expires_at": None}
        return cls(**{**defaults, **record})


def _check_field(record: Mapping[str, Any], name: str, kind: type, *, required: bool = False) -> None:
    if name not in record or record[name] is None:
        if required:
            raise AccountFileError(f"missing field {name}")
        return
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AccountFileError(f"field {name} must be of type {kind.__name__}")


def write_private_file(path: Path, data: bytes) -> None:
    """Replace path atomically with data, mode 0600, in a folder of mode 0700.

    The data goes to a temporary file in the same folder, is flushed and fsynced, and then
    os.replace() swaps it in, so readers see the old file or the new one and never half of one.
    """
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    descriptor, temporary_name = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary_name, 0o600)
        os.replace(temporary_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary_name)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; some file systems do not allow it, which is harmless.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class AccountStore:
    """Reads and writes DATA_FOLDER/account.json and detects changes made by other processes."""

    def __init__(self, data_folder: Path) -> None:
        self.path = data_folder / "account.json"
        self._signature: tuple[int, int, int] | None = None

    def _stat_signature(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def changed_on_disk(self) -> bool:
        return self._stat_signature() != self._signature

    def load(self) -> Account | None:
        """Read the account; None when there is no file. Raises AccountFileError when unreadable."""
        self._signature = self._stat_signature()
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise AccountFileError(f"cannot read {self.path}: {exc}") from exc
        try:
            record = json.loads(text)
        except ValueError as exc:
            raise AccountFileError(f"{self.path} is not valid JSON: {exc}") from exc
        try:
            return Account.from_record(record)
        except AccountFileError as exc:
            raise AccountFileError(f"{self.path} is not a valid account: {exc}") from exc

    def save(self, account: Account) -> None:
        data = json.dumps(dataclasses.asdict(account), indent=2).encode("utf-8") + b"\n"
        write_private_file(self.path, data)
        self._signature = self._stat_signature()

    def remove_temporary_files(self) -> None:
        """Delete temporary files left by a process killed during a save; call with the lock held."""
        for leftover in self.path.parent.glob("." + self.path.name + ".*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()
                logger.info("Removed %s, left by an interrupted save", leftover)

    def set_aside_unreadable(self) -> Path | None:
        """Rename an unreadable account file out of the way before an import replaces it."""
        try:
            self.load()
            return None
        except AccountFileError:
            backup = self.path.with_name(f"account.json.unreadable-{int(time.time())}")
            os.replace(self.path, backup)
            return backup


LOCK_FILE_NAME = "account.lock"
# A worker that cannot take the data folder lock within this time gives up on the request.
LOCK_TIMEOUT_SECONDS = 60.0
LOCK_POLL_SECONDS = 0.01


def _open_lock_file(folder: Path, name: str = LOCK_FILE_NAME) -> int | None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / name
    try:
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    except OSError:
        try:
            # A read-only data folder still allows locking a lock file that already exists.
            return os.open(path, os.O_RDONLY)
        except OSError as exc:
            logger.warning("Cannot open %s (%s); continuing without the cross-process lock", path, exc)
            return None


@contextlib.contextmanager
def data_folder_lock(folder: Path, name: str = LOCK_FILE_NAME) -> Iterator[None]:
    """Hold an exclusive flock on a lock file in the data folder, blocking until it is free.

    Used by commands and for short file updates; the refresh path uses data_folder_lock_async.
    """
    descriptor = _open_lock_file(folder, name)
    try:
        if descriptor is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


@contextlib.asynccontextmanager
async def data_folder_lock_async(folder: Path) -> AsyncIterator[None]:
    """Hold the data folder's exclusive flock without blocking the event loop.

    The lock is polled with LOCK_NB, because a thread blocked in flock() cannot be cancelled and
    would take the lock after its caller had gone. Closing the descriptor releases the lock, also
    when the process dies. Raises CloveError after LOCK_TIMEOUT_SECONDS.
    """
    descriptor = _open_lock_file(folder)
    try:
        if descriptor is not None:
            await _poll_flock(descriptor, folder)
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


async def _poll_flock(descriptor: int, folder: Path) -> None:
    deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                logger.error("Timed out waiting for the lock on %s", folder / LOCK_FILE_NAME)
                raise CloveError(
                    f"Timed out waiting for another clove process to finish refreshing the token "
                    f"(lock {folder / LOCK_FILE_NAME}).",
                    status_code=503,
                    error_type="api_error",
                ) from None
            await anyio.sleep(LOCK_POLL_SECONDS)


def load_or_create_api_key(settings: Settings) -> tuple[str, bool]:
    """Return the proxy key and whether it was just generated.

    A configured API_KEY wins; otherwise the key in DATA_FOLDER/api_key is used, and created on
    the first start.
    """
    if settings.api_key:
        return settings.api_key, False
    path = settings.data_folder / "api_key"
    # Several workers may start at once; the lock makes sure only one of them creates the key.
    with data_folder_lock(settings.data_folder):
        try:
            key = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            key = ""
        if key:
            return key, False
        key = "clove-" + secrets.token_urlsafe(32)
        write_private_file(path, key.encode("ascii") + b"\n")
        return key, True


# --- Tokens ---


class TokenManager:
    """Hands out a valid access token, refreshing it through the OAuth token endpoint when due.

    One anyio.Lock serialises refreshes, so any number of waiting requests cause exactly one call
    to the token endpoint. The store is re-read when another process (an import) changed it.
    """

    def __init__(self, settings: Settings, store: AccountStore, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.account: Account | None = None
        self.load_error: str | None = None
        # Prevents two requests from redeeming the same refresh token: the server rotates it, so
        # the second redemption would fail with invalid_grant and lose the account.
        self._lock = anyio.Lock()
        self._refresh_not_before = 0.0
        # When the last refresh failed (monotonic seconds), and the error it gave.
        self._failed_at = -math.inf
        self._failure: CloveError | None = None
        # The reason the last refresh failed, until one succeeds; shown on /health.
        self._last_refresh_error: str | None = None
        self._unsaved = False
        self._next_save_attempt = 0.0
        with data_folder_lock(settings.data_folder):
            store.remove_temporary_files()
        self.reload()

    def reload(self) -> None:
        self._last_refresh_error = None
        try:
            self.account = self.store.load()
            self.load_error = None
        except AccountFileError as exc:
            self.account = None
            self.load_error = str(exc)
            logger.error("Account file is unreadable and will not be overwritten: %s", exc)

    def _sync_with_store(self) -> None:
        # A file written by another process wins over tokens that are still waiting to be saved.
        if self.store.changed_on_disk():
            logger.info("Account file changed on disk; reloading %s", self.store.path)
            self.reload()
            self._refresh_not_before = 0.0
            self._unsaved = False
        elif self._unsaved:
            self._retry_save()

    async def replace_account(self, account: Account) -> None:
        """Save account as the one clove serves and serve it from now on.

        Holds the refresh locks, so no refresh of the previous account in any process can overwrite it. An
        unreadable account file is renamed aside first. Raises OSError when the save fails, and
        then the previous account stays in place.
        """
        async with self._lock, data_folder_lock_async(self.settings.data_folder):
            backup = self.store.set_aside_unreadable()
            if backup is not None:
                logger.warning("Moved the unreadable account file to %s", backup)
            self.store.save(account)
            self.account = account
            self.load_error = None
            self._last_refresh_error = None
            self._refresh_not_before = 0.0
            self._unsaved = False

    def _usable_account(self) -> Account:
        if self.load_error is not None:
            raise CloveError(
                f"clove cannot use its account file: {self.load_error}. Fix the file, or log in again with "
                "`python clove.py login` (or import with `python clove.py import-claude-code`), which moves it aside.",
                status_code=401,
                error_type="authentication_error",
            )
        if self.account is None:
            raise CloveError(
                "clove has no Claude account yet. Log in with `python clove.py login` or GET /oauth/authorize, or "
                "import one on the clove host with `python clove.py import-claude-code` or `import-token`.",
                status_code=401,
                error_type="authentication_error",
            )
        if self.account.status != "valid":
            raise CloveError(
                "The Claude account's refresh token was rejected by the OAuth server. Log in again with "
                "`python clove.py login` or GET /oauth/authorize.",
                status_code=401,
                error_type="authentication_error",
            )
        return self.account

    async def get_access_token(self) -> str:
        """Return a usable access token, refreshing it first when it is within the leeway of expiry."""
        self._sync_with_store()
        account = self._usable_account()
        if not self._refresh_due(account, time.time()):
            return account.access_token
        async with self._refresh_guard():
            account = self._usable_account()
            if not self._refresh_due(account, time.time()):
                return account.access_token
            # Requests that arrive soon after a failed refresh, such as the rest of a burst,
            # share its error instead of each trying the token endpoint again.
            if self._failure is not None and time.monotonic() - self._failed_at < FAILED_REFRESH_HOLD_SECONDS:
                raise self._failure
            return await self._refresh(account)

    @contextlib.asynccontextmanager
    async def _refresh_guard(self) -> AsyncIterator[None]:
        """Hold the in-process lock and the data folder's flock, then adopt what another process saved.

        With several worker processes, the flock makes one of them refresh while the others wait
        and then read the tokens it saved.
        """
        async with self._lock:
            async with data_folder_lock_async(self.settings.data_folder):
                self._sync_with_store()
                yield

    def _refresh_due(self, account: Account, now: float) -> bool:
        if not account.needs_refresh(now, self.settings.refresh_leeway_seconds):
            return False
        # After a transient failure, keep serving the current token while it has not expired.
        return now >= self._refresh_not_before or account.has_expired(now)

    async def force_refresh(self, rejected_token: str) -> str | None:
        """Refresh after the upstream rejected rejected_token; returns the token to retry with.

        Returns the current token without a refresh when another request or process already
        replaced the rejected one, and None when the account has no refresh token.
        """
        async with self._refresh_guard():
            account = self._usable_account()
            if account.access_token != rejected_token:
                return account.access_token
            if not account.refreshable:
                return None
            return await self._refresh(account)

    async def _refresh(self, account: Account, *, retry_with_stored: bool = True) -> str:
        assert account.refresh_token is not None
        body = {
            "grant_type": "refresh_token",
            "refresh_token": account.refresh_token,
            "client_id": self.settings.oauth_client_id,
            "scope": self.settings.oauth_scopes,
        }
        try:
            payload = await self._request_tokens(body)
        except _RefreshRejected as exc:
            stored = self._newer_stored_account(account) if retry_with_stored else None
            if stored is not None:
                logger.warning("Refresh token rejected, but %s contains other tokens; using them", self.store.path)
                self.account = stored
                if not stored.needs_refresh(time.time(), self.settings.refresh_leeway_seconds):
                    return stored.access_token
                return await self._refresh(stored, retry_with_stored=False)
            self._mark_invalid(account, exc.reason)
            raise CloveError(
                "The Claude account's refresh token was rejected by the OAuth server "
                f"({exc.reason}). Log in again with `python clove.py login` or GET /oauth/authorize.",
                status_code=401,
                error_type="authentication_error",
            ) from None
        except _RefreshFailed as exc:
            return self._fall_back_after_failure(account, exc)
        self._apply_token_payload(account, payload)
        return account.access_token

    def _newer_stored_account(self, account: Account) -> Account | None:
        """Load the stored account; return it when it is valid and has other tokens than account."""
        try:
            stored = self.store.load()
        except AccountFileError:
            return None
        if stored is None or stored.status != "valid":
            return None
        if (stored.access_token, stored.refresh_token) == (account.access_token, account.refresh_token):
            return None
        return stored

    async def _request_tokens(self, body: dict[str, str]) -> dict[str, Any]:
        url = self.settings.oauth_token_url
        attempts = self.settings.max_retries
        for attempt in range(1, attempts + 1):
            failure, wait = await self._post_token_request(url, body)
            if isinstance(failure, dict):
                return failure
            if wait == _NOT_RETRYABLE:
                logger.error("Token refresh failed: %s", failure)
                raise _RefreshFailed(failure)
            if attempt == attempts:
                logger.error("Token refresh failed after %d attempts: %s", attempts, failure)
                raise _RefreshFailed(failure)
            delay = wait if wait is not None else self.settings.retry_delay * 2 ** (attempt - 1)
            logger.warning("Token refresh attempt %d of %d failed (%s); retrying in %.1fs", attempt, attempts, failure, delay)
            await anyio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post_token_request(self, url: str, body: dict[str, str]) -> tuple[dict[str, Any] | str, float | None]:
        """Send one token request; returns the JSON payload, or a failure text and a retry delay.

        Raises _RefreshRejected when the OAuth server rejects the grant or the client.
        """
        try:
            response = await self.client.post(url, json=body, timeout=self.settings.token_timeout)
        except httpx.TimeoutException:
            return f"POST {url} timed out", None
        except httpx.TransportError as exc:
            return f"POST {url} failed: {type(exc).__name__}", None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code == 200 and isinstance(payload, dict) and isinstance(payload.get("access_token"), str):
            return payload, None
        if response.status_code in (400, 401) and isinstance(payload, dict):
            error = payload.get("error")
            if error in ("invalid_grant", "invalid_client"):
                raise _RefreshRejected(f"{error} from {url}")
        shown = "a response without access_token" if response.status_code == 200 else f"status {response.status_code}"
        if payload is None:
            shown += " with a non-JSON body"
        if 400 <= response.status_code < 500 and response.status_code != 429:
            # A 404 or 405 means a wrong setting, which no retry mends.
            advice = "check OAUTH_TOKEN_URL and OAUTH_CLIENT_ID"
            return f"POST {url} returned {shown}; {advice}", _NOT_RETRYABLE
        wait = parse_retry_after(response.headers.get("retry-after"))
        if wait is not None and wait > MAX_HONOURED_RETRY_AFTER_SECONDS:
            wait = MAX_HONOURED_RETRY_AFTER_SECONDS
        return f"POST {url} returned {shown}", wait

    def _fall_back_after_failure(self, account: Account, exc: _RefreshFailed) -> str:
        self._last_refresh_error = exc.reason
        now = time.time()
        self._refresh_not_before = now + REFRESH_BACKOFF_SECONDS
        if not account.has_expired(now):
            logger.warning("Serving the current access token, which has not expired yet")
            return account.access_token
        self._failed_at = time.monotonic()
        self._failure = CloveError(
            f"clove could not refresh the Claude access token: {exc.reason}. The stored tokens are kept; "
            "try again shortly.",
            status_code=503,
            error_type="api_error",
        )
        raise self._failure

    def _mark_invalid(self, account: Account, reason: str) -> None:
        logger.error("Refresh token rejected (%s); marking the account invalid", reason)
        account.status = "invalid"
        account.updated_at = int(time.time())
        self._save(account)

    def _apply_token_payload(self, account: Account, payload: Mapping[str, Any]) -> None:
        update_account_from_token_payload(account, payload)
        self._last_refresh_error = None
        self._refresh_not_before = 0.0
        logger.info(
            "Refreshed the access token for organization %s; it expires at %s",
            account.organization_uuid or "(unknown)",
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(account.expires_at)),
        )
        self._save(account)

    def _save(self, account: Account) -> None:
        if self.store.changed_on_disk() and not self._unsaved:
            # Another process (`python clove.py login` or an import) replaced the account while this
            # refresh ran. Its file wins over tokens that belong to the account it replaced.
            logger.warning("Account file changed on disk during a refresh; loading it instead of saving")
            self.reload()
            self._refresh_not_before = 0.0
            return
        try:
            self.store.save(account)
            self._unsaved = False
        except OSError as exc:
            # The rotated tokens stay in memory, so requests keep working; the save is retried.
            self._unsaved = True
            self._next_save_attempt = time.monotonic() + SAVE_RETRY_INTERVAL_SECONDS
            logger.error("Saving %s failed (%s); keeping the tokens in memory and retrying", self.store.path, exc)

    def _retry_save(self) -> None:
        if self.account is None or time.monotonic() < self._next_save_attempt:
            return
        descriptor = _open_lock_file(self.settings.data_folder)
        try:
            if descriptor is not None:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._save(self.account)
        except BlockingIOError:
            return  # Another process is saving; the next request tries again.
        finally:
            if descriptor is not None:
                os.close(descriptor)
        if not self._unsaved:
            logger.info("Saved %s after an earlier failure", self.store.path)

    def describe(self) -> dict[str, Any]:
        """Non-secret account details for /health."""
        self._sync_with_store()
        account = self.account
        if self.load_error is not None:
            return {"account_valid": False, "account_status": "unreadable"}
        if account is None:
            return {"account_valid": False, "account_status": "missing"}
        now = time.time()
        expires_in = None if account.expires_at is None else int(account.expires_at - now)
        expired = account.has_expired(now)
        # An expired token is usable only through a refresh, so a failing refresh makes it unusable.
        refresh_failing = self._last_refresh_error is not None
        valid = account.status == "valid" and not (expired and (refresh_failing or not account.refreshable))
        details = {
            "account_valid": valid,
            "account_status": account.status,
            "organization_uuid": account.organization_uuid,
            "expires_in_seconds": expires_in,
            "refreshable": account.refreshable,
        }
        if refresh_failing:
            details["last_refresh_error"] = self._last_refresh_error
        return details


def update_account_from_token_payload(account: Account, payload: Mapping[str, Any]) -> None:
    """Copy the tokens, expiry and account details of a token endpoint response into account.

    A response without refresh_token keeps the old one, because the server may not rotate it.
    """
    now = int(time.time())
    account.access_token = payload["access_token"]
    refresh_token = payload.get("refresh_token")
    if isinstance(refresh_token, str) and refresh_token:
        account.refresh_token = refresh_token
    expires_in = payload.get("expires_in")
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and expires_in > 0:
        account.expires_at = now + int(expires_in)
    else:
        account.expires_at = now + 3600
        logger.warning("Token response had no usable expires_in; assuming one hour")
    organization = payload.get("organization")
    if isinstance(organization, dict) and isinstance(organization.get("uuid"), str):
        account.organization_uuid = organization["uuid"]
    details = payload.get("account")
    if isinstance(details, dict):
        if isinstance(details.get("email_address"), str):
            account.account_email = details["email_address"]
        if isinstance(details.get("uuid"), str):
            account.account_uuid = details["uuid"]
    account.status = "valid"
    account.updated_at = now


# The retry delay _post_token_request returns for a failure that retrying cannot fix.
_NOT_RETRYABLE = -1.0


class _RefreshRejected(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _RefreshFailed(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a retry-after header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = moment.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# --- Upstream connection pool ---

# httpcore's exceptions and the httpx ones that clove and its tests handle, most specific first.
_HTTPCORE_TO_HTTPX_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)
KEEPALIVE_EXPIRY_SECONDS = 5.0
MAX_IDLE_CONNECTIONS_PER_ORIGIN = 100
IDLE_SWEEP_INTERVAL_SECONDS = 1.0


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core_type, httpx_type in _HTTPCORE_TO_HTTPX_ERRORS:
            if isinstance(exc, core_type):
                raise httpx_type(str(exc)) from exc
        raise


class UpstreamTransport(httpx.AsyncBaseTransport):
    """An HTTP/1.1 keep-alive pool whose work per request does not grow with the pool.

    httpcore 1.0's AsyncConnectionPool checks every pooled connection for expiry, with a
    socket poll each, on every request. With 64 requests in flight, py-spy showed that check
    taking about half of clove's CPU. This pool keeps a stack of idle connections per origin, checks only the one it
    takes, and sweeps the rest at most once a second, when a request takes a connection.
    """

    def __init__(self) -> None:
        self._ssl_context = httpx.create_ssl_context()
        # Keyed by (scheme, host, port), because httpcore.Origin is not hashable.
        self._idle: dict[tuple[bytes, bytes, int], list[httpcore.AsyncHTTPConnection]] = {}
        self._next_sweep = 0.0
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = httpcore.Origin(url.raw_scheme, url.raw_host, url.port or (443 if url.scheme == "https" else 80))
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        connection = await self._checkout(origin)
        try:
            with _httpx_errors():
                core_response = await connection.handle_async_request(core_request)
        except BaseException:
            await connection.aclose()
            raise
        body = _PooledResponseBody(core_response.stream, lambda: self._checkin(origin, connection))  # type: ignore[arg-type]
        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=body,
            extensions=core_response.extensions,
        )

    async def _checkout(self, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection:
        if self._closed:
            raise RuntimeError("The upstream transport is closed.")
        await self._sweep()
        idle = self._idle.get((origin.scheme, origin.host, origin.port), [])
        while idle:
            connection = idle.pop()
            if connection.is_available() and not connection.has_expired():
                return connection
            await connection.aclose()
        return httpcore.AsyncHTTPConnection(
            origin=origin, ssl_context=self._ssl_context, keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS
        )

    async def _checkin(self, origin: httpcore.Origin, connection: httpcore.AsyncHTTPConnection) -> None:
        idle = self._idle.setdefault((origin.scheme, origin.host, origin.port), [])
        if self._closed or not connection.is_idle() or len(idle) >= MAX_IDLE_CONNECTIONS_PER_ORIGIN:
            await connection.aclose()
        else:
            idle.append(connection)

    async def _sweep(self) -> None:
        # Closes idle connections that expired or that the server closed, so their sockets do
        # not wait at the bottom of a stack until traffic reaches them.
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + IDLE_SWEEP_INTERVAL_SECONDS
        for idle in self._idle.values():
            expired = [connection for connection in idle if connection.has_expired()]
            # The stack is updated before any await, so a connection checked in meanwhile stays.
            idle[:] = [connection for connection in idle if connection not in expired]
            for connection in expired:
                await connection.aclose()

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                await connection.aclose()
        self._idle.clear()


class _PooledResponseBody(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], Any]) -> None:
        self._stream = stream
        self._release = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        try:
            with _httpx_errors():
                await self._stream.aclose()
        finally:
            await self._release()


# --- Upstream ---


def merge_beta_header(client_value: str | None) -> str:
    """Return the client's anthropic-beta list plus the OAuth beta, without duplicates and in order."""
    betas: list[str] = []
    for item in (client_value or "").split(","):
        item = item.strip()
        if item and item not in betas:
            betas.append(item)
    if OAUTH_BETA not in betas:
        betas.append(OAUTH_BETA)
    return ",".join(betas)


def build_upstream_headers(client_headers: list[tuple[bytes, bytes]], access_token: str) -> list[tuple[bytes, bytes]]:
    """Headers for the upstream request: the client's end-to-end headers plus the OAuth ones."""
    connection_tokens: set[str] = set()
    version: bytes | None = None
    betas: list[str] = []
    forwarded: list[tuple[bytes, bytes]] = []
    for raw_name, raw_value in client_headers:
        name = raw_name.decode("latin-1").lower()
        if name == "connection":
            connection_tokens.update(token.strip().lower() for token in raw_value.decode("latin-1").split(","))
        elif name == "anthropic-version":
            version = raw_value
        elif name == "anthropic-beta":
            betas.append(raw_value.decode("latin-1"))
        elif name not in CLIENT_HEADERS_NOT_FORWARDED:
            forwarded.append((name.encode("latin-1"), raw_value))
    forwarded = [(name, value) for name, value in forwarded if name.decode("latin-1") not in connection_tokens]
    forwarded.append((b"authorization", b"Bearer " + access_token.encode("ascii")))
    forwarded.append((b"anthropic-version", version or ANTHROPIC_VERSION.encode("ascii")))
    forwarded.append((b"anthropic-beta", merge_beta_header(",".join(betas)).encode("latin-1")))
    forwarded.append((b"accept-encoding", b"identity"))
    return forwarded


def response_headers_for_client(upstream: httpx.Response) -> list[tuple[bytes, bytes]]:
    connection_tokens = {
        token.strip().lower() for token in upstream.headers.get("connection", "").split(",") if token.strip()
    }
    headers = []
    for raw_name, raw_value in upstream.headers.raw:
        name = raw_name.decode("latin-1").lower()
        if name in UPSTREAM_HEADERS_NOT_RETURNED or name in connection_tokens:
            continue
        headers.append((name.encode("latin-1"), raw_value))
    return headers


@dataclass
class ProxyCall:
    """One request to forward: what the client sent, already read and checked."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    stream: bool


class Upstream:
    """Sends requests to the Anthropic API with retries before the first byte reaches the client."""

    def __init__(
        self, settings: Settings, tokens: TokenManager, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.transport = transport
        self.timeout = timeout.as_dict()

    async def open(self, call: ProxyCall) -> tuple[httpx.Response, int]:
        """Send call and return the upstream response with its headers read, and the attempt count.

        Retries connection errors, timeouts and the status codes in RETRYABLE_STATUS_CODES up to
        MAX_RETRIES attempts. A 401 for the token just used causes one forced refresh and one
        replay. Raises CloveError when every attempt failed without a response to pass on.
        """
        url = self.settings.claude_api_baseurl + call.path
        if call.query:
            url += "?" + call.query.decode("latin-1")
        attempts = self.settings.max_retries
        replayed_after_401 = False
        attempt = 0
        token = await self.tokens.get_access_token()
        while True:
            attempt += 1
            try:
                response = await self._send(call, url, token)
            except httpx.TransportError as exc:
                reason = describe_transport_error(exc)
                if attempt >= attempts:
                    logger.error("Upstream %s %s failed after %d attempts: %s", call.method, call.path, attempt, reason)
                    raise _transport_failure(reason, self.settings.claude_api_baseurl) from None
                await self._wait_before_retry(attempt, reason, None)
                continue

            if response.status_code == 401 and not replayed_after_401:
                new_token = await self._replacement_token(response, token)
                if new_token is not None:
                    replayed_after_401 = True
                    token = new_token
                    attempt -= 1
                    continue
            if response.status_code in RETRYABLE_STATUS_CODES and attempt < attempts:
                wait = parse_retry_after(response.headers.get("retry-after"))
                if wait is None or wait <= MAX_HONOURED_RETRY_AFTER_SECONDS:
                    await response.aclose()
                    await self._wait_before_retry(attempt, f"status {response.status_code}", wait)
                    token = await self.tokens.get_access_token()
                    continue
            return response, attempt + (1 if replayed_after_401 else 0)

    async def _send(self, call: ProxyCall, url: str, token: str) -> httpx.Response:
        # The transport is called directly: httpx.AsyncClient's cookie jar, auth and redirect
        # handling have no place in a proxy, and skipping them saves CPU on every request.
        request = httpx.Request(
            call.method,
            url,
            headers=build_upstream_headers(call.headers, token),
            content=call.body or None,
            extensions={"timeout": self.timeout},
        )
        response = await self.transport.handle_async_request(request)
        response.request = request
        if not call.stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def _replacement_token(self, response: httpx.Response, token: str) -> str | None:
        await response.aread()
        new_token = await self.tokens.force_refresh(token)
        if new_token is None:
            return None
        await response.aclose()
        logger.warning("Upstream rejected the access token; replaying once with a refreshed token")
        return new_token

    async def _wait_before_retry(self, attempt: int, reason: str, retry_after: float | None) -> None:
        delay = retry_after if retry_after is not None else self.settings.retry_delay * 2 ** (attempt - 1)
        logger.warning(
            "Upstream attempt %d of %d failed (%s); retrying in %.1fs", attempt, self.settings.max_retries, reason, delay
        )
        await anyio.sleep(delay)


def describe_transport_error(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connecting timed out"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out waiting for the upstream"
    if isinstance(exc, httpx.ConnectError):
        return "connection failed"
    return f"connection error ({type(exc).__name__})"


def _transport_failure(reason: str, base_url: str | None = None) -> CloveError:
    status = 504 if "timed out" in reason else 502
    where = f" at {base_url}" if base_url else ""
    return CloveError(f"The Anthropic API{where} could not be reached: {reason}.", status_code=status, error_type="api_error")


def sse_error_event(error_type: str, message: str) -> bytes:
    data = json.dumps(error_body(error_type, message), separators=(",", ":"))
    return b"event: error\ndata: " + data.encode("utf-8") + b"\n\n"


class StreamedUpstreamResponse:
    """An ASGI response that relays an upstream response's bytes as they arrive.

    The upstream is closed as soon as the body ends, the upstream fails or the client
    disconnects. Status and headers have gone out before the first chunk, so a failure after that
    can only be reported in-band, as an SSE error event, and ends the stream.
    """

    def __init__(self, upstream: httpx.Response, on_close: Callable[[str], None]) -> None:
        self.upstream = upstream
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Plain asyncio tasks rather than an anyio task group: tearing a task group down after
        # each stream cost about 0.2 ms, measured as the next request's time to first byte.
        outcome = "client disconnected"
        relay = asyncio.ensure_future(self._relay(send))
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait((relay, watcher), return_when=asyncio.FIRST_COMPLETED)
            if relay.done():
                outcome = relay.result()
        finally:
            watcher.cancel()
            if not relay.done():
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()
            self.on_close(outcome)

    async def _relay(self, send: Send) -> str:
        await send({"type": "http.response.start", "status": self.upstream.status_code, "headers": self.client_headers()})
        try:
            async for chunk in self.upstream.aiter_bytes():
                await _send_body(send, self.convert(chunk))
            await _send_body(send, self.finish())
            outcome = self.outcome()
        except httpx.TransportError as exc:
            reason = describe_transport_error(exc)
            outcome = "upstream failed mid-stream: " + reason
            logger.error("Upstream stream broke after the response started: %s", reason)
            await _send_body(send, self.failure_event(f"The upstream stream broke: {reason}. The response is incomplete."))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return outcome

    # The methods below pass the upstream bytes through unchanged. A subclass that rewrites the
    # stream overrides them.

    def client_headers(self) -> list[tuple[bytes, bytes]]:
        return response_headers_for_client(self.upstream)

    def convert(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        """Return the bytes to send after the upstream body ended without a transport error."""
        return b""

    def outcome(self) -> str:
        """Describe, for the request log line, how a stream that ended without a transport error went."""
        return "complete"

    def failure_event(self, message: str) -> bytes:
        if self.upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return sse_error_event("api_error", message)
        return b""


async def _send_body(send: Send, body: bytes) -> None:
    if body:
        await send({"type": "http.response.body", "body": body, "more_body": True})


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# --- OpenAI compatibility ---

# Requests: OpenAI chat.completions to Anthropic messages.

# Image types accepted by the Messages API for base64 sources.
_IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

# "image/jpg" is not a registered type, but clients send it often enough to accept.
_MEDIA_TYPE_ALIASES = {"image/jpg": "image/jpeg"}


def _is_default_or_absent(default: object) -> Callable[[object], bool]:
    return lambda value: value is None or (type(value) is type(default) and value == default)


# Parameters whose non-default values would change the reply in a way the Messages API
# cannot reproduce. Each entry: name, test for the accepted values, reason for the client.
_UNSUPPORTED_PARAMS: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("n", _is_default_or_absent(1), "only n=1 is supported, because Claude returns one choice per request"),
    ("logprobs", _is_default_or_absent(False), "log probabilities are not available from Claude"),
    ("top_logprobs", _is_default_or_absent(None), "log probabilities are not available from Claude"),
    ("audio", _is_default_or_absent(None), "audio output is not supported"),
    ("modalities", _is_default_or_absent(["text"]), "only the text modality is supported"),
    ("response_format", _is_default_or_absent({"type": "text"}), 'only {"type": "text"} is supported'),
    ("functions", _is_default_or_absent(None), "the legacy 'functions' is not supported. Use 'tools'"),
    ("function_call", _is_default_or_absent(None), "the legacy 'function_call' is not supported. Use 'tool_choice'"),
    ("logit_bias", _is_default_or_absent({}), "logit_bias is not supported by Claude"),
    ("prediction", _is_default_or_absent(None), "predicted outputs are not supported"),
)

# Fields that are ignored on purpose, like any other unknown field:
# - seed, presence_penalty, frequency_penalty: sampling controls with no Messages API
#   equivalent. Dropping them changes how tokens are sampled, not the shape of the reply.
# - store, metadata, service_tier: OpenAI storage and billing options.
# - reasoning_effort: enabling extended thinking would also constrain temperature and
#   max_tokens, and thinking output has no place in a chat.completion.
# - stream_options: chat_stream_include_usage reads include_usage for the route. Nothing is sent upstream.


def chat_request_to_messages(body: object, default_max_tokens: int) -> dict[str, Any]:
    """Convert a decoded OpenAI Chat Completions request body into a Messages request body.

    `default_max_tokens` is used when the client sets neither `max_tokens` nor
    `max_completion_tokens`, because the Messages API requires a limit.
    Raises ChatRequestError, naming the offending parameter, for anything that cannot be
    honoured.
    """
    if not isinstance(body, dict):
        raise ChatRequestError("Invalid request body: expected a JSON object.")
    _reject_unsupported_params(body)

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "a non-empty string")

    system, messages = _convert_messages(body.get("messages"))
    request: dict[str, Any] = {
        "model": model,
        "max_tokens": _max_tokens(body, default_max_tokens),
        "messages": messages,
    }
    if system:
        request["system"] = system
    request.update(_sampling_params(body))
    request.update(_tool_params(body))
    return request


def chat_stream_include_usage(body: dict[str, Any]) -> bool:
    """Return stream_options.include_usage, which requests a final chunk with token usage."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _invalid("stream_options", "an object")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _invalid("stream_options.include_usage", f"a boolean, got {include_usage!r}")
    return include_usage is True


def _invalid(param: str, expected: str) -> ChatRequestError:
    return ChatRequestError(f"Invalid '{param}': expected {expected}.", param)


def _reject_unsupported_params(body: dict[str, Any]) -> None:
    for name, accepts, reason in _UNSUPPORTED_PARAMS:
        value = body.get(name)
        if not accepts(value):
            raise ChatRequestError(f"Unsupported value for '{name}': {reason}.", name)


def _max_tokens(body: dict[str, Any], default: int) -> int:
    chosen = default
    # max_completion_tokens replaces the deprecated max_tokens, so it wins when both are set.
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise _invalid(name, f"a positive integer, got {value!r}")
        chosen = value
    return chosen


def _sampling_params(body: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    # NOTE: values are passed through without a range check. The Messages API reference gives
    # temperature a range of 0.0-1.0 while OpenAI allows 0-2, so values above 1 get an upstream 400.
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value):
            raise _invalid(name, f"a number, got {value!r}")
        params[name] = value

    stop_sequences = _stop_sequences(body.get("stop"))
    if stop_sequences:
        params["stop_sequences"] = stop_sequences

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream", f"a boolean, got {stream!r}")
    if stream:
        params["stream"] = True

    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid("user", f"a string, got {user!r}")
    if user:
        params["metadata"] = {"user_id": user}
    return params


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _stop_sequences(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        return list(stop)
    raise _invalid("stop", "a string or an array of strings")


# Message conversion.


def _convert_messages(messages: object) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split OpenAI messages into Anthropic system text blocks and alternating turns."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "a non-empty array of message objects")

    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(path, "a message object")
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_text_blocks(message.get("content"), f"{path}.content"))
            continue
        turn_role, blocks = _convert_turn(role, message, path)
        _append_turn(turns, turn_role, blocks)

    if not turns:
        raise ChatRequestError(
            "Invalid 'messages': no user, assistant or tool message with content was found. Add a user message.",
            "messages",
        )
    if turns[0]["role"] != "user":
        raise ChatRequestError(
            # The Messages API rejects a conversation whose first turn is not a user turn.
            "Invalid 'messages': after system and developer messages, the first message must be user or tool.",
            "messages",
        )
    return system, turns


def _convert_turn(role: object, message: dict[str, Any], path: str) -> tuple[str, list[dict[str, Any]]]:
    if role == "user":
        return "user", _user_blocks(message.get("content"), f"{path}.content")
    if role == "assistant":
        return "assistant", _assistant_blocks(message, path)
    if role == "tool":
        return "user", [_tool_result_block(message, path)]
    if role == "function":
        raise ChatRequestError(
            f"Unsupported role in '{path}': the legacy 'function' role is not supported. "
            "Send 'tool' messages with a 'tool_call_id'.",
            f"{path}.role",
        )
    raise ChatRequestError(f"Invalid role in '{path}': {role!r}.", f"{path}.role")


def _append_turn(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    # The Messages API rejects empty content, so a message without content is dropped
    # rather than padded with invented text.
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _text_blocks(content: object, path: str) -> list[dict[str, Any]]:
    """Convert string or text-part content into non-empty text blocks."""
    if isinstance(content, str):
        return [_text_block(content)] if content else []
    if not isinstance(content, list):
        raise _invalid(path, "a string or an array of text parts")

    blocks = []
    for j, part in enumerate(content):
        text = _part_text(part, f"{path}[{j}]")
        if text:
            blocks.append(_text_block(text))
    return blocks


def _part_text(part: object, path: str, allow_refusal: bool = False) -> str:
    if isinstance(part, dict):
        field = "refusal" if allow_refusal and part.get("type") == "refusal" else "text"
        value = part.get(field)
        if part.get("type") == field and isinstance(value, str):
            return value
    raise _invalid(path, 'a text part {"type": "text", "text": string}')


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _user_blocks(content: object, path: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [_text_block(content)] if content else []
    if not isinstance(content, list):
        raise _invalid(path, "a string or an array of content parts")

    blocks = []
    for j, part in enumerate(content):
        part_path = f"{path}[{j}]"
        part_type = part.get("type") if isinstance(part, dict) else None
        if part_type == "image_url":
            blocks.append(_image_block(part, part_path))
            continue
        if part_type != "text":
            raise ChatRequestError(
                f"Unsupported content part '{part_path}': type {part_type!r}. Use 'text' or 'image_url'.",
                part_path,
            )
        text = _part_text(part, part_path)
        if text:
            blocks.append(_text_block(text))
    return blocks


def _image_block(part: dict[str, Any], path: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str):
        raise ChatRequestError(f"Invalid image part '{path}': 'image_url.url' must be a string.", path)

    scheme = url.partition(":")[0].lower()
    if scheme == "data":
        return {"type": "image", "source": _data_url_source(url, path)}
    if scheme in ("http", "https"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise ChatRequestError(
        f"Unsupported image URL in '{path}': scheme {scheme!r}. Use an http(s) URL or a base64 data URL.", path
    )


def _data_url_source(url: str, path: str) -> dict[str, Any]:
    """Convert `data:<media type>[;param]*;base64,<data>` into a base64 image source."""
    header, comma, data = url[len("data:"):].partition(",")
    header_params = [item.strip().lower() for item in header.split(";")]
    media_type = _MEDIA_TYPE_ALIASES.get(header_params[0], header_params[0])
    if not comma or "base64" not in header_params[1:]:
        raise ChatRequestError(f"Invalid image data URL in '{path}': only base64 data URLs are supported.", path)
    if media_type not in _IMAGE_MEDIA_TYPES:
        raise ChatRequestError(
            f"Unsupported image type in '{path}': {media_type!r}. Use one of {', '.join(sorted(_IMAGE_MEDIA_TYPES))}.",
            path,
        )
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if not decoded:
        raise ChatRequestError(f"Invalid image data URL in '{path}': the data is empty or not valid base64.", path)
    return {"type": "base64", "media_type": media_type, "data": data}


def _assistant_blocks(message: dict[str, Any], path: str) -> list[dict[str, Any]]:
    content = message.get("content")
    content_path = f"{path}.content"
    blocks: list[dict[str, Any]] = []
    if isinstance(content, str):
        if content:
            blocks.append(_text_block(content))
    elif isinstance(content, list):
        # Replayed assistant messages may carry refusal parts, which are plain text here.
        for j, part in enumerate(content):
            text = _part_text(part, f"{content_path}[{j}]", allow_refusal=True)
            if text:
                blocks.append(_text_block(text))
    elif content is not None:
        raise _invalid(content_path, "a string, an array of text parts or null")

    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise _invalid(f"{path}.tool_calls", "an array")
        blocks.extend(_tool_use_block(call, f"{path}.tool_calls[{k}]") for k, call in enumerate(tool_calls))
    return blocks


def _tool_use_block(call: object, path: str) -> dict[str, Any]:
    # Some clients omit "type" on replayed tool calls, so it defaults to "function", the only valid value.
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise _invalid(path, "a tool call of type 'function'")
    function = call.get("function")
    if not isinstance(function, dict):
        raise _invalid(f"{path}.function", "an object")
    call_id = call.get("id")
    name = function.get("name")
    if not isinstance(call_id, str) or not call_id:
        raise _invalid(f"{path}.id", "a non-empty string")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{path}.function.name", "a non-empty string")
    arguments = _tool_arguments(function.get("arguments"), path)
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def _tool_arguments(arguments: object, path: str) -> dict[str, Any]:
    param = f"{path}.function.arguments"
    parsed: object = None
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            parsed = None
    if not isinstance(parsed, dict):
        raise _invalid(param, "a string containing a JSON object")
    return parsed


def _tool_result_block(message: dict[str, Any], path: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _invalid(f"{path}.tool_call_id", "a non-empty string")

    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
        return block
    text_blocks = _text_blocks(content, f"{path}.content")
    if text_blocks:
        block["content"] = text_blocks
    return block


# Tool conversion.


def _tool_params(body: dict[str, Any]) -> dict[str, Any]:
    tools = _convert_tools(body.get("tools"))
    tool_choice = _convert_tool_choice(body.get("tool_choice"), tools)

    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _invalid("parallel_tool_calls", f"a boolean, got {parallel!r}")
    if parallel is False and tools:
        tool_choice = tool_choice or {"type": "auto"}
        # With "none" no tool is called, and the Messages API accepts the flag only on the other types.
        if tool_choice["type"] != "none":
            tool_choice["disable_parallel_tool_use"] = True

    params: dict[str, Any] = {}
    if tools:
        params["tools"] = tools
    if tool_choice is not None:
        params["tool_choice"] = tool_choice
    return params


def _convert_tools(tools: object) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools", "an array of tool objects")
    return [_convert_tool(tool, f"tools[{k}]") for k, tool in enumerate(tools)]


def _convert_tool(tool: object, path: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise ChatRequestError(f"Unsupported tool '{path}': only tools of type 'function' are supported.", path)
    function = tool.get("function")
    if not isinstance(function, dict):
        raise _invalid(f"{path}.function", "an object")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{path}.function.name", "a non-empty string")

    converted: dict[str, Any] = {"name": name}
    description = function.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise _invalid(f"{path}.function.description", "a string")
        converted["description"] = description
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise _invalid(f"{path}.function.parameters", "a JSON Schema object")
    # OpenAI allows a tool without parameters, but the Messages API requires an input schema.
    converted["input_schema"] = parameters if parameters is not None else {"type": "object", "properties": {}}
    return converted


_TOOL_CHOICE_MODES = {"auto": "auto", "required": "any", "none": "none"}


def _convert_tool_choice(choice: object, tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str) and choice in _TOOL_CHOICE_MODES:
        converted: dict[str, Any] = {"type": _TOOL_CHOICE_MODES[choice]}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise ChatRequestError("Invalid 'tool_choice.function.name': expected a non-empty string.", "tool_choice")
        if name not in {tool["name"] for tool in tools}:
            raise ChatRequestError(f"Invalid 'tool_choice': no tool named {name!r} is in 'tools'.", "tool_choice")
        converted = {"type": "tool", "name": name}
    else:
        raise ChatRequestError(
            "Invalid 'tool_choice': expected \"auto\", \"required\", \"none\" or a function object.", "tool_choice"
        )

    if tools:
        return converted
    # Without tools, "auto" and "none" already describe the behaviour, so they are dropped.
    if converted["type"] in ("auto", "none"):
        return None
    raise ChatRequestError("Invalid 'tool_choice': a tool can only be required when 'tools' is set.", "tool_choice")


# Responses: an Anthropic message to an OpenAI chat.completion.


def _object(value: object) -> dict[str, Any]:
    """Return value if it is a JSON object, else an empty one, so malformed upstream data reads as absent."""
    return value if isinstance(value, dict) else {}


def _block_index(data: dict[str, Any]) -> int:
    index = data.get("index")
    return index if isinstance(index, int) else -1


_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}


def _finish_reason(stop_reason: object) -> str:
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _openai_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Convert Anthropic usage counters. Prompt tokens include cache writes and cache reads."""
    input_tokens = usage.get("input_tokens") or 0
    cache_creation = usage.get("cache_creation_input_tokens") or 0
    cache_read = usage.get("cache_read_input_tokens") or 0
    output_tokens = usage.get("output_tokens") or 0
    prompt_tokens = input_tokens + cache_creation + cache_read
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": prompt_tokens + output_tokens,
        "prompt_tokens_details": {"cached_tokens": cache_read},
    }


def chat_completion_from_message(message: dict[str, Any]) -> dict[str, Any]:
    """Convert a non-streaming Anthropic Message into an OpenAI chat.completion object.

    Text blocks are joined into `content`, and tool_use blocks become `tool_calls`.
    Thinking blocks and server tool blocks are dropped.
    """
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    content = message.get("content")
    for block in content if isinstance(content, list) else []:
        block = _object(block)
        if block.get("type") == "text":
            texts.append(block.get("text") or "")
        elif block.get("type") == "tool_use":
            tool_calls.append(_tool_call(block))

    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    reply["refusal"] = None
    finish_reason = _finish_reason(message.get("stop_reason"))
    choice = {"index": 0, "message": reply, "finish_reason": finish_reason, "logprobs": None}
    return {
        "id": f"chatcmpl-{message.get('id', '')}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": message.get("model"),
        "choices": [choice],
        "usage": _openai_usage(_object(message.get("usage"))),
    }


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
    function = {"name": block.get("name"), "arguments": arguments}
    return {"id": block.get("id"), "type": "function", "function": function}


# Streaming: Anthropic SSE events to OpenAI chat.completion.chunk events.

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


@dataclass
class _SseEvent:
    name: str
    data: str


class _SseParser:
    """Incremental text/event-stream parser for bytes split at arbitrary offsets.

    Lines are split as bytes and decoded only when complete, which is safe because CR
    and LF never occur inside a multi-byte UTF-8 sequence.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._event_name = ""
        self._data_lines: list[str] = []

    def feed(self, chunk: bytes) -> list[_SseEvent]:
        # The kept buffer contains no line break except a trailing CR, so the search starts there
        # and a long line that arrives in many small chunks is scanned once.
        scan_from = len(self._buffer) - 1 if self._buffer.endswith(b"\r") else len(self._buffer)
        self._buffer += chunk
        events: list[_SseEvent] = []
        consumed = 0
        for match in _LINE_BREAK.finditer(self._buffer, scan_from):
            # A CR at the end of the buffer may be the first half of a CRLF.
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break
            event = self._take_line(self._buffer[consumed:match.start()])
            consumed = match.end()
            if event is not None:
                events.append(event)
        self._buffer = self._buffer[consumed:]
        return events

    def close(self) -> list[_SseEvent]:
        """Flush a trailing CR and discard an event without its closing blank line, as the SSE spec requires."""
        events = self.feed(b"\n") if self._buffer.endswith(b"\r") else []
        self._buffer = b""
        self._event_name = ""
        self._data_lines = []
        return events

    def _take_line(self, line: bytes) -> _SseEvent | None:
        if not line:
            return self._dispatch()
        text = line.decode("utf-8", errors="replace")
        if text.startswith(":"):
            return None
        field, _, value = text.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event_name = value
        elif field == "data":
            self._data_lines.append(value)
        return None

    def _dispatch(self) -> _SseEvent | None:
        event = None
        if self._data_lines:
            event = _SseEvent(self._event_name or "message", "\n".join(self._data_lines))
        self._event_name = ""
        self._data_lines = []
        return event


def _sse_data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


_DONE = "data: [DONE]\n\n"


class ChatStreamTranslator:
    """Translate an Anthropic Messages SSE stream into OpenAI chat.completion.chunk events.

    Call feed() with upstream bytes as they arrive, then finish() when upstream closes
    cleanly or fail() when the connection breaks. The output ends with `data: [DONE]`
    only after message_stop. Otherwise it ends with an error event. After either ending,
    further calls return b"".
    """

    def __init__(self, model: str, include_usage: bool) -> None:
        self._parser = _SseParser()
        self._model = model
        self._include_usage = include_usage
        # Replaced by the upstream message id on message_start.
        self._id = f"chatcmpl-{secrets.token_hex(12)}"
        self._created = int(time.time())
        self._tool_indexes: dict[int, int] = {}  # Anthropic content block index -> OpenAI tool call index
        self._usage: dict[str, Any] = {}
        self._stop_reason: str | None = None
        self._arguments_sent: set[int] = set()  # OpenAI tool call indexes with argument text sent
        self._ended = False
        self.error: str | None = None  # the message of the error event that ended the output

    def feed(self, chunk: bytes) -> bytes:
        """Consume upstream bytes and return the OpenAI SSE bytes they complete, possibly b""."""
        if self._ended:
            return b""
        return self._translate(self._parser.feed(chunk))

    def finish(self) -> bytes:
        """Return the remaining output, or an error event if message_stop never arrived."""
        if self._ended:
            return b""
        output = self._translate(self._parser.close())
        if self._ended:
            return output
        error = self._error("Upstream stream ended before message_stop, so the response is incomplete.", "server_error")
        return output + error.encode()

    def fail(self, message: str) -> bytes:
        """Return an error event carrying `message`, or b"" if the stream already ended."""
        if self._ended:
            return b""
        return self._error(message, "server_error").encode()

    def _translate(self, events: list[_SseEvent]) -> bytes:
        output: list[str] = []
        for event in events:
            output.extend(self._handle(event))
            if self._ended:
                break
        return "".join(output).encode()

    def _handle(self, event: _SseEvent) -> list[str]:
        try:
            data = json.loads(event.data)
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            message = f"Upstream sent an invalid {event.name!r} event: the data is not a JSON object."
            return [self._error(message, "server_error")]

        handler = self._handlers.get(data.get("type", event.name))
        # Unknown event types are skipped, because Anthropic's versioning policy allows new ones.
        return handler(self, data) if handler else []

    def _on_message_start(self, data: dict[str, Any]) -> list[str]:
        message = _object(data.get("message"))
        if message.get("id"):
            self._id = f"chatcmpl-{message['id']}"
        if message.get("model"):
            self._model = message["model"]
        self._update_usage(message.get("usage"))
        return [self._chunk({"role": "assistant", "content": ""})]

    def _on_block_start(self, data: dict[str, Any]) -> list[str]:
        block = _object(data.get("content_block"))
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if block.get("type") != "tool_use":
            return []
        tool_index = len(self._tool_indexes)
        self._tool_indexes[_block_index(data)] = tool_index
        function = {"name": block.get("name"), "arguments": ""}
        call = {"index": tool_index, "id": block.get("id"), "type": "function", "function": function}
        return [self._chunk({"tool_calls": [call]})]

    def _on_block_delta(self, data: dict[str, Any]) -> list[str]:
        delta = _object(data.get("delta"))
        if delta.get("type") == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        tool_index = self._tool_indexes.get(_block_index(data))
        if delta.get("type") == "input_json_delta" and delta.get("partial_json") and tool_index is not None:
            self._arguments_sent.add(tool_index)
            return [self._arguments_chunk(tool_index, delta["partial_json"])]
        # thinking_delta, signature_delta and citations_delta have no OpenAI counterpart.
        return []

    def _on_block_stop(self, data: dict[str, Any]) -> list[str]:
        # A tool call without arguments streams no input_json_delta text. Sending "{}" makes the
        # accumulated arguments valid JSON, as in a non-streamed reply, so clients can send the
        # call back in a later request.
        tool_index = self._tool_indexes.get(_block_index(data))
        if tool_index is None or tool_index in self._arguments_sent:
            return []
        self._arguments_sent.add(tool_index)
        return [self._arguments_chunk(tool_index, "{}")]

    def _arguments_chunk(self, tool_index: int, arguments: str) -> str:
        return self._chunk({"tool_calls": [{"index": tool_index, "function": {"arguments": arguments}}]})

    def _on_message_delta(self, data: dict[str, Any]) -> list[str]:
        stop_reason = _object(data.get("delta")).get("stop_reason")
        if stop_reason:
            self._stop_reason = stop_reason
        self._update_usage(data.get("usage"))
        return []

    def _on_message_stop(self, data: dict[str, Any]) -> list[str]:
        self._ended = True
        output = [self._chunk({}, _finish_reason(self._stop_reason))]
        if self._include_usage:
            usage_chunk = self._chunk_base()
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _openai_usage(self._usage)
            output.append(_sse_data(usage_chunk))
        output.append(_DONE)
        return output

    def _on_error(self, data: dict[str, Any]) -> list[str]:
        error = _object(data.get("error"))
        error_type, code = _ANTHROPIC_ERROR_TYPES.get(error.get("type"), ("server_error", None))
        message = error.get("message") or "Upstream reported an error without a message."
        return [self._error(message, error_type, code)]

    def _update_usage(self, usage: object) -> None:
        # message_delta counters are cumulative, so later values replace earlier ones.
        if isinstance(usage, dict):
            self._usage.update({key: value for key, value in usage.items() if value is not None})

    def _chunk_base(self) -> dict[str, Any]:
        return {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self._model}

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        chunk = self._chunk_base()
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        if self._include_usage:
            chunk["usage"] = None
        return _sse_data(chunk)

    def _error(self, message: str, error_type: str, code: str | None = None) -> str:
        self._ended = True
        self.error = message
        return _sse_data(openai_error_body(message, error_type, None, code))

    _handlers: dict[str, Callable[[ChatStreamTranslator, dict[str, Any]], list[str]]] = {
        "message_start": _on_message_start,
        "content_block_start": _on_block_start,
        "content_block_delta": _on_block_delta,
        "message_delta": _on_message_delta,
        "content_block_stop": _on_block_stop,
        "message_stop": _on_message_stop,
        "error": _on_error,
        # ping needs no output.
    }



# Model lists and errors.


def models_list_for_both(upstream: dict[str, Any]) -> dict[str, Any]:
    """Convert an Anthropic model list into one that OpenAI and Anthropic clients both accept.

    Each entry keeps its Anthropic fields and gains OpenAI's `object`, `created` and `owned_by`.
    """
    entries = upstream.get("data")
    models = [model_for_both(entry) for entry in entries if isinstance(entry, dict)] if isinstance(entries, list) else []
    return {
        "object": "list",
        "data": models,
        "has_more": upstream.get("has_more", False),
        "first_id": upstream.get("first_id"),
        "last_id": upstream.get("last_id"),
    }


def model_for_both(entry: dict[str, Any]) -> dict[str, Any]:
    """Add OpenAI's `object`, `created` and `owned_by` fields to an Anthropic model object."""
    return {**entry, "object": "model", "created": _unix_time(entry.get("created_at")), "owned_by": "anthropic"}


def _unix_time(timestamp: object) -> int:
    """Parse an RFC 3339 timestamp into Unix seconds, or return 0 if it is missing or invalid."""
    if not isinstance(timestamp, str):
        return 0
    try:
        parsed = datetime.fromisoformat(timestamp)
    except ValueError:
        return 0
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp())


def openai_error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """Build an OpenAI error response body."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# Anthropic error type -> OpenAI error type and code.
_ANTHROPIC_ERROR_TYPES: dict[object, tuple[str, str | None]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("authentication_error", None),
    "permission_error": ("permission_error", None),
    "not_found_error": ("not_found_error", None),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    # OpenAI reports rate limits as "requests" or "tokens" depending on the limit hit.
    # Anthropic does not say which, so the generic type is kept.
    "rate_limit_error": ("rate_limit_error", None),
    "api_error": ("server_error", None),
    "overloaded_error": ("server_error", "overloaded"),
}

_STATUS_ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", None),
    403: ("permission_error", None),
    404: ("not_found_error", None),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", None),
    529: ("server_error", "overloaded"),
}

_BODY_EXCERPT_CHARS = 200


def openai_error_from_anthropic(status_code: int, body: bytes) -> dict[str, Any]:
    """Translate an upstream Anthropic error response into an OpenAI error body.

    A body that is not Anthropic's error JSON, such as an HTML page from a gateway, is
    typed by its status code and quoted in shortened form.
    """
    error = _anthropic_error(body)
    if error is None:
        error_type, code = _error_type_for_status(status_code)
        message = f"Upstream returned HTTP {status_code} with an unexpected body: {_excerpt(body)}"
        return openai_error_body(message, error_type, None, code)

    anthropic_type, message = error
    error_type, code = openai_error_type(anthropic_type, status_code)
    message = message or f"Upstream returned HTTP {status_code} without a message."
    return openai_error_body(message, error_type, None, code)


def openai_error_type(anthropic_type: str, status_code: int) -> tuple[str, str | None]:
    """Return the OpenAI error type and code for an Anthropic error type, falling back to the status."""
    return _ANTHROPIC_ERROR_TYPES.get(anthropic_type) or _error_type_for_status(status_code)


def _anthropic_error(body: bytes) -> tuple[str, str] | None:
    """Return (type, message) from `{"type": "error", "error": {...}}`, or None for any other body."""
    decoded = load_json_object(body)
    error = decoded.get("error") if decoded is not None else None
    if not isinstance(error, dict) or not isinstance(error.get("type"), str):
        return None
    message = error.get("message")
    return error["type"], message if isinstance(message, str) else ""


def _error_type_for_status(status_code: int) -> tuple[str, str | None]:
    if status_code in _STATUS_ERROR_TYPES:
        return _STATUS_ERROR_TYPES[status_code]
    if 400 <= status_code < 500:
        return "invalid_request_error", None
    return "server_error", None


def _excerpt(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", errors="replace").split())
    if not text:
        return "(empty body)"
    if len(text) > _BODY_EXCERPT_CHARS:
        return text[:_BODY_EXCERPT_CHARS] + "..."
    return text


# --- OAuth login ---
# The authorization code grant with PKCE (RFC 6749 section 4.1, RFC 7636), as Claude Code 2.1.332
# runs it. The routes, and `python clove.py login`, start a login and finish it with these pieces.


def make_code_verifier() -> str:
    # 32 random bytes give 43 URL-safe characters, the minimum length RFC 7636 allows.
    return secrets.token_urlsafe(32)


def make_code_challenge(code_verifier: str) -> str:
    # S256: the unpadded URL-safe base64 of the verifier's SHA-256 (RFC 7636 section 4.2).
    digest = hashlib.sha256(code_verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def build_authorization_url(settings: Settings, code_challenge: str, state: str) -> str:
    query = urllib.parse.urlencode(
        {
            "code": "true",
            "client_id": settings.oauth_client_id,
            "response_type": "code",
            "redirect_uri": settings.oauth_redirect_uri,
            "scope": settings.oauth_scopes,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
            "state": state,
        },
        quote_via=urllib.parse.quote,
    )
    separator = "&" if "?" in settings.oauth_authorize_url else "?"
    return settings.oauth_authorize_url + separator + query


@dataclass
class PendingLogin:
    """A login whose authorization URL went out and whose code has not come back yet."""

    state: str = field(repr=False)
    code_verifier: str = field(repr=False)
    redirect_uri: str
    authorization_url: str = field(repr=False)
    created_at: float


PENDING_LOGINS_FILE_NAME = "pending_logins.json"
PENDING_LOGINS_LOCK_NAME = "pending_logins.lock"


class PendingLogins:
    """Pending logins keyed by state: each is used once, expires, and the oldest go first when full.

    They are kept in DATA_FOLDER/pending_logins.json (mode 0600, under their own flock), so that a
    callback can reach any worker process, not only the one that handed out the URL. When that
    file cannot be written, they stay in this process's memory. clock returns Unix seconds, and
    tests replace it to expire logins.
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.path = settings.data_folder / PENDING_LOGINS_FILE_NAME
        self._logins: dict[str, PendingLogin] = {}

    def __len__(self) -> int:
        with self._locked():
            return len(self._logins)

    def start(self) -> PendingLogin:
        """Create a verifier and a state, remember them, and return the login with its URL."""
        code_verifier = make_code_verifier()
        state = secrets.token_urlsafe(32)
        url = build_authorization_url(self.settings, make_code_challenge(code_verifier), state)
        login = PendingLogin(state, code_verifier, self.settings.oauth_redirect_uri, url, self.clock())
        with self._locked():
            self._drop_expired()
            while len(self._logins) >= MAX_PENDING_LOGINS:
                del self._logins[next(iter(self._logins))]
            self._logins[state] = login
            self._write()
        return login

    def take(self, state: str) -> PendingLogin:
        """Remove and return the login for state. Raises LoginError when it is unknown or expired."""
        with self._locked():
            login = self._logins.pop(state, None)
            if login is not None:
                self._write()
        if login is None:
            raise LoginError(
                "No pending login has this state: it was used already, it expired, or it was started "
                f"before clove restarted. {START_AGAIN}"
            )
        if self._expired(login):
            minutes = PENDING_LOGIN_TTL_SECONDS // 60
            raise LoginError(f"This login expired: it was started more than {minutes} minutes ago. {START_AGAIN}")
        return login

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Another process may have started or used logins since this one last looked.
        with data_folder_lock(self.settings.data_folder, PENDING_LOGINS_LOCK_NAME):
            self._read()
            yield

    def _read(self) -> None:
        try:
            records = json.loads(self.path.read_text(encoding="utf-8"))
            stored = [PendingLogin(**record) for record in records]
        except FileNotFoundError:
            stored = list(self._logins.values())
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("Ignoring unreadable %s (%s)", self.path, exc)
            stored = list(self._logins.values())
        # Objects this process already has are kept, so a take returns the login that start made.
        self._logins = {login.state: self._logins.get(login.state, login) for login in stored}

    def _write(self) -> None:
        records = [dataclasses.asdict(login) for login in self._logins.values()]
        try:
            write_private_file(self.path, json.dumps(records).encode("utf-8"))
        except OSError as exc:
            logger.warning("Cannot save %s (%s); pending logins stay in this process only", self.path, exc)

    def _expired(self, login: PendingLogin) -> bool:
        return self.clock() - login.created_at > PENDING_LOGIN_TTL_SECONDS

    def _drop_expired(self) -> None:
        for state in [state for state, login in self._logins.items() if self._expired(login)]:
            del self._logins[state]


def split_code_and_state(code: str, state: str | None) -> tuple[str, str]:
    """Split the `CODE#STATE` form that Anthropic's callback page shows. A separate state must match."""
    code, hash_sign, embedded_state = code.strip().partition("#")
    if hash_sign and state and embedded_state != state:
        raise LoginError(f"The state after # in the code does not match the state parameter. {START_AGAIN}")
    state = state or embedded_state
    if not code:
        raise LoginError(f"The authorization code is missing. {START_AGAIN}")
    if not state:
        raise LoginError(f"The state is missing: paste the whole CODE#STATE text or the callback URL. {START_AGAIN}")
    return code, state


def parse_pasted_code(text: str) -> tuple[str, str]:
    """Return code and state from pasted `CODE#STATE` text or a whole callback URL."""
    text = text.strip()
    if "://" not in text:
        return split_code_and_state(text, None)
    parts = urllib.parse.urlsplit(text)
    query = dict(urllib.parse.parse_qsl(parts.query))
    check_authorization_error(query)
    code = query.get("code")
    if code is None:
        raise LoginError(f"The pasted URL has no code parameter. {START_AGAIN}")
    # An unencoded # in `?code=CODE#STATE` puts the state into the URL fragment.
    state = query.get("state") or (parts.fragment if "#" not in code else None)
    return split_code_and_state(code, state or None)


def check_authorization_error(query: Mapping[str, str]) -> None:
    """Raise LoginError when the authorization server redirected back with an error (RFC 6749 4.1.2.1)."""
    error = query.get("error")
    if error is None:
        return
    description = query.get("error_description", "")
    detail = f"{error}: {description[:200]}" if description else error
    raise LoginError(f"The authorization server did not grant access ({detail}). {START_AGAIN}")


async def exchange_code(settings: Settings, client: httpx.AsyncClient, login: PendingLogin, code: str) -> Account:
    """Redeem code at the token endpoint and return the new account, without saving it.

    Raises LoginError with what failed and what to do. The code is redeemed once and never retried,
    because the OAuth server accepts each code only once.
    """
    body = {
        "grant_type": "authorization_code",
        "code": code,
        "state": login.state,
        "client_id": settings.oauth_client_id,
        "redirect_uri": login.redirect_uri,
        "code_verifier": login.code_verifier,
    }
    payload = await _post_code_exchange(settings.oauth_token_url, client, body, settings.token_timeout)
    now = int(time.time())
    account = Account(organization_uuid=None, access_token="", refresh_token=None, expires_at=None, created_at=now)
    update_account_from_token_payload(account, payload)
    if account.organization_uuid is None:
        await _add_profile_details(settings, client, account)
    return account


async def _post_code_exchange(
    url: str, client: httpx.AsyncClient, body: dict[str, str], timeout: float
) -> dict[str, Any]:
    try:
        response = await client.post(url, json=body, timeout=timeout)
    except httpx.TimeoutException:
        raise LoginError(
            f"The token request to {url} timed out after {timeout:g} seconds. "
            f"{ACCOUNT_UNCHANGED} {RETRY_LOGIN_LATER}",
            status_code=504,
            error_type="api_error",
        ) from None
    except httpx.TransportError as exc:
        raise LoginError(
            f"The token request to {url} failed ({type(exc).__name__}). {ACCOUNT_UNCHANGED} {RETRY_LOGIN_LATER}",
            status_code=502,
            error_type="api_error",
        ) from None
    try:
        payload = response.json()
    except ValueError:
        payload = None
    access_token = payload.get("access_token") if isinstance(payload, dict) else None
    if response.status_code == 200 and isinstance(access_token, str) and access_token:
        return payload  # type: ignore[no-any-return]
    raise _code_exchange_failure(url, response.status_code, payload)


def _code_exchange_failure(url: str, status_code: int, payload: object) -> LoginError:
    error = payload.get("error") if isinstance(payload, dict) else None
    if status_code == 400 and error == "invalid_grant":
        return LoginError(
            f"The token endpoint {url} rejected the authorization code (status 400, invalid_grant). A code "
            f"works once and only for a few minutes. {ACCOUNT_UNCHANGED} {START_AGAIN}"
        )
    if status_code == 200:
        shown = "status 200 without an access_token"
    else:
        shown = f"status {status_code}" + (f", error {error}" if isinstance(error, str) else "")
    if payload is None:
        shown += ", with a body that is not JSON"
    if 400 <= status_code < 500 and status_code != 429:
        advice = f"Check OAUTH_TOKEN_URL, OAUTH_CLIENT_ID and OAUTH_REDIRECT_URI. {START_AGAIN}"
    else:
        advice = RETRY_LOGIN_LATER
    return LoginError(
        f"The token request to {url} failed with {shown}. {ACCOUNT_UNCHANGED} {advice}",
        status_code=502,
        error_type="api_error",
    )


async def _add_profile_details(settings: Settings, client: httpx.AsyncClient, account: Account) -> None:
    # The token response usually names the organization, and the profile does when it does not.
    # The tokens are good either way, so a failed lookup only leaves the organization unknown.
    url = settings.claude_api_baseurl + "/api/oauth/profile"
    headers = {"authorization": f"Bearer {account.access_token}", "anthropic-beta": OAUTH_BETA}
    try:
        response = await client.get(url, headers=headers, timeout=settings.token_timeout)
        profile = response.json() if response.status_code == 200 else None
    except (httpx.TransportError, ValueError) as exc:
        logger.warning("Fetching %s failed (%s); saving the account without an organization", url, type(exc).__name__)
        return
    if not isinstance(profile, dict):
        logger.warning(
            "Fetching %s returned status %d; saving the account without an organization", url, response.status_code
        )
        return
    organization = profile.get("organization")
    if isinstance(organization, dict) and isinstance(organization.get("uuid"), str):
        account.organization_uuid = organization["uuid"]
    details = profile.get("account")
    if isinstance(details, dict):
        email = details.get("email_address", details.get("email"))
        if account.account_email is None and isinstance(email, str):
            account.account_email = email
        if account.account_uuid is None and isinstance(details.get("uuid"), str):
            account.account_uuid = details["uuid"]


def log_login_completed(account: Account, path: Path) -> None:
    logger.info("Login completed for organization %s; saved %s", account.organization_uuid or "(unknown)", path)


class HideCallbackQuery(logging.Filter):
    """A logging filter that hides the query string of callback requests in uvicorn's access log.

    That query carries the authorization code, which must not reach the logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        arguments = record.args
        # uvicorn 0.55 passes (client, method, path with query, HTTP version, status). Records of
        # another shape pass unchanged.
        if isinstance(arguments, tuple) and len(arguments) == 5 and isinstance(arguments[2], str):
            path, question_mark, _ = arguments[2].partition("?")
            if question_mark and path in CALLBACK_PATHS:
                record.args = (*arguments[:2], path + "?(hidden)", *arguments[3:])
        return True


def render_login_page(title: str, message: str, status_code: int) -> HTMLResponse:
    page = (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>clove: {html.escape(title)}</title></head>\n"
        f"<body style=\"font-family: sans-serif; max-width: 40em; margin: 3em auto\">\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(message)}</p>\n</body></html>\n"
    )
    return HTMLResponse(page, status_code=status_code)


# --- Routes ---


class RequestTooLarge(CloveError):
    status_code = 413
    error_type = "request_too_large"


async def read_body(request: Request, limit: int) -> bytes:
    """Read the request body, raising RequestTooLarge as soon as it passes limit bytes."""
    declared = request.headers.get("content-length")
    # isdigit() alone accepts non-ASCII digits such as "²", which int() rejects.
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"Request body is {declared} bytes; the maximum is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"Request body is larger than the maximum of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def validate_messages_body(body: bytes) -> bool:
    """Check the fields clove relies on and return whether the request is for a stream.

    Everything else is left for the Anthropic API to judge.
    """
    document = load_json_object(body)
    if document is None:
        raise CloveError("Request body must be a JSON object.", status_code=400, error_type="invalid_request_error")
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid_field("model", "a non-empty string", model, "model" in document)
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid_field("messages", "a non-empty list", messages, "messages" in document)
    max_tokens = document.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise _invalid_field("max_tokens", "an integer", max_tokens, "max_tokens" in document)
    return document.get("stream") is True


def _invalid_field(name: str, expected: str, value: object, present: bool) -> CloveError:
    if not present:
        message = f"{name}: Field required (expected {expected})."
    elif value == []:
        message = f"{name}: expected {expected}, got an empty list."
    else:
        message = f"{name}: expected {expected}, got {type(value).__name__ if value is not None else 'null'}."
    return CloveError(message, status_code=400, error_type="invalid_request_error")


class Proxy:
    """The route handlers, with the state they share."""

    def __init__(self, settings: Settings, api_key: str, tokens: TokenManager, upstream: Upstream) -> None:
        self.settings = settings
        self.api_key = api_key.encode("utf-8")
        self.tokens = tokens
        self.upstream = upstream

    def check_api_key(self, request: Request) -> None:
        """Raise a 401 CloveError unless the request carries the proxy key."""
        supplied = request.headers.get("x-api-key")
        if supplied is None:
            authorization = request.headers.get("authorization", "")
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() == "bearer":
                supplied = credentials.strip()
        # Header values are latin-1 text, so any value encodes back to its original bytes.
        if supplied is None or not secrets.compare_digest(supplied.encode("latin-1"), self.api_key):
            raise CloveError(
                "Missing or invalid clove API key. Send it as x-api-key or Authorization: Bearer.",
                status_code=401,
                error_type="authentication_error",
            )

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", **self.tokens.describe()})

    async def messages(self, request: Request) -> Response:
        return await self._forward(request, validate=True)

    async def count_tokens(self, request: Request) -> Response:
        return await self._forward(request, validate=False)

    async def models(self, request: Request) -> Response:
        if request.url.path == "/v1/models":
            return await self._forward(request, validate=False, query=_models_query(request), convert=models_list_for_both)
        return await self._forward(request, validate=False, convert=model_for_both)

    async def _forward(
        self,
        request: Request,
        *,
        validate: bool,
        query: bytes | None = None,
        convert: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> Response:
        """Proxy the request unchanged; convert rewrites a successful JSON object reply."""
        started = time.perf_counter()
        self.check_api_key(request)

        body = b""
        if request.method == "POST":
            body = await read_body(request, self.settings.max_body_bytes)
        stream = validate_messages_body(body) if validate else False

        call = ProxyCall(
            method=request.method,
            path=encoded_path(request.scope),
            query=request.scope.get("query_string", b"") if query is None else query,
            headers=request.scope["headers"],
            body=body,
            stream=stream,
        )
        upstream_response, attempts = await self.upstream.open(call)
        log_completion = _request_logger(request, upstream_response, attempts, started)

        if stream:
            return StreamedUpstreamResponse(upstream_response, log_completion)  # type: ignore[return-value]
        log_completion("complete")
        content = upstream_response.content
        if convert is not None and upstream_response.status_code == 200:
            content = _convert_json_object(content, convert)
        response = Response(content, status_code=upstream_response.status_code)
        # Raw pairs keep repeated upstream headers, which a mapping would merge.
        response.raw_headers = response_headers_for_client(upstream_response)
        response.raw_headers.append((b"content-length", str(len(content)).encode("ascii")))
        return response

    async def chat_completions(self, request: Request) -> Response:
        """Serve an OpenAI chat completions request through the Messages API."""
        started = time.perf_counter()
        self.check_api_key(request)

        document = _decode_chat_request(await read_body(request, self.settings.max_body_bytes))
        messages_body = chat_request_to_messages(document, self.settings.default_max_tokens)
        include_usage = chat_stream_include_usage(document)
        stream = messages_body.get("stream") is True

        call = ProxyCall(
            method="POST",
            path="/v1/messages",
            query=b"",
            headers=chat_upstream_headers(request.scope["headers"]),
            body=json.dumps(messages_body, ensure_ascii=False).encode("utf-8"),
            stream=stream,
        )
        upstream_response, attempts = await self.upstream.open(call)
        log_completion = _request_logger(request, upstream_response, attempts, started)

        if upstream_response.status_code != 200:
            return await _chat_error_response(upstream_response, log_completion)
        if stream:
            translator = ChatStreamTranslator(messages_body["model"], include_usage)
            return ChatCompletionStream(upstream_response, log_completion, translator)  # type: ignore[return-value]
        log_completion("complete")
        return _chat_completion_response(upstream_response)


def _request_logger(
    request: Request, upstream_response: httpx.Response, attempts: int, started: float
) -> Callable[[str], None]:
    """Return a function that writes the one INFO line for this request, given how it ended."""

    def log_completion(outcome: str) -> None:
        logger.info(
            "%s %s -> %d, %d attempt%s, %.0f ms, request-id %s%s",
            request.method,
            request.url.path,
            upstream_response.status_code,
            attempts,
            "" if attempts == 1 else "s",
            (time.perf_counter() - started) * 1000,
            upstream_response.headers.get("request-id", "-"),
            "" if outcome == "complete" else ", " + outcome,
        )

    return log_completion


# OpenAI clients read the whole list from one response, but the Models API returns 20 models per
# page unless limit is given. 1000 is its maximum (the anthropic SDK 2.17 documents 1 to 1000).
MODELS_PAGE_LIMIT = 1000


def _models_query(request: Request) -> bytes:
    query: bytes = request.scope.get("query_string", b"")
    if "limit" in request.query_params:
        return query
    return query + (b"&" if query else b"") + b"limit=%d" % MODELS_PAGE_LIMIT


def _convert_json_object(content: bytes, convert: Callable[[dict[str, Any]], dict[str, Any]]) -> bytes:
    document = load_json_object(content)
    if document is None:
        logger.warning("Upstream returned a 200 reply that is not a JSON object; passing it on unchanged")
        return content
    return json.dumps(convert(document), ensure_ascii=False).encode("utf-8")


def encoded_path(scope: Scope) -> str:
    """Return the request path percent-encoded as the client sent it, ready for the upstream URL.

    Rebuilding it from the decoded scope["path"] (as request.url does) turns %00 into a character
    that httpx rejects, and %2F into a path separator.
    """
    # Besides letters, digits and "-._", RFC 3986 allows these characters in a path. Quoting
    # escapes every other byte.
    allowed = "/:@!$&'()*+,;=~"
    raw_path: bytes | None = scope.get("raw_path")
    if raw_path is None:
        # raw_path is optional in ASGI. Without it, the decoded path is encoded again.
        return urllib.parse.quote(scope["path"], safe=allowed)
    return urllib.parse.quote_from_bytes(raw_path, safe=allowed + "%")


# --- Routes: OpenAI chat completions ---

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"

# Client headers that describe the OpenAI request and not the Messages request clove builds from
# it: clove writes and encodes the JSON body itself, and openai-organization, openai-project and
# openai-beta name OpenAI accounts and features. Other headers pass as for /v1/messages, the
# x-stainless-* ones included, because they only describe the client SDK, as the anthropic SDK's do.
CHAT_CLIENT_HEADERS_NOT_FORWARDED = frozenset({"accept", "content-type", "content-encoding"})


def chat_upstream_headers(client_headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Return the client's headers that still apply to the Messages request, plus its content-type."""
    kept = []
    for raw_name, raw_value in client_headers:
        name = raw_name.decode("latin-1").lower()
        if name not in CHAT_CLIENT_HEADERS_NOT_FORWARDED and not name.startswith("openai-"):
            kept.append((raw_name, raw_value))
    kept.append((b"content-type", b"application/json"))
    return kept


def _decode_chat_request(body: bytes) -> dict[str, Any]:
    document = load_json_object(body)
    if document is None:
        raise ChatRequestError("Invalid request body: expected a JSON object.")
    return document


def _chat_response_headers(upstream: httpx.Response) -> dict[str, str]:
    """Return the upstream headers an OpenAI client can use: the request id and retry-after."""
    headers = {}
    request_id = upstream.headers.get("request-id")
    if request_id is not None:
        # The openai SDK reads x-request-id; request-id keeps the name the Anthropic API uses.
        headers["request-id"] = headers["x-request-id"] = request_id
    retry_after = upstream.headers.get("retry-after")
    if retry_after is not None:
        headers["retry-after"] = retry_after
    return headers


async def _chat_error_response(upstream: httpx.Response, log_completion: Callable[[str], None]) -> Response:
    try:
        body = await upstream.aread()
    except httpx.TransportError as exc:
        raise _transport_failure(describe_transport_error(exc)) from None
    finally:
        await upstream.aclose()
    log_completion("complete")
    error = openai_error_from_anthropic(upstream.status_code, body)
    return JSONResponse(error, status_code=upstream.status_code, headers=_chat_response_headers(upstream))


def _chat_completion_response(upstream: httpx.Response) -> Response:
    message = load_json_object(upstream.content)
    if message is None:
        raise CloveError("The Anthropic API returned a reply that is not a JSON object.", status_code=502)
    return JSONResponse(chat_completion_from_message(message), headers=_chat_response_headers(upstream))


class ChatCompletionStream(StreamedUpstreamResponse):
    """An ASGI response that relays an upstream Messages stream as OpenAI chat.completion.chunk events.

    Chunks go out as the upstream events arrive. The upstream status is 200 here, because the
    route returns other statuses as errors before it starts a stream. An upstream error event, a
    broken connection or a stream without message_stop ends the output with an OpenAI error
    event and no `data: [DONE]`.
    """

    def __init__(self, upstream: httpx.Response, on_close: Callable[[str], None], translator: ChatStreamTranslator) -> None:
        super().__init__(upstream, on_close)
        self.translator = translator

    def client_headers(self) -> list[tuple[bytes, bytes]]:
        headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        headers.update(_chat_response_headers(self.upstream))
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]

    def convert(self, chunk: bytes) -> bytes:
        return self.translator.feed(chunk)

    def finish(self) -> bytes:
        return self.translator.finish()

    def outcome(self) -> str:
        if self.translator.error is None:
            return "complete"
        return "stream ended with an error: " + self.translator.error

    def failure_event(self, message: str) -> bytes:
        return self.translator.fail(message)


# --- Routes: errors ---


def _uses_openai_errors(request: Request) -> bool:
    return request.url.path == CHAT_COMPLETIONS_PATH


def _error_response_for(
    request: Request,
    status_code: int,
    error_type: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    param: str | None = None,
) -> Response:
    """Build an error response in the shape of the route's API: OpenAI's for chat completions, else Anthropic's."""
    if not _uses_openai_errors(request):
        return error_response(status_code, error_type, message, headers)
    openai_type, code = openai_error_type(error_type, status_code)
    return JSONResponse(openai_error_body(message, openai_type, param, code), status_code=status_code, headers=headers)


# --- Routes: OAuth login ---


class LoginRoutes:
    """The OAuth login routes, with the pending logins they share."""

    def __init__(self, settings: Settings, proxy: Proxy, tokens: TokenManager, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.proxy = proxy
        self.tokens = tokens
        self.client = client
        self.logins = PendingLogins(settings)

    async def authorize(self, request: Request) -> Response:
        # The proxy key is required, so that no one else can bind their account to this clove.
        self.proxy.check_api_key(request)
        login = self.logins.start()
        logger.info("Login started; %d pending, redirect URI %s", len(self.logins), login.redirect_uri)
        return JSONResponse({"authorization_url": login.authorization_url})

    async def callback(self, request: Request) -> Response:
        # No proxy key here: the browser arrives from the OAuth server, and the state protects the route.
        wants_html = "text/html" in request.headers.get("accept", "")
        try:
            account = await self._complete(request.query_params)
        except LoginError as exc:
            level = logging.ERROR if exc.status_code >= 500 else logging.WARNING
            logger.log(level, "Login failed: %s", exc.message)
            if wants_html:
                return render_login_page("Login failed", exc.message, exc.status_code)
            return error_response(exc.status_code, exc.error_type, exc.message)

        message = "Account configured successfully"
        if wants_html:
            organization = account.organization_uuid or "(unknown)"
            details = f"clove now serves the Claude account of organization {organization}. You can close this page."
            return render_login_page(message, details, 200)
        return JSONResponse({"success": True, "message": message, "organization_uuid": account.organization_uuid})

    async def _complete(self, query: Mapping[str, str]) -> Account:
        state = query.get("state")
        if "error" in query and state:
            # The person declined or the server failed; this login cannot finish, so forget it.
            with contextlib.suppress(LoginError):
                self.logins.take(state)
        check_authorization_error(query)
        code, state = split_code_and_state(query.get("code", ""), state)
        login = self.logins.take(state)

        account = await exchange_code(self.settings, self.client, login, code)
        try:
            await self.tokens.replace_account(account)
        except OSError as exc:
            raise LoginError(
                f"Saving {self.tokens.store.path} failed ({exc.strerror}). {ACCOUNT_UNCHANGED} Fix the data "
                f"folder. {START_AGAIN}",
                status_code=500,
                error_type="api_error",
            ) from None
        log_login_completed(account, self.tokens.store.path)
        return account


async def handle_clove_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CloveError)
    if exc.status_code >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    else:
        logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.message)
    param = exc.param if isinstance(exc, ChatRequestError) else None
    return _error_response_for(request, exc.status_code, exc.error_type, exc.message, param=param)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    logger.info("%s %s -> %d", request.method, request.url.path, exc.status_code)
    if exc.status_code == 404:
        return _error_response_for(request, 404, "not_found_error", f"No route for {request.method} {request.url.path}.")
    if exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
        return _error_response_for(request, 405, "invalid_request_error", message, exc.headers)
    return _error_response_for(request, exc.status_code, "invalid_request_error", str(exc.detail), exc.headers)


async def handle_client_disconnect(request: Request, exc: Exception) -> Response:
    # The client went away while sending its body, so no one is left to read a response.
    return Response(status_code=400)


# --- Application ---


def create_app(settings: Settings | None = None, transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """Build the clove ASGI app; transport replaces the network in tests."""
    if settings is None:
        settings = _settings_for_factory()
    api_key, generated = load_or_create_api_key(settings)
    _print_generated_key(settings, api_key, generated)

    timeout = httpx.Timeout(connect=settings.connect_timeout, read=settings.read_timeout, write=60.0, pool=60.0)
    if transport is None:
        transport = UpstreamTransport()
    # Token and login requests go through this client; proxied requests use the transport directly.
    client = httpx.AsyncClient(transport=transport, timeout=timeout, follow_redirects=False)
    # httpx adds its own User-Agent, Accept and Connection headers; clove sends only the client's.
    client.headers.clear()

    store = AccountStore(settings.data_folder)
    tokens = TokenManager(settings, store, client)
    proxy = Proxy(settings, api_key, tokens, Upstream(settings, tokens, transport, timeout))
    login = LoginRoutes(settings, proxy, tokens, client)
    hide_callback_query = HideCallbackQuery()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        details = tokens.describe()
        logger.info(
            "clove started: data folder %s, account %s, upstream %s",
            settings.data_folder,
            details["account_status"],
            settings.claude_api_baseurl,
        )
        # uvicorn has configured its loggers by the time the lifespan starts.
        logging.getLogger("uvicorn.access").addFilter(hide_callback_query)
        try:
            yield
        finally:
            logging.getLogger("uvicorn.access").removeFilter(hide_callback_query)
            await client.aclose()
            logger.info("clove stopped")

    routes = [
        Route("/health", proxy.health, methods=["GET"]),
        Route("/v1/messages", proxy.messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", proxy.count_tokens, methods=["POST"]),
        Route(CHAT_COMPLETIONS_PATH, proxy.chat_completions, methods=["POST"]),
        Route("/v1/models", proxy.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", proxy.models, methods=["GET"]),
        Route("/oauth/authorize", login.authorize, methods=["GET"]),
        *(Route(path, login.callback, methods=["GET"]) for path in CALLBACK_PATHS),
    ]
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"])
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            CloveError: handle_clove_error,
            HTTPException: handle_http_exception,
            ClientDisconnect: handle_client_disconnect,
        },
    )
    app.state.tokens = tokens
    app.state.logins = login.logins
    app.state.settings = settings
    return app


def _print_generated_key(settings: Settings, api_key: str, generated: bool) -> None:
    # Printed to the terminal, never logged, and only when the key is new.
    if generated:
        path = settings.data_folder / "api_key"
        print(f"clove generated an API key and saved it to {path}:\n\n    {api_key}\n", flush=True)
        print("Clients send it as x-api-key (ANTHROPIC_API_KEY) or Authorization: Bearer.\n", flush=True)


def _settings_for_factory() -> Settings:
    # `uvicorn clove:create_app --factory` calls create_app() without settings or logging set up.
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"clove: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if not logger.handlers:
        configure_logging(settings.log_level)
    return settings


# --- Command line ---


def import_claude_code(settings: Settings, path: Path) -> Account:
    """Store the account from Claude Code's credentials file; expiresAt there is in milliseconds."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AccountFileError(f"{path} not found; log in with Claude Code first (`claude /login`)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AccountFileError(f"cannot read {path}: {exc}") from None
    oauth = document.get("claudeAiOauth") if isinstance(document, dict) else None
    if not isinstance(oauth, dict):
        raise AccountFileError(f"{path} has no claudeAiOauth object")
    access_token = oauth.get("accessToken")
    refresh_token = oauth.get("refreshToken")
    expires_at_ms = oauth.get("expiresAt")
    if not isinstance(access_token, str) or not access_token:
        raise AccountFileError(f"{path}: claudeAiOauth.accessToken is missing")
    if refresh_token is not None and not isinstance(refresh_token, str):
        raise AccountFileError(f"{path}: claudeAiOauth.refreshToken must be a string")
    if expires_at_ms is not None and (not isinstance(expires_at_ms, (int, float)) or isinstance(expires_at_ms, bool)):
        raise AccountFileError(f"{path}: claudeAiOauth.expiresAt must be a number of milliseconds")
    now = int(time.time())
    account = Account(
        organization_uuid=None,
        access_token=access_token,
        refresh_token=refresh_token or None,
        expires_at=None if expires_at_ms is None else int(expires_at_ms // 1000),
        status="valid",
        created_at=now,
        updated_at=now,
    )
    _save_imported(settings, account)
    return account


def import_token(settings: Settings, token: str) -> Account:
    """Store a long-lived access token (from `claude setup-token`) that clove never refreshes."""
    token = token.strip()
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise AccountFileError("the token must be one line of printable ASCII without spaces")
    now = int(time.time())
    account = Account(
        organization_uuid=None,
        access_token=token,
        refresh_token=None,
        expires_at=None,
        status="valid",
        created_at=now,
        updated_at=now,
    )
    _save_imported(settings, account)
    return account


def login_command(
    settings: Settings,
    read_line: Callable[[], str],
    stdout: TextIO,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Account:
    """Print the authorization URL, read the pasted `CODE#STATE` or callback URL, and save the account.

    Raises LoginError when the pasted text or the exchange fails, and then the stored account is unchanged.
    """
    logins = PendingLogins(settings)
    login = logins.start()
    print("Open this URL in a browser on any device and sign in to Claude:\n", file=stdout)
    print(f"    {login.authorization_url}\n", file=stdout)
    print("Then paste the code the page shows (CODE#STATE), or the whole URL you were sent to,", file=stdout)
    print("and press Enter:", file=stdout)
    stdout.flush()

    code, state = parse_pasted_code(read_line())
    if not secrets.compare_digest(state.encode("utf-8"), login.state.encode("utf-8")):
        raise LoginError(
            "The pasted state does not belong to the URL printed above. Paste the code for that URL, or run "
            "`python clove.py login` again."
        )
    login = logins.take(state)

    account = anyio.run(_exchange_with_new_client, settings, login, code, transport)
    _save_imported(settings, account)
    log_login_completed(account, settings.data_folder / "account.json")
    return account


async def _exchange_with_new_client(
    settings: Settings, login: PendingLogin, code: str, transport: httpx.AsyncBaseTransport | None
) -> Account:
    async with httpx.AsyncClient(transport=transport, follow_redirects=False) as client:
        return await exchange_code(settings, client, login, code)


def _save_imported(settings: Settings, account: Account) -> None:
    store = AccountStore(settings.data_folder)
    # Waits for a refresh in a running clove, which would otherwise save over the new account.
    with data_folder_lock(settings.data_folder):
        backup = store.set_aside_unreadable()
        if backup is not None:
            print(f"Moved the unreadable account file to {backup}", file=sys.stderr)
        store.save(account)


USAGE = """usage: python clove.py [serve]
       python clove.py login                       (log in through a browser on any device, paste the code)
       python clove.py import-claude-code [PATH]   (default PATH: ~/.claude/.credentials.json)
       python clove.py import-token [TOKEN|-]      (reads the token from standard input when - or omitted)"""


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    command = arguments[0] if arguments else "serve"
    if command in ("-h", "--help", "help"):
        print(USAGE)
        return EXIT_OK
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"clove: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level)

    if command == "serve" and len(arguments) <= 1:
        serve(settings)
        return EXIT_OK
    try:
        if command == "import-claude-code" and len(arguments) <= 2:
            path = Path(arguments[1] if len(arguments) == 2 else "~/.claude/.credentials.json").expanduser()
            account = import_claude_code(settings, path)
            print(f"Imported the Claude Code account into {settings.data_folder / 'account.json'}; {_describe_expiry(account)}")
            return EXIT_OK
        if command == "login" and len(arguments) == 1:
            account = login_command(settings, sys.stdin.readline, sys.stdout)
            print(f"Account configured successfully for organization {account.organization_uuid or '(unknown)'}.")
            print(f"Saved to {settings.data_folder / 'account.json'}; {_describe_expiry(account)}.")
            print("A running clove serves it from its next request; there is no need to restart it.")
            return EXIT_OK
        if command == "import-token" and len(arguments) <= 2:
            token = arguments[1] if len(arguments) == 2 and arguments[1] != "-" else _read_token_from_stdin()
            import_token(settings, token)
            print(f"Imported the token into {settings.data_folder / 'account.json'}; {LONG_LIVED_TOKEN_NOTE}")
            return EXIT_OK
    except (AccountFileError, OSError) as exc:
        print(f"clove: {command} failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except LoginError as exc:
        print(f"clove: login failed: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    print(USAGE, file=sys.stderr)
    return EXIT_USAGE


def serve(settings: Settings) -> None:
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "timeout_graceful_shutdown": settings.shutdown_grace_seconds,
        # clove logs one line per request itself, with what uvicorn's access log cannot know.
        "access_log": False,
    }
    logger.info("clove starting on http://%s:%d with %d worker(s)", settings.host, settings.port, settings.workers)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler that
    # was installed before it started. This no-op handler makes that a normal exit with status 0.
    signal.signal(signal.SIGTERM, lambda number, frame: None)
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    # Each worker imports clove by name and builds its own app from the same settings. The key is
    # created here first, so that it is printed once and not by every worker.
    _print_generated_key(settings, *load_or_create_api_key(settings))
    app_folder = str(Path(__file__).resolve().parent)
    uvicorn.run("clove:create_app", factory=True, workers=settings.workers, app_dir=app_folder, **options)


def _read_token_from_stdin() -> str:
    if sys.stdin.isatty():
        # Read without echo, so the token does not stay on the screen.
        return getpass.getpass("Paste the token and press Enter: ")
    return sys.stdin.readline()


def _describe_expiry(account: Account) -> str:
    if account.expires_at is None:
        return LONG_LIVED_TOKEN_NOTE
    moment = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(account.expires_at))
    if account.has_expired(time.time()):
        refresh = "clove refreshes it on the next request" if account.refreshable else "it has no refresh token"
        return f"the access token expired at {moment}, and {refresh}"
    refresh = "clove refreshes it before then" if account.refreshable else "it has no refresh token"
    return f"the access token expires at {moment}, and {refresh}"


if __name__ == "__main__":
    sys.exit(main())
