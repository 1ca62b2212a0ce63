"""Benchmark clove against a direct connection and a minimal Starlette + httpx passthrough.

One run starts a fake Anthropic upstream on 127.0.0.1 and measures three targets side by side:

- DIRECT: the load generator talks to the fake upstream itself, which gives the floor.
- PASSTHROUGH: the ~40-line Starlette + httpx proxy in this file, run as a uvicorn process.
- CLOVE: clove.py as a real process, given a long-lived token with `import-token`.

The proxies are restarted for every round and measured in interleaved order (DIRECT,
PASSTHROUGH, CLOVE, DIRECT, ...). The report shows medians over the rounds, CLOVE as a ratio
to PASSTHROUGH, and each proxy's added latency over DIRECT. On a machine with two or more
cores, the proxy under test runs on the first core, and the load generator and fake upstream
share the second.

Usage:
    python bench_clove.py --quick
    python bench_clove.py --soak
    python bench_clove.py --output bench.md --json bench.json
    python bench_clove.py --clove /path/to/clove.py --rounds 7

Metrics, all taken on the load generator's side unless noted:

- Latency: time from writing a non-streaming request to reading the whole response.
- Stream time to first byte: time from writing a streaming request to reading the response headers.
- Event forwarding delay: arrival time of each SSE event minus the `sent_at_ns` stamp that the
  fake upstream put into the event's JSON right before writing it.
- Throughput: completed requests per second with 64 connections, each sending the next request
  as soon as the previous response arrived.
- Proxy CPU: utime plus stime from /proc/PID/stat over the throughput run, per 1,000 requests.
- Memory: VmRSS from /proc/PID/status after start, with the held streams open, and VmHWM at the
  end of the round. Held streams are streaming requests that the fake upstream keeps open.
- Startup: time from starting the process to the first 200 from GET /health, polled every 10 ms.

With --soak, the script runs a soak test of clove instead: it keeps 500 streams open through clove
for 60 s, then sends a burst of 5,000 non-streaming requests. It exits 1 unless every request
succeeded, every stream received all its events, clove logged no errors, clove's open file
count returned to its baseline and its RSS grew by at most 20%. The --soak-streams,
--soak-seconds and --soak-burst options change the three sizes.

The script runs its own fake upstream and passthrough by invoking itself with the internal
subcommands `upstream` and `passthrough`.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

HOST = "127.0.0.1"
API_KEY = "bench-client-key"
UPSTREAM_TOKEN = "sk-ant-oat01-bench-long-lived-token"
MODEL = "claude-sonnet-4-20250514"
ANTHROPIC_VERSION = "2023-06-01"
# A streaming request whose metadata.user_id is this value makes the fake upstream hold the
# stream open after its first events. The field is part of the Messages API, so a proxy that
# forwards the body unchanged also forwards the marker.
HOLD_USER_ID = "bench-hold-stream"
HOLD_PING_INTERVAL_S = 2.0
# A POST to this path on the fake upstream ends the hold of the streams held at that moment.
RELEASE_HELD_PATH = "/bench/release-held-streams"
REQUEST_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
OTHER_LOAD_WARNING_PCT = 5.0
HTTPX_KEEPALIVE_EXPIRY_S = 5.0  # Default keepalive_expiry of httpx.Limits in httpx 0.29.0.
SAMPLE = TypeVar("SAMPLE")


# --------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class Plan:
    """Request counts and durations of one benchmark run. Every loop stops at its count or its time limit."""

    rounds: int
    warm_up_requests_c1: int
    warm_up_s: float
    latency_requests_c1: int
    latency_requests_c32: int
    rps_seconds: float
    streams_c1: int
    streams_c32: int
    stream_deltas: int
    stream_gap_ms: int
    held_streams: int
    idle_settle_s: float
    phase_timeout_s: float
    prompt_bytes: int


QUICK_PLAN = Plan(
    rounds=3,
    warm_up_requests_c1=100,
    warm_up_s=1.0,
    latency_requests_c1=200,
    latency_requests_c32=800,
    rps_seconds=2.0,
    streams_c1=5,
    streams_c32=32,
    stream_deltas=10,
    stream_gap_ms=20,
    held_streams=500,
    idle_settle_s=0.3,
    phase_timeout_s=30.0,
    prompt_bytes=2048,
)

FULL_PLAN = Plan(
    rounds=5,
    warm_up_requests_c1=300,
    warm_up_s=6.0,
    latency_requests_c1=1000,
    latency_requests_c32=3000,
    rps_seconds=10.0,
    streams_c1=20,
    streams_c32=128,
    stream_deltas=20,
    stream_gap_ms=20,
    held_streams=500,
    idle_settle_s=1.0,
    phase_timeout_s=120.0,
    prompt_bytes=2048,
)


# --------------------------------------------------------------------------------------
# HTTP/1.1 on asyncio streams, shared by the fake upstream and the load generator.
# Both sides avoid an HTTP library so that they cost far less CPU per request than the
# proxies under test.


class HttpError(Exception):
    """Malformed HTTP message or unexpected response."""


@dataclass
class Message:
    """Parsed HTTP request or response head with its body."""

    start_line: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def status(self) -> int:
        return int(self.start_line.split(" ", 2)[1])


def parse_head(head: bytes) -> Message:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, separator, value = line.partition(":")
        if not separator:
            raise HttpError(f"invalid header line: {line!r}")
        headers[name.strip().lower()] = value.strip()
    return Message(lines[0], headers)


async def read_head(reader: asyncio.StreamReader) -> Message | None:
    """Read a message head, or return None when the peer closed the connection between messages."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise
        return None
    return parse_head(head)


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    """Read one chunk of a chunked body. Returns b"" for the last chunk, after its trailer."""
    size_line = await reader.readuntil(b"\r\n")
    size = int(size_line.split(b";", 1)[0], 16)
    if size == 0:
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass
        return b""
    chunk = await reader.readexactly(size + 2)
    return chunk[:-2]


