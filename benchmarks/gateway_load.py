"""Load tools for the gateway, shared by benchmarks/bench_gateway.py and tests/load/: many SSE readers on raw
asyncio sockets (a reader costs a few KB, not an HTTP client), chunked uploads that never end, OpenAI waiters,
and what /proc says about a process tree (resident memory, its TCP connections to Redis).

Everything here talks to one host and port on loopback; every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

TERMINAL = ("succeeded", "failed", "cancelled")


# ---- /proc --------------------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def tcp_connections_to(pid: int, port: int) -> int:
    """Established TCP connections from `pid` and its descendants to local port `port` (Redis)."""
    total = 0
    for member in process_tree(pid):
        inodes = _socket_inodes(member)
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{member}/net/{table}").read_text().splitlines()[1:]:
                    parts = line.split()
                    remote, state, inode = parts[2], parts[3], parts[9]
                    if state == "01" and inode in inodes and int(remote.rsplit(":", 1)[1], 16) == port:
                        total += 1
    return total


class Sampler:
    """Samples a number (RSS, connections) every `every_s` in a thread; keeps the max and the last."""

    def __init__(self, read, every_s: float = 0.05):
        import threading

        self.read, self.every_s = read, every_s
        self.max = self.first = self.last = read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            value = self.read()
            self.last, self.max = value, max(self.max, value)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.last = self.read()
        self.max = max(self.max, self.last)


# ---- raw HTTP on asyncio ------------------------------------------------------------------------------------
async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _chunks(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The body of a response, as it comes (chunked or not)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


@dataclass
class ReaderResult:
    status: int = 0
    events: int = 0
    names: list[str] = field(default_factory=list)
    terminal: str | None = None
    error: str | None = None  # an SSE `error` event's type, or what went wrong on the wire
    last_id: str | None = None
    first_event_at: float | None = None

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.terminal is not None


async def sse_reader(
    host: str,
    port: int,
    job_id: str,
    key: str | None,
    *,
    timeout_s: float = 120.0,
    after: str | None = None,
    keep_names: bool = False,
) -> ReaderResult:
    """One EventSource on GET /v1/jobs/{id}/events: counts the events until the terminal one (or an error)."""
    out = ReaderResult()
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
            head = f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
            if key:
                head += f"Authorization: Bearer {key}\r\n"
            if after:
                head += f"Last-Event-ID: {after}\r\n"
            writer.write((head + "\r\n").encode())
            out.status, headers = await _head(reader)
            if out.status != 200:
                return out
            buffer, name, event_id = b"", None, None
            async for data in _chunks(reader, headers):
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.startswith(b"event: "):
                        name = line[7:].decode()
                    elif line.startswith(b"id: "):
                        event_id = line[4:].decode()
                    elif line == b"" and name:
                        out.events += 1
                        out.first_event_at = out.first_event_at or time.time()
                        if keep_names:
                            out.names.append(name)
                        out.last_id = event_id or out.last_id
                        if name == "error":
                            out.error = "stream_unavailable"
                            return out
                        if name in TERMINAL:
                            out.terminal = name
                            return out
                        name = None
                    elif line.startswith(b"data: ") and name == "error":
                        out.error = json.loads(line[6:]).get("type", "error")
            out.error = out.error or "closed without a terminal event"
    except TimeoutError:
        out.error = "timeout"
    except (OSError, asyncio.IncompleteReadError, ValueError) as error:
        out.error = f"{type(error).__name__}: {error}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return out


async def request(
    host: str, port: int, method: str, path: str, key: str | None = None, body: dict | None = None, headers=None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on its own connection: (status, headers, body)."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
    try:
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {len(data)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        if key:
            head += f"Authorization: Bearer {key}\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        writer.write((head + "\r\n").encode() + data)
        status, response_headers = await _head(reader)
        content = b"".join([chunk async for chunk in _chunks(reader, response_headers)])
        return status, response_headers, content
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@dataclass
class UploadResult:
    status: int = 0
    sent: int = 0
    seconds: float = 0.0
    error: str | None = None


async def endless_upload(
    host: str, port: int, path: str, key: str | None, *, total: int, chunk: int = 1 << 20, chunked: bool = True
) -> UploadResult:
    """POST a JSON-looking body of `total` bytes, chunked (no Content-Length) or with a Content-Length, and
    keep sending until the server answers or closes: what a client that ignores limits does."""
    out, started = UploadResult(), time.perf_counter()
    block = b"[" + b"1," * (chunk // 2 - 1) + b"1"  # chunk bytes of a never-ending JSON array
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n"
        if key:
            head += f"Authorization: Bearer {key}\r\n"
        writer.write((head + "\r\n").encode())
        answer = asyncio.ensure_future(_head(reader))
        frame = f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block
        try:
            while out.sent < total and not answer.done():
                writer.write(frame)
                out.sent += len(block)
                drain = asyncio.ensure_future(writer.drain())
                await asyncio.wait([answer, drain], return_when="FIRST_COMPLETED")
                if not drain.done():
                    drain.cancel()
                    break
                drain.result()
            if chunked and not answer.done():
                writer.write(b"0\r\n\r\n")
        except (ConnectionError, OSError):
            pass  # the server closed while we sent: its answer (if any) is already in the socket
        try:
            async with asyncio.timeout(60):
                out.status, _ = await answer
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as error:
            out.error = f"{type(error).__name__}: {error}"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    out.seconds = time.perf_counter() - started
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")
