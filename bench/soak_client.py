#!/usr/bin/env python3
"""Soak clients for `specula serve` (Python standard library only; run by bench/soak.sh).

Mixed WebSocket and SSE clients run for a given time against a server: normal requests,
several at once on one WebSocket, random cancels, disconnects mid-stream, malformed frames
and bodies, prompts longer than the context, oversized frames and bodies, bodies sent in
part. Every reply is checked against what its action must get; anything else counts as
`unexpected` and fails the run. At the end the server must come back to idle: no request
running or waiting, no KV block in use. Prints the report and exits non-zero on a failure.
"""

import argparse
import asyncio
import base64
import collections
import json
import os
import random
import struct
import sys
import time

WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing in old trees".split()
MALFORMED_FRAMES = [
    ("{not json", "invalid_json"),
    ('["generate"]', "invalid_request"),
    ('{"type":"dance","id":"m"}', "unknown_type"),
    ('{"type":"generate","id":"m","prompt":"hi","temprature":1}', "invalid_request"),
    ('{"type":"generate","id":"m","prompt":"hi","top_p":1.5}', "invalid_sampling"),
    ('{"type":"generate","id":"m","prompt":"hi","max_tokens":0}', "invalid_max_tokens"),
    ('{"type":"cancel","id":"nobody"}', "unknown_id"),
]
MALFORMED_BODIES = [
    (b"{not json", "invalid_json"),
    (b'{"prompt":"hi","bogus":1}', "invalid_request"),
    (b'{"prompt":"hi","temperature":-3}', "invalid_sampling"),
    (b'{"prompt":"hi","n":2}', "invalid_request"),
    (b"", "invalid_json"),
]


# A reply that has not come within this is a failure (the server must never leave a client
# waiting without an answer).
READ_TIMEOUT = 300


class Unexpected(Exception):
    """A reply the action must not get."""


class Stats:
    def __init__(self):
        self.requests = 0
        self.completed = 0
        self.cancels = 0
        self.disconnects = 0
        self.outcomes = collections.Counter()  # error codes, close codes, statuses by kind
        self.unexpected = []

    def expect(self, ok, what):
        if not ok:
            self.unexpected.append(what)
            raise Unexpected(what)


def prompt(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words))


def overlong_prompt():
    # Beyond any context the default model has (8192 tokens): must be refused.
    return "word " * 9000


# ---- a minimal WebSocket client (RFC 6455) ----

class WebSocket:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        # Ids this client cancelled: a cancel that crossed the request's end gets a
        # harmless `unknown_id` later (docs/websocket.md).
        self.cancelled = set()
        self.late_cancels = 0

    @classmethod
    async def connect(cls, host, port):
        reader, writer = await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise Unexpected(f"handshake: {head[:60]!r}")
        return cls(reader, writer)

    @staticmethod
    def header(opcode, length, fin=True):
        first = (0x80 if fin else 0) | opcode
        if length < 126:
            return struct.pack("!BB", first, 0x80 | length)
        if length < 65536:
            return struct.pack("!BBH", first, 0x80 | 126, length)
        return struct.pack("!BBQ", first, 0x80 | 127, length)

    async def send_frame(self, opcode, payload):
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(self.header(opcode, len(payload)) + mask + masked)
        await self.writer.drain()

    async def send_json(self, obj):
        await self.send_frame(0x1, json.dumps(obj).encode())

    async def send_raw_header(self, declared):
        """A frame header alone, declaring `declared` bytes that never follow."""
        self.writer.write(self.header(0x1, declared) + os.urandom(4))
        await self.writer.drain()

    async def recv(self):
        """The next text frame as JSON, or ("close", code) for a close frame."""
        try:
            return await asyncio.wait_for(self._recv(), READ_TIMEOUT)
        except TimeoutError:
            raise Unexpected(f"no WebSocket frame within {READ_TIMEOUT} s") from None

    async def _recv(self):
        while True:
            b0, b1 = await self.reader.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(length)
            opcode = b0 & 0x0F
            if opcode == 0x1:
                frame = json.loads(payload)
                if frame.get("code") == "unknown_id" and frame.get("id") in self.cancelled:
                    self.late_cancels += 1
                    continue
                return frame
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return ("close", code)
            if opcode == 0x9:
                await self.send_frame(0xA, payload)

    def drop(self):
        self.writer.transport.abort()

    async def close(self):
        try:
            await self.send_frame(0x8, struct.pack("!H", 1000))
            self.writer.close()
        except (ConnectionError, OSError):
            pass