async def read_body(reader: asyncio.StreamReader, message: Message) -> bytes:
    """Read a body framed by chunked encoding, Content-Length or, for a response, the end of the connection."""
    if message.headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while chunk := await read_chunk(reader):
            chunks.append(chunk)
        return b"".join(chunks)
    length = message.headers.get("content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    if message.start_line.startswith("HTTP/"):
        return await reader.read()
    return b""


def encode_response(status: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --------------------------------------------------------------------------------------
# Fake upstream: `bench_clove.py upstream`


TEXT_DELTAS = [
    "Here", " is", " a", " short", " answer", " from", " the", " fake", " upstream", ",",
    " sent", " in", " small", " pieces", " like", " a", " real", " model", " stream", ".",
]

ANSWER_TEXT = (
    "The request reached the fake upstream of the clove benchmark. This text stands in for a "
    "model answer of typical length, so that the proxies copy a realistic number of bytes for "
    "every non-streaming response. " * 3
).strip()


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def message_id(number: int) -> str:
    return f"msg_01bench{number:018d}"


def message_body(number: int) -> bytes:
    message = {
        "id": message_id(number),
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": ANSWER_TEXT}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage(512, 96),
    }
    return json.dumps(message, separators=(",", ":")).encode()


def error_body(error_type: str, text: str) -> bytes:
    error = {"type": "error", "error": {"type": error_type, "message": text}}
    return json.dumps(error, separators=(",", ":")).encode()


def encode_event(name: str, data: dict[str, Any], sequence: Iterator[int] | None = None) -> bytes:
    """Encode one SSE event as an HTTP chunk, stamped with the wall-clock time of sending in ns.

    With a sequence, the event also carries its number within the stream, starting at 0, so
    that a client can detect a lost, repeated or reordered event.
    """
    data["sent_at_ns"] = time.time_ns()
    if sequence is not None:
        data["sequence"] = next(sequence)
    text = json.dumps(data, separators=(",", ":"))
    return encode_chunk(f"event: {name}\ndata: {text}\n\n".encode())


class FakeUpstream:
    """Anthropic Messages API stand-in that replies at once and streams with fixed gaps."""

    def __init__(self, token: str, deltas: int, gap_s: float, hold_max_s: float) -> None:
        self.authorization = f"Bearer {token}"
        self.deltas = deltas
        self.gap_s = gap_s
        self.hold_max_s = hold_max_s
        self.numbers = itertools.count(1)
        # Set and replaced by POST RELEASE_HELD_PATH, so that the streams held at that moment go
        # on to their deltas, and streams that start later are held again.
        self.release = asyncio.Event()
        self.held_streams = 0

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await read_head(reader)) is not None:
                request.body = await read_body(reader, request)
                if not await self.respond(request, reader, writer):
                    break
        # A proxy closing its pooled connections or a held stream is normal here.
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError, ValueError):
            pass
        finally:
            writer.close()

    async def respond(self, request: Message, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Send the response and return whether the connection stays usable."""
        method, path, _ = request.start_line.split(" ", 2)
        if method == "GET" and path == "/health":
            writer.write(encode_response("200 OK", {"content-type": "application/json"}, b'{"status":"ok"}'))
            return True
        if method == "POST" and path == RELEASE_HELD_PATH:
            body = json.dumps({"released": self.held_streams}).encode()
            self.release.set()
            self.release = asyncio.Event()
            writer.write(encode_response("200 OK", {"content-type": "application/json"}, body))
            return True
        if method != "POST" or path != "/v1/messages":
            self.send_error(writer, "404 Not Found", "not_found_error", f"{method} {path} not found")
            return True
        if request.headers.get("authorization") != self.authorization:
            self.send_error(writer, "401 Unauthorized", "authentication_error", "invalid bearer token")
            return True
        try:
            payload = json.loads(request.body)
        except ValueError:
            self.send_error(writer, "400 Bad Request", "invalid_request_error", "body is not valid JSON")
            return True

        number = next(self.numbers)
        if not payload.get("stream"):
            headers = {"content-type": "application/json", "request-id": f"req_bench{number}"}
            writer.write(encode_response("200 OK", headers, message_body(number)))
            await writer.drain()
            return True
        hold = (payload.get("metadata") or {}).get("user_id") == HOLD_USER_ID
        return await self.stream_message(number, hold, reader, writer)

    def send_error(self, writer: asyncio.StreamWriter, status: str, error_type: str, text: str) -> None:
        headers = {"content-type": "application/json"}
        writer.write(encode_response(status, headers, error_body(error_type, text)))

    async def stream_message(
        self, number: int, hold: bool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        head = (
            "HTTP/1.1 200 OK\r\n"
            "content-type: text/event-stream; charset=utf-8\r\n"
            "cache-control: no-cache\r\n"
            f"request-id: req_bench{number}\r\n"
            "transfer-encoding: chunked\r\n\r\n"
        )
        writer.write(head.encode())
        # Only held streams number their events, so the benchmark's timed streams keep their size.
        sequence = itertools.count() if hold else None
        start = {"id": message_id(number), "type": "message", "role": "assistant", "model": MODEL, "content": [],
                 "stop_reason": None, "stop_sequence": None, "usage": usage(512, 1)}
        writer.write(encode_event("message_start", {"type": "message_start", "message": start}, sequence))
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        writer.write(encode_event("content_block_start", block, sequence))
        writer.write(encode_event("ping", {"type": "ping"}, sequence))
        await writer.drain()
        if hold and not await self.hold_stream(reader, writer, sequence):
            return False

        for index in range(self.deltas):
            await asyncio.sleep(self.gap_s)
            delta = {"type": "text_delta", "text": TEXT_DELTAS[index % len(TEXT_DELTAS)]}
            data = {"type": "content_block_delta", "index": 0, "delta": delta}
            writer.write(encode_event("content_block_delta", data, sequence))
            await writer.drain()

        writer.write(encode_event("content_block_stop", {"type": "content_block_stop", "index": 0}, sequence))
        stop = {"stop_reason": "end_turn", "stop_sequence": None}
        writer.write(encode_event("message_delta", {"type": "message_delta", "delta": stop,
                                                    "usage": {"output_tokens": self.deltas}}, sequence))
        writer.write(encode_event("message_stop", {"type": "message_stop"}, sequence))
        writer.write(encode_chunk(b""))
        await writer.drain()
        return True

    async def hold_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          sequence: Iterator[int] | None) -> bool:
        """Send pings until the peer closes the connection, a release request arrives or hold_max_s passes.

        Returns True when the stream should go on to its deltas. The pings keep proxies with
        a read timeout from closing the stream.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold_max_s
        peer_read = asyncio.ensure_future(reader.read(1))
        released = asyncio.ensure_future(self.release.wait())
        self.held_streams += 1
        try:
            while (remaining := deadline - loop.time()) > 0:
                await asyncio.wait((peer_read, released), timeout=min(HOLD_PING_INTERVAL_S, remaining),
                                   return_when=asyncio.FIRST_COMPLETED)
                # EOF means the proxy closed the stream. Bytes would be a pipelined request, which
                # no proxy sends while a response is open, so the connection is closed either way.
                if peer_read.done():
                    return False
                if released.done():
                    return True
                writer.write(encode_event("ping", {"type": "ping"}, sequence))
                await writer.drain()
            return True
        finally:
            self.held_streams -= 1
            released.cancel()
            peer_read.cancel()
            if peer_read.done() and not peer_read.cancelled():
                peer_read.exception()  # Marks a connection reset as handled, so asyncio does not log it.


def run_upstream(options: argparse.Namespace) -> int:
    upstream = FakeUpstream(options.token, options.deltas, options.gap_ms / 1000, options.hold_max_s)

    async def serve() -> None:
        server = await asyncio.start_server(upstream.serve_connection, HOST, options.port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())
    return 0


# --------------------------------------------------------------------------------------
# Minimal passthrough: `bench_clove.py passthrough`


HOP_BY_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                      "proxy-authenticate", "proxy-authorization"}


