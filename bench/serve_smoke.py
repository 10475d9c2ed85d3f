#!/usr/bin/env python3
"""One request over each door of a running `specula serve`: the WebSocket and the OpenAI
API (plain and streamed). Prints what came back; exits non-zero unless all three answered.
Python standard library only (run by bench/serve_smoke.sh).

    python3 bench/serve_smoke.py --port PORT [--prompt TEXT] [--max-tokens N]
"""

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from soak_client import WebSocket  # noqa: E402  (the minimal RFC 6455 client)


async def websocket(port, prompt, max_tokens):
    ws = await WebSocket.connect("127.0.0.1", port)
    await ws.send_json({"type": "generate", "id": "smoke", "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": prompt}]})
    text = ""
    while True:
        frame = await ws.recv()
        if not isinstance(frame, dict) or frame.get("type") not in ("delta", "done"):
            raise SystemExit(f"websocket: unexpected frame {frame}")
        if frame["type"] == "done":
            await ws.close()
            return text, frame
        text += frame["text"]


def openai(port, prompt, max_tokens, stream):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as resp:
        model = json.load(resp)["data"][0]["id"]
    body = {"model": model, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": prompt}]}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        resp = urllib.request.urlopen(req, timeout=120)
    except urllib.error.HTTPError as e:
        raise SystemExit(f"openai: {e.code} {e.read().decode()}") from None
    with resp:
        if not stream:
            reply = json.load(resp)
            return reply["choices"][0]["message"]["content"], reply["usage"]
        text, events = "", 0
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events += 1
            for choice in json.loads(line[6:]).get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
        return text, f"{events} SSE events"


def main():
    args = argparse.ArgumentParser()
    args.add_argument("--port", type=int, required=True)
    args.add_argument("--prompt", default="What is the capital of France?")
    args.add_argument("--max-tokens", type=int, default=32)
    a = args.parse_args()
    text, done = asyncio.run(websocket(a.port, a.prompt, a.max_tokens))
    print(f"websocket   {text!r}\n            done: {json.dumps(done)}")
    for stream in (False, True):
        text, extra = openai(a.port, a.prompt, a.max_tokens, stream)
        print(f"openai{' sse' if stream else '    '}  {text!r}\n            {extra}")
        if not text.strip():
            raise SystemExit("openai: empty answer")


if __name__ == "__main__":
    main()