async def ws_request(ws, stats, rng, rid, cancel_after=None):
    """One generate, read to its last frame (other ids' frames are not expected here)."""
    frame = {"type": "generate", "id": rid, "max_tokens": rng.randint(1, 48)}
    if rng.random() < 0.5:
        frame["prompt"] = prompt(rng, rng.randint(1, 60))
    else:
        frame["messages"] = [{"role": "user", "content": prompt(rng, rng.randint(1, 30))}]
    if rng.random() < 0.4:
        frame.update(temperature=round(rng.uniform(0.1, 1.5), 2), top_p=0.9, seed=rng.randint(0, 1000))
    stats.requests += 1
    await ws.send_json(frame)
    deltas = 0
    while True:
        reply = await ws.recv()
        stats.expect(isinstance(reply, dict) and reply.get("id") == rid, f"ws {rid}: {reply}")
        if reply["type"] == "delta":
            deltas += 1
            if cancel_after is not None and deltas == cancel_after:
                stats.cancels += 1
                ws.cancelled.add(rid)
                await ws.send_json({"type": "cancel", "id": rid})
            continue
        stats.expect(reply["type"] == "done", f"ws {rid}: {reply}")
        stats.completed += 1
        stats.outcomes[f"finish_{reply['finish_reason']}"] += 1
        return


async def long_client(host, port, stats, rng, deadline):
    """Prompts past one prefill step (512 tokens), up to past the context (8192), one at a time.
    On a CPU a prefill runs at tens of tokens per second, so only the shorter ones run to
    their end; the others are cancelled or abandoned mid-prefill, and those past the context
    must be refused."""
    n = 0
    while time.monotonic() < deadline:
        # Every step that carries a prefill chunk is slow here: leave the others room.
        await asyncio.sleep(rng.uniform(15, 45))
        n += 1
        r = rng.random()
        words = rng.randint(513, 700) if r < 0.5 else rng.randint(700, 8000) if r < 0.75 else rng.randint(8200, 8400)
        rid = f"long{n}"
        ws = await WebSocket.connect(host, port)
        try:
            stats.requests += 1
            await ws.send_json({"type": "generate", "id": rid, "prompt": prompt(rng, words), "max_tokens": rng.randint(1, 4)})
            patience = READ_TIMEOUT if words <= 700 else rng.uniform(3, 15)
            try:
                reply = await asyncio.wait_for(ws._recv(), patience)
            except TimeoutError:
                reply = None
            if reply is None and rng.random() < 0.5:
                stats.outcomes["long_prompt_abandoned"] += 1
                stats.disconnects += 1
                continue
            if reply is None:
                stats.cancels += 1
                ws.cancelled.add(rid)
                await ws.send_json({"type": "cancel", "id": rid})
                reply = await ws.recv()
            while reply.get("type") == "delta":
                reply = await ws.recv()
            if reply.get("type") == "done":
                stats.completed += 1
                stats.outcomes[f"long_prompt_{reply['finish_reason']}"] += 1
            else:
                stats.expect(words > 8100 and reply.get("code") == "context_length_exceeded", f"long ({words} words): {reply}")
                stats.outcomes["long_prompt_refused"] += 1
        except Unexpected as e:
            if str(e) not in stats.unexpected:
                stats.unexpected.append(str(e))
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            stats.unexpected.append(f"websocket broke: {e!r}")
        finally:
            ws.drop()


async def ws_errors(ws, stats, rng, rid):
    text, code = rng.choice(MALFORMED_FRAMES)
    if rng.random() < 0.3:
        text, code = json.dumps({"type": "generate", "id": rid, "prompt": overlong_prompt()}), "context_length_exceeded"
    stats.requests += 1
    await ws.send_frame(0x1, text.encode())
    reply = await ws.recv()
    stats.expect(isinstance(reply, dict) and reply.get("code") == code, f"ws error {code}: {reply}")
    stats.outcomes[code] += 1