def build_passthrough_app(upstream_url: str, api_key: str, token: str) -> Any:
    """Build the baseline proxy: key check, one long-lived AsyncClient, raw bytes relayed as they arrive.

    Every response, non-streaming ones too, goes out through StreamingResponse with chunked encoding.
    """
    from contextlib import asynccontextmanager

    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    # No connection cap, because the held-streams phase keeps 500 upstream streams open.
    # 100 keep-alive connections is what clove's own client uses, so pool costs match.
    # The long read timeout lets held streams live between the upstream's pings.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    timeout = httpx.Timeout(600.0, connect=10.0)

    @asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        async with httpx.AsyncClient(base_url=upstream_url, limits=limits, timeout=timeout) as client:
            app.state.client = client
            yield

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def messages(request: Request) -> Response:
        if request.headers.get("x-api-key") != api_key:
            return JSONResponse({"type": "error", "error": {"type": "authentication_error",
                                                            "message": "invalid x-api-key"}}, status_code=401)
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json",
                   "anthropic-version": request.headers.get("anthropic-version", ANTHROPIC_VERSION)}
        client: httpx.AsyncClient = request.app.state.client
        upstream_request = client.build_request("POST", "/v1/messages", content=await request.body(), headers=headers)
        upstream = await client.send(upstream_request, stream=True)
        response_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP_HEADERS}
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                                 headers=response_headers, background=BackgroundTask(upstream.aclose))

    routes = [Route("/health", health), Route("/v1/messages", messages, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


def run_passthrough(options: argparse.Namespace) -> int:
    import uvicorn

    app = build_passthrough_app(options.upstream, options.api_key, options.token)
    uvicorn.run(app, host=HOST, port=options.port, log_level="warning", access_log=False)
    return 0


def set_parent_death_signal() -> None:
    """Ask Linux to send SIGTERM to this process when its parent dies, even by SIGKILL.

    Runs in the child between fork and exec, and the setting survives exec. It is safe there
    because the benchmark process starts no threads.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 is PR_SET_PDEATHSIG.


# --------------------------------------------------------------------------------------
# Load generator


class Connection:
    """Keep-alive HTTP/1.1 client connection that sends prebuilt requests."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.close()
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def send(self, request: bytes) -> tuple[asyncio.StreamReader, Message]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        response = await read_head(self.reader)
        if response is None:
            raise HttpError("connection closed before the response")
        return self.reader, response

    def finish(self, response: Message) -> None:
        if response.headers.get("connection", "").lower() == "close":
            self.close()


def build_request(port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"host: {HOST}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def request_body(prompt_bytes: int, stream: bool, user_id: str = "bench-user") -> bytes:
    prompt = ("Summarize the benchmark request. " * (prompt_bytes // 33 + 1))[:prompt_bytes]
    payload: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 1024,
        "system": "You are a concise assistant.",
        "messages": [{"role": "user", "content": prompt}],
        "metadata": {"user_id": user_id},
    }
    if stream:
        payload["stream"] = True
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass
class Requests:
    """Prebuilt non-streaming, streaming and held-stream requests for one target."""

    message: bytes
    stream: bytes
    hold: bytes


def build_requests(target: str, port: int, prompt_bytes: int) -> Requests:
    headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
    if target == "direct":
        headers["authorization"] = f"Bearer {UPSTREAM_TOKEN}"
    else:
        headers["x-api-key"] = API_KEY

    def build(body: bytes) -> bytes:
        return build_request(port, "/v1/messages", headers, body)

    return Requests(
        message=build(request_body(prompt_bytes, stream=False)),
        stream=build(request_body(prompt_bytes, stream=True)),
        hold=build(request_body(prompt_bytes, stream=True, user_id=HOLD_USER_ID)),
    )


@dataclass
class Budget:
    """Shared request count and deadline for the workers of one phase."""

    remaining: int
    deadline: float

    def take(self) -> bool:
        if self.remaining <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.remaining -= 1
        return True


@dataclass
class PhaseResult:
    samples: list[Any] = field(default_factory=list)
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def record_error(self, error: BaseException) -> None:
        self.errors += 1
        if len(self.error_examples) < 3:
            self.error_examples.append(f"{type(error).__name__}: {error}"[:300])


async def run_workers(
    port: int,
    concurrency: int,
    budget: Budget,
    exchange: Callable[[Connection], Awaitable[SAMPLE]],
    stagger_s: float = 0.0,
) -> PhaseResult:
    """Run `concurrency` keep-alive connections that call `exchange` until the budget runs out.

    With stagger_s, worker i waits i * stagger_s / concurrency seconds before its first request.
    """
    result = PhaseResult()
    connections = [Connection(port) for _ in range(concurrency)]
    await asyncio.gather(*(connection.open() for connection in connections), return_exceptions=True)

    async def work(index: int, connection: Connection) -> None:
        await asyncio.sleep(index * stagger_s / concurrency)
        while budget.take():
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    result.samples.append(await exchange(connection))
            except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError,
                    TimeoutError, ValueError) as error:
                result.record_error(error)
                connection.close()
                await asyncio.sleep(0.01)

    start = time.perf_counter()
    try:
        await asyncio.gather(*(work(index, connection) for index, connection in enumerate(connections)))
    finally:
        result.elapsed_s = time.perf_counter() - start
        for connection in connections:
            connection.close()
    return result


async def exchange_message(connection: Connection, request: bytes) -> int:
    """Send one non-streaming request and return its latency in ns."""
    start = time.perf_counter_ns()
    reader, response = await connection.send(request)
    body = await read_body(reader, response)
    elapsed = time.perf_counter_ns() - start
    connection.finish(response)
    if response.status != 200 or b'"type":"message"' not in body:
        raise HttpError(f"status {response.status}: {body[:200]!r}")
    return elapsed


@dataclass
class StreamSample:
    ttfb_ns: int
    first_event_ns: int
    delays_ns: list[int]


SENT_AT = re.compile(rb'"sent_at_ns":(\d+)')


async def exchange_stream(connection: Connection, request: bytes, expected_events: int) -> StreamSample:
    """Send one streaming request and time its headers and each SSE event.

    An event's delay is its arrival time on this side minus the upstream's `sent_at_ns`
    stamp. Both are CLOCK_REALTIME readings on the same machine.
    """
    start = time.perf_counter_ns()
    reader, response = await connection.send(request)
    ttfb = time.perf_counter_ns() - start
    if response.status != 200:
        raise HttpError(f"status {response.status}: {(await read_body(reader, response))[:200]!r}")
    if response.headers.get("transfer-encoding", "").lower() != "chunked":
        raise HttpError(f"streaming response is not chunked: {response.headers}")

    delays: list[int] = []
    first_event = 0
    buffer = b""
    while chunk := await read_chunk(reader):
        arrival = time.time_ns()
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            match = SENT_AT.search(event)
            if match is None:
                raise HttpError(f"event without sent_at_ns: {event[:200]!r}")
            delays.append(arrival - int(match.group(1)))
            if not first_event:
                first_event = time.perf_counter_ns() - start
    connection.finish(response)
    if len(delays) != expected_events:
        raise HttpError(f"expected {expected_events} events, received {len(delays)}")
    return StreamSample(ttfb, first_event, delays)


async def open_held_stream(port: int, request: bytes) -> Connection:
    """Open a stream that the upstream holds, and return once its message_start arrived."""
    connection = Connection(port)
    try:
        reader, response = await connection.send(request)
        if response.status != 200:
            raise HttpError(f"status {response.status}")
        chunk = b""
        while b"message_start" not in chunk:
            chunk += await read_chunk(reader)
    except BaseException:
        connection.close()
        raise
    return connection


# --------------------------------------------------------------------------------------
# Child processes and /proc readings


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def read_status_kib(pid: int, name: str) -> int:
    """Read a kB field such as VmRSS or VmHWM from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise KeyError(f"{name} not found in /proc/{pid}/status")


def read_cpu_seconds(pid: int) -> float:
    """Read user plus system CPU time of all threads of a process from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name, field 0 is the state, so utime and stime are fields 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def read_core_busy_seconds(cpu: int) -> float:
    """Read the non-idle time of one CPU from /proc/stat, counted for all processes."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS
    raise KeyError(f"cpu{cpu} not found in /proc/stat")


def pin_process(pid: int, cpu: int | None) -> None:
    """Pin every current thread of a process to one CPU. Threads started later inherit the mask."""
    if cpu is None:
        return
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), {cpu})
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ChildExited(Exception):
    """A child process exited while the benchmark needed it."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started_at: float

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Children:
    """Child processes that this run started. Each is stopped by its own PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[Child] = []

    def start(self, name: str, argv: list[str], port: int, cpu: int | None, env: dict[str, str]) -> Child:
        log_path = self.log_dir / f"{name}-{len(self.running)}-{port}.log"
        with log_path.open("wb") as log:
            started_at = time.perf_counter()
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=env, start_new_session=True, preexec_fn=set_parent_death_signal)
        child = Child(name, process, port, log_path, started_at)
        self.running.append(child)
        # Popen returns right after exec, normally before the child starts a thread. Threads
        # inherit the mask, and callers pin again once the child responds.
        pin_process(child.pid, cpu)
        return child

    async def stop(self, child: Child) -> None:
        if child.process.poll() is None:
            child.process.terminate()
        deadline = time.perf_counter() + STOP_TIMEOUT_S
        while child.process.poll() is None and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        self.kill(child)

    def kill(self, child: Child) -> None:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait(timeout=STOP_TIMEOUT_S)
        if child in self.running:
            self.running.remove(child)

    def stop_all(self) -> None:
        for child in list(self.running):
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.perf_counter() + STOP_TIMEOUT_S
        for child in list(self.running):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                pass
            self.kill(child)


async def check_health(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        return False
    try:
        writer.write(f"GET /health HTTP/1.1\r\nhost: {HOST}:{port}\r\n\r\n".encode())
        async with asyncio.timeout(5.0):
            response = await read_head(reader)
            if response is None:
                return False
            await read_body(reader, response)
        return response.status == 200
    except (OSError, asyncio.IncompleteReadError, HttpError, TimeoutError, ValueError):
        return False
    finally:
        writer.close()


async def wait_for_health(child: Child) -> float:
    """Poll /health every 10 ms and return the seconds from process start to the first 200."""
    deadline = child.started_at + HEALTH_TIMEOUT_S
    while time.perf_counter() < deadline:
        if child.process.poll() is not None:
            raise ChildExited(f"{child.name} exited with code {child.process.returncode}:\n{child.log_tail()}")
        if await check_health(child.port):
            return time.perf_counter() - child.started_at
        await asyncio.sleep(0.01)
    raise ChildExited(f"{child.name} did not respond to GET /health within {HEALTH_TIMEOUT_S:.0f} s:\n{child.log_tail()}")


# --------------------------------------------------------------------------------------
# Measurements


def percentile(values: list[float], percent: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = math.ceil(len(ordered) * percent / 100)
    return ordered[max(0, min(len(ordered), rank) - 1)]


@dataclass
class Setup:
    plan: Plan
    proxy_cpu: int | None
    load_cpu: int | None
    upstream: Child
    python: str
    script: Path
    clove: Path | None
    clove_env: dict[str, str]
    child_env: dict[str, str]


class RoundMeasurement:
    """Metrics of one target in one round, with errors and failure text."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.metrics: dict[str, float] = {}
        self.errors = 0
        self.error_examples: list[str] = []
        self.failure: str | None = None

    def add_phase(self, result: PhaseResult) -> None:
        self.errors += result.errors
        self.error_examples += result.error_examples[: max(0, 5 - len(self.error_examples))]

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "metrics": self.metrics, "errors": self.errors,
                "error_examples": self.error_examples, "failure": self.failure}


async def measure_latency(port: int, request: bytes, concurrency: int, count: int, plan: Plan,
                          round_: RoundMeasurement) -> None:
    budget = Budget(count, time.perf_counter() + plan.phase_timeout_s)
    result = await run_workers(port, concurrency, budget, lambda c: exchange_message(c, request))
    round_.add_phase(result)
    latencies_ms = [ns / 1e6 for ns in result.samples]
    if latencies_ms:
        round_.metrics[f"latency_c{concurrency}_p50_ms"] = percentile(latencies_ms, 50)
        round_.metrics[f"latency_c{concurrency}_p99_ms"] = percentile(latencies_ms, 99)


async def measure_throughput(setup: Setup, port: int, requests: Requests, proxy_pid: int | None,
                             round_: RoundMeasurement) -> None:
    """Measure requests per second at concurrency 64, plus the CPU time the proxy and the load side used."""
    budget = Budget(10_000_000, time.perf_counter() + setup.plan.rps_seconds)
    proxy_cpu_before = read_cpu_seconds(proxy_pid) if proxy_pid else 0.0
    pinned = setup.proxy_cpu is not None and setup.load_cpu is not None
    proxy_core_before = read_core_busy_seconds(setup.proxy_cpu) if pinned else 0.0
    load_core_before = read_core_busy_seconds(setup.load_cpu) if pinned else 0.0
    upstream_cpu_before = read_cpu_seconds(setup.upstream.pid)
    load_cpu_before = time.process_time()

    result = await run_workers(port, 64, budget, lambda c: exchange_message(c, requests.message))

    load_cpu = time.process_time() - load_cpu_before + read_cpu_seconds(setup.upstream.pid) - upstream_cpu_before
    proxy_cpu = read_cpu_seconds(proxy_pid) - proxy_cpu_before if proxy_pid else 0.0
    round_.add_phase(result)
    completed = len(result.samples)
    round_.metrics["rps_c64"] = completed / result.elapsed_s
    round_.metrics["load_side_busy_pct"] = 100 * load_cpu / result.elapsed_s
    if proxy_pid and completed:
        round_.metrics["cpu_s_per_1000"] = proxy_cpu / completed * 1000
    if pinned and proxy_pid:
        # Other processes on either core slow the run down without showing in the CPU time
        # of the processes measured. Without a proxy, the idle proxy core attracts them harmlessly.
        proxy_core_other = read_core_busy_seconds(setup.proxy_cpu) - proxy_core_before - proxy_cpu
        load_core_other = read_core_busy_seconds(setup.load_cpu) - load_core_before - load_cpu
        round_.metrics["proxy_core_other_pct"] = max(0.0, 100 * proxy_core_other / result.elapsed_s)
        round_.metrics["load_core_other_pct"] = max(0.0, 100 * load_core_other / result.elapsed_s)


async def measure_streaming(port: int, request: bytes, concurrency: int, count: int, plan: Plan,
                            round_: RoundMeasurement) -> None:
    # message_start, content_block_start and ping, the deltas, then content_block_stop,
    # message_delta and message_stop.
    expected_events = plan.stream_deltas + 6
    budget = Budget(count, time.perf_counter() + plan.phase_timeout_s)
    # Staggered starts spread the streams over one gap, as independent clients would be.
    # Without them, all streams send each delta in the same millisecond.
    result = await run_workers(port, concurrency, budget, lambda c: exchange_stream(c, request, expected_events),
                               stagger_s=plan.stream_gap_ms / 1000)
    round_.add_phase(result)
    samples: list[StreamSample] = result.samples
    if not samples:
        return
    ttfb_ms = [sample.ttfb_ns / 1e6 for sample in samples]
    delays_ms = [delay / 1e6 for sample in samples for delay in sample.delays_ns]
    first_event_ms = [sample.first_event_ns / 1e6 for sample in samples]
    round_.metrics[f"ttfb_c{concurrency}_p50_ms"] = percentile(ttfb_ms, 50)
    round_.metrics[f"ttfb_c{concurrency}_p99_ms"] = percentile(ttfb_ms, 99)
    round_.metrics[f"first_event_c{concurrency}_p50_ms"] = percentile(first_event_ms, 50)
    round_.metrics[f"event_delay_c{concurrency}_p50_ms"] = percentile(delays_ms, 50)
    round_.metrics[f"event_delay_c{concurrency}_p99_ms"] = percentile(delays_ms, 99)


async def measure_load(setup: Setup, port: int, requests: Requests, proxy_pid: int | None,
                       round_: RoundMeasurement) -> None:
    """Run the request and stream phases, from concurrency 1 up to 64, each after a warm-up at its level."""
    plan = setup.plan
    # DIRECT has no connection pool to settle, so a short warm-up is enough.
    warm_up_s = plan.warm_up_s if proxy_pid else min(plan.warm_up_s, 0.5)
    # NOTE: On every request, httpcore 1.0.9 calls is_idle() n * n times for a pool of n
    # connections, and a burst grows the pool past the concurrency. The extra connections close
    # after httpx's 5 s keep-alive expiry. Until then the passthrough used about twice the CPU
    # per request on a 2-core VM, so quick mode's 1 s warm-ups measure part of this transient.
    await warm_up(port, requests.message, 1, Budget(plan.warm_up_requests_c1, time.perf_counter() + plan.phase_timeout_s))
    await measure_latency(port, requests.message, 1, plan.latency_requests_c1, plan, round_)
    await measure_streaming(port, requests.stream, 1, plan.streams_c1, plan, round_)

    await warm_up(port, requests.message, 32, Budget(10_000_000, time.perf_counter() + warm_up_s))
    await measure_latency(port, requests.message, 32, plan.latency_requests_c32, plan, round_)
    await measure_streaming(port, requests.stream, 32, plan.streams_c32, plan, round_)

    await warm_up(port, requests.message, 64, Budget(10_000_000, time.perf_counter() + warm_up_s))
    await measure_throughput(setup, port, requests, proxy_pid, round_)


async def measure_held_streams(setup: Setup, child: Child, requests: Requests, round_: RoundMeasurement) -> None:
    """Open the planned number of held streams through the proxy and read its RSS while they are open."""
    plan = setup.plan
    if plan.held_streams == 0:
        return
    # Opening the streams in batches keeps each open well inside REQUEST_TIMEOUT_S.
    connect_slots = asyncio.Semaphore(64)
    rss_before = read_status_kib(child.pid, "VmRSS")

    async def open_one() -> Connection:
        async with connect_slots:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                return await open_held_stream(child.port, requests.hold)

    tasks = [asyncio.ensure_future(open_one()) for _ in range(plan.held_streams)]
    try:
        done, pending = await asyncio.wait(tasks, timeout=plan.phase_timeout_s)
        for task in pending:
            task.cancel()
        opened = [task.result() for task in done if not task.cancelled() and task.exception() is None]
        failures = [task.exception() for task in done if not task.cancelled() and task.exception() is not None]
        round_.errors += len(failures) + len(pending)
        round_.error_examples += [f"held stream: {type(e).__name__}: {e}"[:300] for e in failures[:2]]
        await asyncio.sleep(0.3)
        rss_held = read_status_kib(child.pid, "VmRSS")
        round_.metrics["held_streams_open"] = len(opened)
        round_.metrics["rss_held_mib"] = rss_held / 1024
        if opened:
            round_.metrics["rss_per_held_stream_kib"] = (rss_held - rss_before) / len(opened)
    finally:
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
            else:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.2)


async def measure_direct(setup: Setup) -> RoundMeasurement:
    round_ = RoundMeasurement("direct")
    port = setup.upstream.port
    requests = build_requests("direct", port, setup.plan.prompt_bytes)
    await measure_load(setup, port, requests, None, round_)
    return round_


def proxy_argv(setup: Setup, target: str, port: int) -> tuple[list[str], dict[str, str]]:
    if target == "passthrough":
        argv = [setup.python, str(setup.script), "passthrough", "--port", str(port),
                "--upstream", f"http://{HOST}:{setup.upstream.port}", "--api-key", API_KEY, "--token", UPSTREAM_TOKEN]
        return argv, setup.child_env
    assert setup.clove is not None
    return [setup.python, str(setup.clove)], {**setup.clove_env, "PORT": str(port)}


async def measure_proxy(setup: Setup, children: Children, target: str) -> RoundMeasurement:
    round_ = RoundMeasurement(target)
    port = free_port()
    argv, env = proxy_argv(setup, target, port)
    child = children.start(target, argv, port, setup.proxy_cpu, env)
    try:
        round_.metrics["startup_s"] = await wait_for_health(child)
        pin_process(child.pid, setup.proxy_cpu)
        await asyncio.sleep(setup.plan.idle_settle_s)
        round_.metrics["rss_idle_mib"] = read_status_kib(child.pid, "VmRSS") / 1024

        requests = build_requests(target, port, setup.plan.prompt_bytes)
        await measure_load(setup, port, requests, child.pid, round_)
        await measure_held_streams(setup, child, requests, round_)
        round_.metrics["rss_peak_mib"] = read_status_kib(child.pid, "VmHWM") / 1024
    except (ChildExited, OSError, KeyError) as error:
        round_.failure = f"{type(error).__name__}: {error}\n{child.log_tail()}".strip()
    finally:
        await children.stop(child)
    return round_


async def warm_up(port: int, request: bytes, concurrency: int, budget: Budget) -> None:
    """Send untimed requests so that the next phase starts with the connection pool it needs.

    Raises ChildExited when none succeeds, because every later phase would fail the same way.
    """
    result = await run_workers(port, concurrency, budget, lambda c: exchange_message(c, request))
    if not result.samples:
        raise ChildExited(f"no warm-up request succeeded: {result.error_examples}")


# --------------------------------------------------------------------------------------
# Run


def choose_cpus() -> tuple[int | None, int | None]:
    """Return (proxy CPU, load CPU), or (None, None) when fewer than two CPUs are available."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def child_environment() -> dict[str, str]:
    env = dict(os.environ)
    # httpx honors proxy variables, which must not divert loopback traffic.
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def clove_environment(base: dict[str, str], upstream_port: int, workdir: Path) -> dict[str, str]:
    data_folder = workdir / "clove-data"
    data_folder.mkdir(exist_ok=True)
    return {
        **base,
        "HOST": HOST,
        "API_KEY": API_KEY,
        "DATA_FOLDER": str(data_folder),
        "CLAUDE_API_BASEURL": f"http://{HOST}:{upstream_port}",
        # clove's default: one INFO line per request, as a user runs it.
        "LOG_LEVEL": "INFO",
        "CLOVE_ENV_FILE": str(workdir / "no-clove.env"),
    }


def import_clove_token(python: str, clove: Path, env: dict[str, str]) -> None:
    completed = subprocess.run([python, str(clove), "import-token", UPSTREAM_TOKEN], env=env,
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr).decode(errors="replace").strip()
        raise ChildExited(f"clove import-token failed with code {completed.returncode}:\n{output[-2000:]}")


async def start_upstream(children: Children, python: str, script: Path, plan: Plan, cpu: int | None,
                         env: dict[str, str], hold_max_s: float | None = None) -> Child:
    port = free_port()
    argv = [python, str(script), "upstream", "--port", str(port), "--token", UPSTREAM_TOKEN,
            "--deltas", str(plan.stream_deltas), "--gap-ms", str(plan.stream_gap_ms)]
    if hold_max_s is not None:
        argv += ["--hold-max-s", str(hold_max_s)]
    child = children.start("upstream", argv, port, cpu, env)
    await wait_for_health(child)
    pin_process(child.pid, cpu)
    return child


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def run_rounds(options: argparse.Namespace, children: Children, workdir: Path) -> dict[str, Any]:
    plan = make_plan(options)
    proxy_cpu, load_cpu = choose_cpus()
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    python = sys.executable
    script = Path(__file__).resolve()
    env = child_environment()

    await warn_about_other_load(proxy_cpu)
    upstream = await start_upstream(children, python, script, plan, load_cpu, env)
    clove = None if options.skip_clove else options.clove.resolve()
    clove_env = clove_environment(env, upstream.port, workdir)
    setup = Setup(plan, proxy_cpu, load_cpu, upstream, python, script, clove, clove_env, env)
    targets = ["direct", "passthrough"]
    failures: list[str] = []
    if clove is not None:
        try:
            import_clove_token(python, clove, clove_env)
            targets.append("clove")
        except (ChildExited, OSError, subprocess.TimeoutExpired) as error:
            failures.append(str(error))
            log(str(error))

    rounds: list[list[RoundMeasurement]] = []
    started = time.perf_counter()
    for number in range(1, plan.rounds + 1):
        measured = []
        for target in targets:
            log(f"round {number}/{plan.rounds}: {target}")
            if target == "direct":
                measurement = await measure_direct(setup)
            else:
                measurement = await measure_proxy(setup, children, target)
            if measurement.failure:
                log(f"{target} failed in round {number}: {measurement.failure}")
            measured.append(measurement)
        rounds.append(measured)
    return summarize(setup, options, targets, rounds, failures, time.perf_counter() - started)


async def warn_about_other_load(cpu: int | None) -> None:
    """Log a warning when other processes keep the proxy's CPU busy before the run starts."""
    if cpu is None:
        return
    before = read_core_busy_seconds(cpu)
    await asyncio.sleep(1.0)
    busy_pct = 100 * (read_core_busy_seconds(cpu) - before)
    if busy_pct > OTHER_LOAD_WARNING_PCT:
        log(f"warning: CPU {cpu} was {busy_pct:.0f}% busy before the benchmark started, "
            "so the proxy figures will be lower and noisier than on an idle machine")


def make_plan(options: argparse.Namespace) -> Plan:
    plan = QUICK_PLAN if options.quick else FULL_PLAN
    overrides: dict[str, Any] = {}
    if options.rounds is not None:
        overrides["rounds"] = options.rounds
    if options.held_streams is not None:
        overrides["held_streams"] = options.held_streams
    return Plan(**{**asdict(plan), **overrides})


# --------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    # "latency" also gets the time added over DIRECT, "resource" is measured for proxies only,
    # and "diagnostic" gets no CLOVE / PASSTHROUGH ratio.
    kind: str
    digits: int


METRICS = [
    Metric("latency_c1_p50_ms", "Latency p50, concurrency 1", "ms", "latency", 2),
    Metric("latency_c1_p99_ms", "Latency p99, concurrency 1", "ms", "latency", 2),
    Metric("latency_c32_p50_ms", "Latency p50, concurrency 32", "ms", "latency", 2),
    Metric("latency_c32_p99_ms", "Latency p99, concurrency 32", "ms", "latency", 2),
    Metric("rps_c64", "Throughput, concurrency 64", "req/s", "rate", 0),
    Metric("cpu_s_per_1000", "Proxy CPU per 1,000 requests", "s", "resource", 3),
    Metric("load_side_busy_pct", "Load-side core busy during throughput run", "%", "diagnostic", 0),
    Metric("proxy_core_other_pct", "Other processes on the proxy core during throughput run", "%", "diagnostic", 0),
    Metric("load_core_other_pct", "Other processes on the load-side core during throughput run", "%", "diagnostic", 0),
    Metric("ttfb_c1_p50_ms", "Stream time to first byte p50, concurrency 1", "ms", "latency", 2),
    Metric("ttfb_c1_p99_ms", "Stream time to first byte p99, concurrency 1", "ms", "latency", 2),
    Metric("ttfb_c32_p50_ms", "Stream time to first byte p50, concurrency 32", "ms", "latency", 2),
    Metric("ttfb_c32_p99_ms", "Stream time to first byte p99, concurrency 32", "ms", "latency", 2),
    Metric("event_delay_c1_p50_ms", "Event forwarding delay p50, concurrency 1", "ms", "latency", 2),
    Metric("event_delay_c1_p99_ms", "Event forwarding delay p99, concurrency 1", "ms", "latency", 2),
    Metric("event_delay_c32_p50_ms", "Event forwarding delay p50, concurrency 32", "ms", "latency", 2),
    Metric("event_delay_c32_p99_ms", "Event forwarding delay p99, concurrency 32", "ms", "latency", 2),
    Metric("startup_s", "Start to first successful /health", "s", "resource", 2),
    Metric("rss_idle_mib", "RSS idle after start", "MiB", "resource", 1),
    Metric("rss_held_mib", "RSS with held streams open", "MiB", "resource", 1),
    Metric("rss_per_held_stream_kib", "RSS per held stream", "KiB", "resource", 1),
    Metric("held_streams_open", "Held streams open", "", "resource", 0),
    Metric("rss_peak_mib", "Peak RSS (VmHWM)", "MiB", "resource", 1),
]


def median_metrics(rounds: list[list[RoundMeasurement]], target: str) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for measured in rounds:
        for measurement in measured:
            if measurement.target == target and measurement.failure is None:
                for key, value in measurement.metrics.items():
                    values.setdefault(key, []).append(value)
    return {key: statistics.median(series) for key, series in values.items()}


def package_versions() -> dict[str, str]:
    versions = {}
    # httpcore retries a failed sniffio import on every pool operation, so a missing sniffio
    # slows both proxies down.
    for name in ("starlette", "httpx", "httpcore", "anyio", "sniffio", "uvicorn", "h11", "httptools", "uvloop"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summarize(setup: Setup, options: argparse.Namespace, targets: list[str], rounds: list[list[RoundMeasurement]],
              failures: list[str], elapsed_s: float) -> dict[str, Any]:
    for measured in rounds:
        for measurement in measured:
            if measurement.failure:
                failures.append(f"{measurement.target}: {measurement.failure}")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", Path(sys.argv[0]).name, *sys.argv[1:]]),
        "mode": "quick" if options.quick else "full",
        "elapsed_s": elapsed_s,
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "proxy_cpu": setup.proxy_cpu,
                    "load_cpu": setup.load_cpu, "kernel": platform.release()},
        "python": platform.python_version(),
        "packages": package_versions(),
        "clove": str(setup.clove) if setup.clove else None,
        "plan": asdict(setup.plan),
        "targets": targets,
        "medians": {target: median_metrics(rounds, target) for target in targets},
        "errors": {target: sum(m.errors for r in rounds for m in r if m.target == target) for target in targets},
        "error_examples": {target: [e for r in rounds for m in r if m.target == target for e in m.error_examples][:5]
                           for target in targets},
        "failures": failures,
        "rounds": [[measurement.as_dict() for measurement in measured] for measured in rounds],
    }


def format_value(value: float | None, digits: int) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def table_row(metric: Metric, medians: dict[str, dict[str, float]], targets: list[str]) -> list[str]:
    values = {target: medians[target].get(metric.key) for target in targets}
    if metric.kind == "resource":
        values["direct"] = None
    label = f"{metric.label} ({metric.unit})" if metric.unit else metric.label
    row = [label] + [format_value(values[target], metric.digits) for target in targets]

    if "clove" in targets:
        clove, passthrough = values["clove"], values["passthrough"]
        ratio = None
        if metric.kind != "diagnostic" and clove is not None and passthrough:
            ratio = clove / passthrough
        row.append("—" if ratio is None else f"{ratio:.2f}×")
    for target in targets[1:]:
        added = None
        if metric.kind == "latency" and values[target] is not None and values["direct"] is not None:
            added = values[target] - values["direct"]
        row.append("—" if added is None else f"{added:+.2f} ms")
    return row


def render_markdown(report: dict[str, Any]) -> str:
    targets: list[str] = report["targets"]
    plan = report["plan"]
    machine = report["machine"]
    header = ["Metric"] + [target.upper() for target in targets]
    if "clove" in targets:
        header.append("CLOVE / PASSTHROUGH")
    header += [f"{target.upper()} − DIRECT" for target in targets[1:]]

    rows = [table_row(metric, report["medians"], targets) for metric in METRICS]
    errors = ["Failed requests, all rounds"] + [str(report["errors"][target]) for target in targets]
    rows.append(errors + [""] * (len(header) - len(errors)))

    pinning = (f"proxy on CPU {machine['proxy_cpu']}, load generator and upstream on CPU {machine['load_cpu']}"
               if machine["proxy_cpu"] is not None else "not pinned (fewer than 2 CPUs)")
    packages = ", ".join(f"{name} {version}" for name, version in report["packages"].items())
    lines = [
        f"### clove benchmark, {report['date']}",
        "",
        f"- Command: `{report['command']}` ({report['mode']} mode, rounds: {plan['rounds']}, "
        f"{report['elapsed_s']:.0f} s of measurement)",
        f"- Machine: {machine['cpu']}, {machine['cpus']} CPUs, Linux {machine['kernel']}, {pinning}",
        f"- Python {report['python']}: {packages}",
        f"- Workload: {plan['prompt_bytes']}-byte prompts; streams of {plan['stream_deltas']} text deltas "
        f"{plan['stream_gap_ms']} ms apart; {plan['held_streams']} held streams",
        f"- Each concurrency level starts after a {plan['warm_up_s']:g} s warm-up at that level. "
        "Values are medians over rounds. The − DIRECT columns are the latency a proxy adds over "
        "talking to the fake upstream directly.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if plan["warm_up_s"] < HTTPX_KEEPALIVE_EXPIRY_S:
        lines.append(f"\nThe {plan['warm_up_s']:g} s warm-ups are shorter than httpx's {HTTPX_KEEPALIVE_EXPIRY_S:g} s "
                     "keep-alive expiry, so the proxies' figures at concurrency 32 and 64 include a connection pool "
                     "larger than in steady state. Use full mode for published numbers.")
    other_load = [medians.get(key, 0.0) for medians in report["medians"].values()
                  for key in ("proxy_core_other_pct", "load_core_other_pct")]
    if max(other_load, default=0.0) > OTHER_LOAD_WARNING_PCT:
        lines.append(f"\nWarning: other processes used up to {max(other_load):.0f}% of a benchmark core during the "
                     "throughput runs, so the proxy figures are lower and noisier than on an idle machine.")
    for failure in report["failures"]:
        failure_lines = [line.strip() for line in failure.strip().splitlines() if line.strip()] or ["unknown error"]
        summary = failure_lines[0] if len(failure_lines) == 1 else f"{failure_lines[0]} {failure_lines[-1]}"
        lines.append(f"\nFailure: {summary} (full output in the JSON report)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Soak: `bench_clove.py --soak`
#
# Holds many streams through clove for a while, then sends a burst of short requests, and
# checks that nothing failed and that clove's open files and RSS return to where they started.


SOAK_BURST_CONCURRENCY = 64
SOAK_WARM_UP_REQUESTS = 500
# The warm-up keeps every stream open for this long, so that the baseline is taken after clove has
# carried the full load once.
SOAK_WARM_UP_HOLD_S = 5.0
SOAK_OPEN_CONCURRENCY = 64
SOAK_OPEN_TIMEOUT_S = 120.0
# Held streams receive a ping every HOLD_PING_INTERVAL_S, so a longer silence is a stall.
SOAK_EVENT_TIMEOUT_S = 5 * HOLD_PING_INTERVAL_S
SOAK_SAMPLE_INTERVAL_S = 0.5
# The baseline is read after a warm-up that held every stream once. Measured from a cold start
# instead, RSS stays about 40% higher after the soak in a run with 500 streams on a 2-core VM
# (Python 3.11.7). clove's live Python blocks (sys.getallocatedblocks()) return to within 1%.
# The difference is freed memory that CPython's allocators keep for reuse. The table shows the
# cold reading.
SOAK_RSS_GROWTH_LIMIT = 0.20
# clove keeps idle upstream connections open until a request takes a connection from its
# pool. That request closes every idle connection older than KEEPALIVE_EXPIRY_SECONDS (5 s),
# by its sweep or as it pops them from the idle stack. So after this wait with no traffic,
# one request leaves exactly one pooled upstream connection, the one it used.
SOAK_POOL_EXPIRY_WAIT_S = 5.0 + 2.0
# uvicorn closes its side of a client connection soon after it reads EOF.
SOAK_CLOSE_WAIT_S = 1.0
# Each held stream uses a client and an upstream connection in clove. The spare covers clove's
# idle files (about 15) and the burst's 64 client and up to 64 upstream connections.
SOAK_FILES_PER_STREAM = 2
SOAK_FILES_SPARE = 200
EVENT_NAME = re.compile(rb"^event: (\S+)", re.MULTILINE)
SEQUENCE = re.compile(rb'"sequence":(\d+)')


@dataclass
class SoakStream:
    """One held stream: whether its message_start arrived, and the events received in order."""

    deltas: int
    opened: bool = False
    events: int = 0
    deltas_received: int = 0
    last_event: bytes = b""
    buffer: bytes = b""

    def feed(self, chunk: bytes) -> None:
        """Check each complete event in the chunk, in the order the fake upstream numbered them."""
        self.buffer += chunk
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            name, sequence = EVENT_NAME.search(event), SEQUENCE.search(event)
            if name is None or sequence is None:
                raise HttpError(f"event without a name or sequence number: {event[:200]!r}")
            if int(sequence.group(1)) != self.events:
                raise HttpError(f"expected event {self.events}, received event {sequence.group(1).decode()}")
            if self.events == 0 and name.group(1) != b"message_start":
                raise HttpError(f"stream began with {name.group(1).decode()}, not message_start")
            if self.last_event == b"message_stop":
                raise HttpError(f"{name.group(1).decode()} event after message_stop")
            self.events += 1
            self.last_event = name.group(1)
            if self.last_event == b"content_block_delta":
                self.deltas_received += 1
            if self.last_event == b"message_start":
                self.opened = True

    def check_end(self) -> None:
        if self.buffer.strip():
            raise HttpError(f"stream ended inside an event: {self.buffer[:200]!r}")
        if self.last_event != b"message_stop":
            raise HttpError(f"stream ended after {self.events} events without message_stop")
        if self.deltas_received != self.deltas:
            raise HttpError(f"expected {self.deltas} text deltas, received {self.deltas_received}")


async def run_soak_stream(port: int, request: bytes, stream: SoakStream, open_slots: asyncio.Semaphore) -> None:
    """Open one held stream and read it until its terminating chunk, checking every event.

    Raises HttpError, OSError or TimeoutError when the stream fails.
    """
    connection = Connection(port)
    try:
        async with open_slots, asyncio.timeout(REQUEST_TIMEOUT_S):
            reader, response = await connection.send(request)
            if response.status != 200:
                raise HttpError(f"status {response.status}: {(await read_body(reader, response))[:200]!r}")
            if response.headers.get("transfer-encoding", "").lower() != "chunked":
                raise HttpError(f"streaming response is not chunked: {response.headers}")
            while not stream.opened:
                chunk = await read_chunk(reader)
                if not chunk:
                    raise HttpError("stream ended before message_start")
                stream.feed(chunk)
        while True:
            async with asyncio.timeout(SOAK_EVENT_TIMEOUT_S):
                chunk = await read_chunk(reader)
            if not chunk:
                break
            stream.feed(chunk)
        stream.check_end()
    finally:
        connection.close()


def read_open_files(pid: int) -> dict[int, str]:
    """Return each open file descriptor of a process with its /proc/PID/fd link target."""
    targets = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:  # Closed between the listing and the readlink.
            pass
    return targets


def describe_open_files(targets: dict[int, str]) -> str:
    """Count open files by kind, such as socket or pipe, for a failure message."""
    kinds: dict[str, int] = {}
    for target in targets.values():
        kind = target.split(":", 1)[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))


class UsageSampler:
    """Peak open file count and RSS of one process, sampled in the background and on request."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_open_files = 0
        self.max_rss_kib = 0

    def sample(self) -> None:
        self.max_open_files = max(self.max_open_files, len(os.listdir(f"/proc/{self.pid}/fd")))
        self.max_rss_kib = max(self.max_rss_kib, read_status_kib(self.pid, "VmRSS"))

    async def run(self, limit_s: float) -> None:
        """Sample every SOAK_SAMPLE_INTERVAL_S until cancelled, for limit_s at most.

        Stops early when the process is gone, which the soak reports from its own readings.
        """
        deadline = time.perf_counter() + limit_s
        while time.perf_counter() < deadline:
            try:
                self.sample()
            except (OSError, KeyError):
                return
            await asyncio.sleep(SOAK_SAMPLE_INTERVAL_S)


@dataclass
class IdleReading:
    open_files: dict[int, str]
    rss_kib: int


@dataclass
class SoakResult:
    """Counts and readings of one soak run. Time values are in seconds."""

    streams: int
    seconds: float
    burst: int
    failures: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    streams_opened: int = 0
    streams_held: int = 0
    upstream_streams_released: int = 0
    open_s: float = 0.0
    held_s: float = 0.0
    events_received: int = 0
    burst_completed: int = 0
    burst_s: float = 0.0
    before: IdleReading | None = None
    after: IdleReading | None = None
    max_open_files: int = 0
    max_rss_kib: int = 0
    cold_rss_kib: int = 0
    clove_errors_logged: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    aborted: str | None = None

    def add_failures(self, phase: str, count: int, examples: list[str]) -> None:
        if count:
            self.failures[phase] = self.failures.get(phase, 0) + count
            self.error_examples += [f"{phase}: {example}" for example in examples][: max(0, 5 - len(self.error_examples))]

    @property
    def failed_requests(self) -> int:
        return sum(self.failures.values())


async def read_idle_usage(clove: Child, request: bytes, result: SoakResult) -> IdleReading:
    """Read clove's open files and RSS once its idle upstream connections have expired.

    One request after the expiry wait makes clove close the expired connections, so every
    reading counts the same idle pool: the one upstream connection that request used.
    """
    await asyncio.sleep(SOAK_POOL_EXPIRY_WAIT_S)
    connection = Connection(clove.port)
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            await exchange_message(connection, request)
    except (OSError, asyncio.IncompleteReadError, HttpError, TimeoutError, ValueError) as error:
        result.add_failures("idle reading", 1, [f"{type(error).__name__}: {error}"[:300]])
    finally:
        connection.close()
    await asyncio.sleep(SOAK_CLOSE_WAIT_S)
    return IdleReading(read_open_files(clove.pid), read_status_kib(clove.pid, "VmRSS"))


async def release_held_streams(upstream_port: int) -> int:
    """Ask the fake upstream to finish its held streams, and return how many it held."""
    connection = Connection(upstream_port)
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            reader, response = await connection.send(build_request(upstream_port, RELEASE_HELD_PATH, {}, b""))
            body = await read_body(reader, response)
    finally:
        connection.close()
    if response.status != 200:
        raise HttpError(f"releasing the held streams failed with status {response.status}: {body[:200]!r}")
    return int(json.loads(body)["released"])


async def soak_warm_up(clove: Child, upstream: Child, requests: Requests, result: SoakResult) -> None:
    """Send a few hundred requests and hold every stream briefly, so that the baseline includes
    what clove allocates, and keeps for reuse, under the full load."""
    count = min(SOAK_WARM_UP_REQUESTS, result.burst)
    budget = Budget(count, time.perf_counter() + SOAK_OPEN_TIMEOUT_S)
    warm_up_result = await run_workers(clove.port, SOAK_BURST_CONCURRENCY, budget,
                                       lambda c: exchange_message(c, requests.message))
    result.add_failures("warm-up", warm_up_result.errors + budget.remaining, warm_up_result.error_examples)

    warm_up = SoakResult(result.streams, SOAK_WARM_UP_HOLD_S, 0)
    await hold_soak_streams(clove, upstream, requests, UsageSampler(clove.pid), warm_up)
    for phase, failed in warm_up.failures.items():
        result.add_failures("warm-up " + phase, failed, warm_up.error_examples)


async def hold_soak_streams(clove: Child, upstream: Child, requests: Requests, sampler: UsageSampler,
                            result: SoakResult) -> None:
    """Open the streams, hold them all for the soak time, then let the upstream finish them."""
    streams = [SoakStream(FULL_PLAN.stream_deltas) for _ in range(result.streams)]
    open_slots = asyncio.Semaphore(SOAK_OPEN_CONCURRENCY)
    tasks = [asyncio.ensure_future(run_soak_stream(clove.port, requests.hold, stream, open_slots))
             for stream in streams]
    try:
        started = time.perf_counter()
        open_deadline = started + SOAK_OPEN_TIMEOUT_S
        while (not all(stream.opened or task.done() for stream, task in zip(streams, tasks))
               and time.perf_counter() < open_deadline):
            await asyncio.sleep(0.05)
        held_from = time.perf_counter()
        result.open_s = held_from - started
        result.streams_opened = sum(stream.opened for stream in streams)
        log(f"soak: {result.streams_opened} of {result.streams} streams open after {result.open_s:.1f} s, "
            f"holding them for {result.seconds:g} s")

        hold_deadline = held_from + result.seconds
        while (remaining := hold_deadline - time.perf_counter()) > 0:
            await asyncio.sleep(min(remaining, SOAK_SAMPLE_INTERVAL_S))
        sampler.sample()
        result.held_s = time.perf_counter() - held_from
        result.streams_held = sum(stream.opened and not task.done() for stream, task in zip(streams, tasks))
        result.upstream_streams_released = await release_held_streams(upstream.port)

        finish_s = FULL_PLAN.stream_deltas * FULL_PLAN.stream_gap_ms / 1000 + REQUEST_TIMEOUT_S
        await asyncio.wait(tasks, timeout=finish_s)
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)

    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    examples = ["cancelled at the time limit" if isinstance(error, asyncio.CancelledError)
                else f"{type(error).__name__}: {error}"[:300] for error in errors[:3]]
    result.add_failures("streams", len(errors), examples)
    result.events_received = sum(stream.events for stream in streams)


async def run_soak_burst(clove: Child, requests: Requests, result: SoakResult) -> None:
    # The time limit is 60 s plus 10 ms per request, so only a stalled or very slow clove reaches it.
    budget = Budget(result.burst, time.perf_counter() + 60.0 + result.burst / 100)
    burst = await run_workers(clove.port, SOAK_BURST_CONCURRENCY, budget,
                              lambda c: exchange_message(c, requests.message))
    result.burst_completed = len(burst.samples)
    result.burst_s = burst.elapsed_s
    examples = burst.error_examples + ([f"{budget.remaining} requests not sent before the time limit"]
                                       if budget.remaining else [])
    result.add_failures("burst", burst.errors + budget.remaining, examples)


def find_logged_errors(clove: Child) -> list[str]:
    """Return the lines of clove's log that report an error or a traceback."""
    try:
        text = clove.log_path.read_text(errors="replace")
    except OSError as error:
        return [f"could not read clove's log: {error}"]
    return [line for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback")]


async def run_soak(options: argparse.Namespace, children: Children, workdir: Path) -> SoakResult:
    """Start the fake upstream and clove, then run the warm-up, hold, burst and idle readings."""
    started = time.perf_counter()
    result = SoakResult(options.soak_streams, options.soak_seconds, options.soak_burst)
    files_needed = SOAK_FILES_PER_STREAM * options.soak_streams + SOAK_FILES_SPARE
    files_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if files_limit != resource.RLIM_INFINITY and files_limit < files_needed:
        result.aborted = (f"the open file limit is {files_limit}, and clove needs about {files_needed} for "
                          f"{options.soak_streams} streams: raise it with `ulimit -n {files_needed}` or pass "
                          "a smaller --soak-streams")
        return result

    proxy_cpu, load_cpu = choose_cpus()
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    python = sys.executable
    env = child_environment()
    # Streams end when released, and this limit only ends them if the release never comes.
    hold_max_s = SOAK_OPEN_TIMEOUT_S + options.soak_seconds + REQUEST_TIMEOUT_S
    # clove logs at its default level, INFO, so that its log shows every request as a user's would.
    clove_env = {**clove_environment(env, 0, workdir), "LOG_LEVEL": "INFO"}
    try:
        upstream = await start_upstream(children, python, Path(__file__).resolve(), FULL_PLAN, load_cpu, env,
                                        hold_max_s)
        clove_env["CLAUDE_API_BASEURL"] = f"http://{HOST}:{upstream.port}"
        import_clove_token(python, options.clove.resolve(), clove_env)
    except (ChildExited, OSError, subprocess.TimeoutExpired) as error:
        result.aborted = str(error)
        return result

    port = free_port()
    clove = children.start("clove", [python, str(options.clove.resolve())], port, proxy_cpu,
                           {**clove_env, "PORT": str(port)})
    sampler = UsageSampler(clove.pid)
    sampling: asyncio.Task[None] | None = None
    try:
        await wait_for_health(clove)
        pin_process(clove.pid, proxy_cpu)
        requests = build_requests("clove", port, FULL_PLAN.prompt_bytes)

        result.cold_rss_kib = read_status_kib(clove.pid, "VmRSS")
        log("soak: warming up")
        await soak_warm_up(clove, upstream, requests, result)
        result.before = await read_idle_usage(clove, requests.message, result)
        log(f"soak: baseline {len(result.before.open_files)} open files, {result.before.rss_kib / 1024:.1f} MiB RSS")

        sampling_limit_s = 2 * SOAK_OPEN_TIMEOUT_S + options.soak_seconds + 60.0 + options.soak_burst / 100
        sampling = asyncio.ensure_future(sampler.run(sampling_limit_s))
        await hold_soak_streams(clove, upstream, requests, sampler, result)
        log(f"soak: streams done, sending {options.soak_burst} requests")
        await run_soak_burst(clove, requests, result)
        sampler.sample()
        result.max_rss_kib = read_status_kib(clove.pid, "VmHWM")

        log("soak: waiting for idle connections to expire")
        result.after = await read_idle_usage(clove, requests.message, result)
    except (ChildExited, OSError, KeyError, HttpError, TimeoutError, ValueError) as error:
        result.aborted = f"{type(error).__name__}: {error}\n{clove.log_tail()}".strip()
    finally:
        if sampling is not None:
            sampling.cancel()
            await asyncio.gather(sampling, return_exceptions=True)
        result.max_open_files = sampler.max_open_files
        result.max_rss_kib = max(result.max_rss_kib, sampler.max_rss_kib)
        result.clove_errors_logged = find_logged_errors(clove)
        await children.stop(clove)
    result.elapsed_s = time.perf_counter() - started
    return result


@dataclass
class SoakCheck:
    name: str
    value: str
    criterion: str
    passed: bool | None  # None for a reading without a pass criterion.


def soak_checks(result: SoakResult) -> list[SoakCheck]:
    """Turn the readings into table rows, with a pass or fail for each criterion."""
    before, after = result.before, result.after
    failure_detail = ", ".join(f"{phase} {count}" for phase, count in result.failures.items())
    checks = [
        SoakCheck("Streams held concurrently", f"{result.streams_held:,} of {result.streams:,} "
                  f"(upstream held {result.upstream_streams_released:,})",
                  "all", result.streams_held == result.upstream_streams_released == result.streams),
        SoakCheck("Hold duration", f"{result.held_s:.1f} s, after {result.open_s:.1f} s to open them", "", None),
        SoakCheck("Stream events received", f"{result.events_received:,}",
                  "every event in order, each stream ending with message_stop",
                  result.events_received > 0 and "streams" not in result.failures),
        SoakCheck("Burst requests", f"{result.burst_completed:,} of {result.burst:,} in {result.burst_s:.1f} s "
                  f"(concurrency {SOAK_BURST_CONCURRENCY})", "", None),
        SoakCheck("Failed requests", f"{result.failed_requests:,}" + (f" ({failure_detail})" if failure_detail else ""),
                  "0", result.failed_requests == 0 and result.aborted is None),
        SoakCheck("Errors in clove's log", f"{len(result.clove_errors_logged):,}", "0",
                  not result.clove_errors_logged),
    ]
    if before is not None and after is not None:
        checks.append(SoakCheck(
            "Open files before / peak / after", f"{len(before.open_files):,} / {result.max_open_files:,} / "
            f"{len(after.open_files):,}", "after ≤ before", len(after.open_files) <= len(before.open_files)))
        growth = after.rss_kib / before.rss_kib - 1
        checks.append(SoakCheck("RSS at start, before the warm-up", f"{result.cold_rss_kib / 1024:.1f} MiB", "", None))
        checks.append(SoakCheck(
            "RSS before / peak / after", f"{before.rss_kib / 1024:.1f} / {result.max_rss_kib / 1024:.1f} / "
            f"{after.rss_kib / 1024:.1f} MiB ({growth:+.1%})",
            f"after ≤ before + {SOAK_RSS_GROWTH_LIMIT:.0%}", growth <= SOAK_RSS_GROWTH_LIMIT))
    else:
        checks.append(SoakCheck("Open files and RSS", "not read", "readings before and after", False))
    checks.append(SoakCheck("Time taken", f"{result.elapsed_s:.0f} s", "", None))
    return checks


def render_soak_markdown(result: SoakResult, checks: list[SoakCheck], command: str) -> str:
    passed = all(check.passed is not False for check in checks)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    packages = ", ".join(f"{name} {version}" for name, version in package_versions().items())
    lines = [
        f"### clove soak, {date}: {'PASS' if passed else 'FAIL'}",
        "",
        f"- Command: `{command}`",
        f"- Machine: {cpu_model()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        f"- Python {platform.python_version()}: {packages}",
        f"- Workload: {result.streams:,} streams held through clove for {result.seconds:g} s, with a ping "
        f"every {HOLD_PING_INTERVAL_S:g} s from the fake upstream, then {FULL_PLAN.stream_deltas} text deltas "
        f"and message_stop each; then {result.burst:,} non-streaming requests at concurrency "
        f"{SOAK_BURST_CONCURRENCY}.",
        "- Open files and RSS before and after are read once idle upstream connections have expired "
        f"({SOAK_POOL_EXPIRY_WAIT_S:g} s) and one request has closed them, so both readings include the same "
        "idle pool: one upstream connection. Peak open files is sampled every "
        f"{SOAK_SAMPLE_INTERVAL_S:g} s, and peak RSS is VmHWM.",
        "",
        "| Measure | Value | Pass criterion | Result |",
        "|---|---:|---|---|",
    ]
    for check in checks:
        outcome = "—"
        if check.passed is not None:
            outcome = "pass" if check.passed else "FAIL"
        lines.append(f"| {check.name} | {check.value} | {check.criterion or '—'} | {outcome} |")
    for example in result.error_examples:
        lines.append(f"\nFailed request: {example}")
    if result.before is not None and result.after is not None and len(result.after.open_files) > len(result.before.open_files):
        lines.append(f"\nOpen files before: {describe_open_files(result.before.open_files)}. "
                     f"After: {describe_open_files(result.after.open_files)}.")
    for line in result.clove_errors_logged[:5]:
        lines.append(f"\nclove logged: {line[:300]}")
    if result.aborted:
        summary = " ".join(result.aborted.splitlines()[:1] + result.aborted.splitlines()[-1:])
        lines.append(f"\nThe soak stopped early: {summary}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="run the short plan: 3 rounds with 1 s warm-ups, about 75 s on a 2-core VM")
    parser.add_argument("--rounds", type=int, help="number of interleaved rounds (default: 3 quick, 5 full)")
    parser.add_argument("--held-streams", type=int, help="streams held open for the memory reading (default: 500)")
    parser.add_argument("--clove", type=Path, default=Path(__file__).resolve().with_name("clove.py"),
                        help="path to clove.py (default: clove.py next to this script)")
    parser.add_argument("--skip-clove", action="store_true", help="measure only DIRECT and PASSTHROUGH")
    parser.add_argument("--output", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--json", type=Path, help="write all rounds and medians as JSON to this file")
    parser.add_argument("--soak", action="store_true",
                        help="run the soak instead of the benchmark: hold streams through clove, send a burst of "
                             "requests, then check failures, open files and RSS (about 90 s with the defaults)")
    parser.add_argument("--soak-streams", type=int, help="streams held at once in the soak (default: 500)")
    parser.add_argument("--soak-seconds", type=float, help="how long all streams stay open together, in s (default: 60)")
    parser.add_argument("--soak-burst", type=int, help="non-streaming requests sent after the streams (default: 5000)")
    subcommands = parser.add_subparsers(dest="command", help="internal: processes started by the benchmark")

    upstream = subcommands.add_parser("upstream", help="run the fake Anthropic upstream")
    upstream.add_argument("--port", type=int, required=True, help="TCP port to listen on at 127.0.0.1")
    upstream.add_argument("--token", required=True, help="bearer token that requests must carry")
    upstream.add_argument("--deltas", type=int, default=10, help="text deltas per stream")
    upstream.add_argument("--gap-ms", type=int, default=20, help="gap between text deltas in ms")
    upstream.add_argument("--hold-max-s", type=float, default=120.0, help="maximum time a held stream stays open, in s")

    passthrough = subcommands.add_parser("passthrough", help="run the minimal Starlette + httpx passthrough")
    passthrough.add_argument("--port", type=int, required=True, help="TCP port to listen on at 127.0.0.1")
    passthrough.add_argument("--upstream", required=True, help="upstream base URL")
    passthrough.add_argument("--api-key", required=True, help="x-api-key that clients must send")
    passthrough.add_argument("--token", required=True, help="bearer token sent upstream")

    options = parser.parse_args(argv)
    if options.rounds is not None and options.rounds < 1:
        parser.error("--rounds must be at least 1")
    if options.held_streams is not None and options.held_streams < 0:
        parser.error("--held-streams must be 0 or more")
    if options.command is None and not options.skip_clove and not options.clove.is_file():
        parser.error(f"clove not found at {options.clove}: pass --clove PATH, or --skip-clove to measure without it")
    check_soak_options(parser, options)
    return options


def check_soak_options(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    """Fill in the soak defaults, and reject soak options that conflict or are out of range."""
    soak_values = {"--soak-streams": options.soak_streams, "--soak-seconds": options.soak_seconds,
                   "--soak-burst": options.soak_burst}
    if not options.soak:
        given = [name for name, value in soak_values.items() if value is not None]
        if given:
            parser.error(f"{', '.join(given)} {'requires' if len(given) == 1 else 'require'} --soak")
        return
    benchmark_values = {"--quick": options.quick, "--rounds": options.rounds,
                        "--held-streams": options.held_streams, "--skip-clove": options.skip_clove}
    given = [name for name, value in benchmark_values.items() if value not in (None, False)]
    if given:
        parser.error(f"--soak cannot be combined with {', '.join(given)}, which set up the benchmark")
    if options.command is not None:
        parser.error(f"--soak cannot be combined with the internal subcommand {options.command}")
    options.soak_streams = 500 if options.soak_streams is None else options.soak_streams
    options.soak_seconds = 60.0 if options.soak_seconds is None else options.soak_seconds
    options.soak_burst = 5000 if options.soak_burst is None else options.soak_burst
    if options.soak_streams < 1:
        parser.error("--soak-streams must be at least 1")
    if not 0 < options.soak_seconds <= 3600:
        parser.error("--soak-seconds must be more than 0 and at most 3600")
    if options.soak_burst < 1:
        parser.error("--soak-burst must be at least 1")


def raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_with_children(run: Callable[[Children, Path], Awaitable[SAMPLE]]) -> SAMPLE | None:
    """Run `run` with a fresh work directory, and stop every child it started on any exit.

    Returns None when interrupted by Ctrl-C.
    """
    signal.signal(signal.SIGTERM, raise_system_exit)
    signal.signal(signal.SIGHUP, raise_system_exit)
    workdir = Path(tempfile.mkdtemp(prefix="clove-bench-"))
    children = Children(workdir)
    try:
        return asyncio.run(run(children, workdir))
    except KeyboardInterrupt:
        log("interrupted, child processes stopped")
        return None
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def run_benchmark(options: argparse.Namespace) -> int:
    report = run_with_children(lambda children, workdir: run_rounds(options, children, workdir))
    if report is None:
        return 130

    markdown = render_markdown(report)
    print(markdown)
    if options.output:
        options.output.write_text(markdown)
    if options.json:
        options.json.write_text(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


def run_soak_command(options: argparse.Namespace) -> int:
    result = run_with_children(lambda children, workdir: run_soak(options, children, workdir))
    if result is None:
        return 130
    checks = soak_checks(result)
    markdown = render_soak_markdown(result, checks, " ".join(["python", Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(markdown)
    if options.output:
        options.output.write_text(markdown)
    if options.json:
        report = {**asdict(result), "checks": [asdict(check) for check in checks]}
        options.json.write_text(json.dumps(report, indent=2))
    return 0 if all(check.passed is not False for check in checks) else 1


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.command == "upstream":
        return run_upstream(options)
    if options.command == "passthrough":
        return run_passthrough(options)
    if options.soak:
        return run_soak_command(options)
    return run_benchmark(options)


if __name__ == "__main__":
    sys.exit(main())