async def ws_client(host, port, stats, rng, deadline):
    n = 0
    while time.monotonic() < deadline:
        ws = await WebSocket.connect(host, port)
        try:
            for _ in range(rng.randint(1, 8)):
                n += 1
                rid, action = f"r{n}", rng.random()
                if action < 0.45:
                    await ws_request(ws, stats, rng, rid)
                elif action < 0.60:
                    await ws_request(ws, stats, rng, rid, cancel_after=rng.randint(1, 4))
                elif action < 0.75:
                    await ws_errors(ws, stats, rng, rid)
                elif action < 0.82:
                    # Two at once, then leave without a word mid-stream.
                    for i in range(2):
                        stats.requests += 1
                        await ws.send_json({"type": "generate", "id": f"{rid}.{i}", "prompt": prompt(rng, 5), "max_tokens": 40})
                    await ws.recv()
                    stats.disconnects += 1
                    ws.drop()
                    break
                elif action < 0.86:
                    await ws.send_raw_header(rng.choice([5 << 20, 1 << 40]))
                    reply = await ws.recv()
                    stats.expect(reply == ("close", 1009), f"oversized frame: {reply}")
                    stats.outcomes["close_1009"] += 1
                    ws.drop()
                    break
                else:
                    # Several multiplexed on the connection, read to their ends in any order.
                    ids = [f"{rid}.{i}" for i in range(rng.randint(2, 3))]
                    for i in ids:
                        stats.requests += 1
                        await ws.send_json({"type": "generate", "id": i, "prompt": prompt(rng, 8), "max_tokens": rng.randint(1, 32)})
                    pending = set(ids)
                    while pending:
                        reply = await ws.recv()
                        stats.expect(isinstance(reply, dict) and reply.get("id") in pending, f"multiplexed: {reply}")
                        if reply["type"] == "done":
                            pending.discard(reply["id"])
                            stats.completed += 1
                            stats.outcomes[f"finish_{reply['finish_reason']}"] += 1
            else:
                await ws.close()
        except Unexpected as e:
            if str(e) not in stats.unexpected:
                stats.unexpected.append(str(e))
            ws.drop()
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            stats.unexpected.append(f"websocket broke: {e!r}")
            ws.drop()
        finally:
            if ws.late_cancels:
                stats.outcomes["unknown_id_after_cancel"] += ws.late_cancels


# ---- HTTP: SSE and plain requests ----

async def http_request(host, port, path, body, headers=b""):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n".encode() + headers + b"\r\n" + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return reader, writer, status, head.lower()


async def read_body(reader, head):
    if b"transfer-encoding: chunked" in head:
        out = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            out += await reader.readexactly(size + 2)
            if size == 0:
                return out
    length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0]) if b"content-length: " in head else 0
    return await reader.readexactly(length)


async def sse_events(reader):
    """The SSE `data:` payloads of a chunked response, as they arrive."""
    buf = b""
    while True:
        size = int((await reader.readline()).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return
        buf += chunk[:-2]
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            yield event.decode().removeprefix("data: ")


def openai_body(rng, stream):
    if rng.random() < 0.5:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt(rng, rng.randint(1, 30))}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt(rng, rng.randint(1, 60))}
    body.update(max_tokens=rng.randint(1, 48), stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    return path, json.dumps(body).encode()


async def sse_client(host, port, stats, rng, deadline):
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(sse_action(host, port, stats, rng), 2 * READ_TIMEOUT)
        except TimeoutError:
            stats.unexpected.append(f"no HTTP answer within {2 * READ_TIMEOUT} s")


async def sse_action(host, port, stats, rng):
    """One HTTP request of a random kind, checked."""
    action = rng.random()
    writer = None
    try:
        if action < 0.55:
            path, body = openai_body(rng, stream=True)
            stats.requests += 1
            reader, writer, status, head = await http_request(host, port, path, body)
            stats.expect(status == 200, f"sse status {status}")
            leave = rng.randint(1, 6) if rng.random() < 0.15 else None
            events = []
            async for data in sse_events(reader):
                events.append(data)
                if leave is not None and len(events) == leave:
                    stats.disconnects += 1
                    writer.transport.abort()
                    break
            else:
                stats.expect(events[-1] == "[DONE]", f"sse end: {events[-2:]}")
                stats.completed += 1
                stats.outcomes["finish_" + str(json.loads(events[-3])["choices"][0]["finish_reason"])] += 1
        elif action < 0.70:
            path, body = openai_body(rng, stream=False)
            stats.requests += 1
            reader, writer, status, head = await http_request(host, port, path, body)
            reply = json.loads(await read_body(reader, head))
            stats.expect(status == 200 and reply["choices"], f"plain: {status} {reply}")
            stats.completed += 1
            stats.outcomes["finish_" + reply["choices"][0]["finish_reason"]] += 1
        elif action < 0.90:
            body, code = rng.choice(MALFORMED_BODIES)
            if rng.random() < 0.3:
                body, code = json.dumps({"prompt": overlong_prompt()}).encode(), "context_length_exceeded"
            stats.requests += 1
            reader, writer, status, head = await http_request(host, port, "/v1/completions", body)
            reply = json.loads(await read_body(reader, head))
            stats.expect(status == 400 and reply["error"]["code"] == code, f"bad body {code}: {status} {reply}")
            stats.outcomes[code] += 1
        elif action < 0.96:
            # Declared too large: refused before the body is sent.
            stats.requests += 1
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5242880\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            stats.expect(head.startswith(b"HTTP/1.1 413"), f"oversized body: {head[:40]!r}")
            stats.outcomes["http_413"] += 1
        else:
            # Headers and part of the body, then nothing: cut off at the body deadline.
            stats.requests += 1
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            stats.expect(head.startswith(b"HTTP/1.1 408"), f"half-sent body: {head[:40]!r}")
            stats.outcomes["http_408"] += 1
    except Unexpected:
        pass
    except (ConnectionError, asyncio.IncompleteReadError) as e:
        stats.unexpected.append(f"http connection broke: {e!r}")
    finally:
        if writer is not None:
            writer.transport.abort()


# ---- the server's own view ----

async def metrics(host, port):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    text = (await reader.read()).decode()
    writer.close()
    values = collections.defaultdict(float)
    for line in text.split("\r\n\r\n", 1)[1].splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] += float(value)
    return values


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def wait_idle(host, port, limit=60):
    start = time.monotonic()
    while True:
        m = await metrics(host, port)
        busy = (m["specula_requests_running"], m["specula_requests_waiting"], m['specula_kv_blocks_used{pool="target"}'])
        if busy == (0, 0, 0) or time.monotonic() - start > limit:
            return busy
        await asyncio.sleep(0.2)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--clients", type=int, default=6, help="WebSocket clients, and as many SSE clients")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds of load before the starting RSS is read (default: half the run): the KV pool's "
                         "pages become resident as its blocks are first used, which takes minutes with long prompts")
    ap.add_argument("--rss-slack-mb", type=float, default=150)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--long-prompts", action="store_true",
                    help="and a client of prompts past one prefill step (513 tokens to past the context)")
    args = ap.parse_args()
    host = "127.0.0.1"
    stats = Stats()
    before = await metrics(host, args.port)
    rss_idle = rss_mb(args.pid)
    start = time.monotonic()
    deadline = start + args.seconds
    clients = [ws_client(host, args.port, stats, random.Random(args.seed * 1000 + i), deadline) for i in range(args.clients)]
    clients += [sse_client(host, args.port, stats, random.Random(args.seed * 2000 + i), deadline) for i in range(args.clients)]
    if args.long_prompts:
        clients.append(long_client(host, args.port, stats, random.Random(args.seed * 3000), deadline))
    # The starting memory is read once the KV cache and the allocator have warmed up.
    warmup = args.warmup if args.warmup is not None else args.seconds / 2
    samples = []  # (seconds into the run, RSS in MB)

    async def sample_rss():
        step = max(5.0, args.seconds / 10)
        while time.monotonic() < deadline:
            await asyncio.sleep(min(step, max(0.0, deadline - time.monotonic())))
            samples.append((time.monotonic() - start, rss_mb(args.pid)))

    async def rss_after_warmup():
        await asyncio.sleep(warmup)
        return rss_mb(args.pid)
    results = await asyncio.gather(rss_after_warmup(), sample_rss(), *clients, return_exceptions=True)
    rss_start = results[0]
    for r in results[2:]:
        if isinstance(r, BaseException):
            stats.unexpected.append(f"a client failed: {r!r}")
    duration = time.monotonic() - start
    busy = await wait_idle(host, args.port)
    after = await metrics(host, args.port)
    rss_end = rss_mb(args.pid)
    tokens = after["specula_generation_tokens_total"] - before["specula_generation_tokens_total"]
    failed = {k.split('"')[1]: int(v - before.get(k, 0)) for k, v in after.items()
              if k.startswith("specula_requests_failed_total") and v - before.get(k, 0) > 0}

    print(f"duration            {duration:.0f} s ({args.clients} WebSocket + {args.clients} SSE clients)")
    print(f"requests            {stats.requests} sent, {stats.completed} completed")
    print(f"cancels             {stats.cancels}")
    print(f"disconnects         {stats.disconnects} (mid-stream, without a close)")
    print("outcomes by kind    " + ", ".join(f"{k} {v}" for k, v in sorted(stats.outcomes.items())))
    print("failed (server)     " + (", ".join(f"{k} {v}" for k, v in sorted(failed.items())) or "none"))
    print(f"tokens/s            {tokens / duration:.1f} ({int(tokens)} generated)")
    print(f"at the end          running {busy[0]:.0f}, waiting {busy[1]:.0f}, KV blocks in use {busy[2]:.0f}")
    print(f"memory (RSS)        idle {rss_idle:.0f} MB, after {warmup:.0f} s of load {rss_start:.0f} MB, end {rss_end:.0f} MB")
    print("memory over time    " + ", ".join(f"{t:.0f} s {m:.0f} MB" for t, m in samples))
    print(f"unexpected          {len(stats.unexpected)}")
    for u in stats.unexpected[:20]:
        print(f"  {u}")
    ok = True
    if stats.unexpected:
        ok = False
    if busy != (0, 0, 0):
        print("FAIL: the server did not come back to idle")
        ok = False
    if rss_end > rss_start + args.rss_slack_mb:
        print(f"FAIL: memory grew by {rss_end - rss_start:.0f} MB (bound {args.rss_slack_mb:.0f} MB)")
        ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    asyncio.run(main())
