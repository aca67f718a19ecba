"""Interactive client of the text generation server: reads prompts, sends them to ``PUT /api``, prints the text.

Usage::

    python tools/text_generation_cli.py 127.0.0.1:5000 [--tokens-to-generate 64] [--temperature 0.8] [--top-k 1]

Each line read is one prompt (an empty line is skipped). At a terminal it prompts for input like Megatron's CLI
(without asking for the token count every time: that is ``--tokens-to-generate``); with piped input it prints one
answer per prompt and stops at end of input. Exit status 1 when any request failed. Standard library only, so it runs
anywhere Python does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from typing import Any
from urllib.parse import urlsplit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", metavar="HOST:PORT", help="server address, e.g. 127.0.0.1:5000 (http:// optional)")
    p.add_argument("--tokens-to-generate", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="1 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--random-seed", type=int, default=None)
    p.add_argument("--add-bos", action="store_true")
    p.add_argument("--stop-on-eol", action="store_true")
    p.add_argument("--logprobs", action="store_true", help="also print the log-probabilities")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one answer")
    return p.parse_args(argv)


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"error: cannot read a server address from {url!r} (expected HOST:PORT)")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return cls(parts.hostname, parts.port or 5000, timeout=timeout), (parts.path.rstrip("/") or "") + "/api"


def request_body(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"prompts": [prompt], "tokens_to_generate": args.tokens_to_generate}
    for key, value in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p),
                       ("random_seed", args.random_seed)):
        if value is not None:
            body[key] = value
    if args.add_bos:
        body["add_BOS"] = True
    if args.stop_on_eol:
        body["stop_on_eol"] = True
    if args.logprobs:
        body["logprobs"] = True
    return body


def generate(conn: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode("utf-8")
    conn.request("PUT", path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    raw = response.read()
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        payload = {"message": raw.decode("utf-8", errors="replace")}
    return response.status, payload


def _prompts(interactive: bool):
    while True:
        try:
            line = input("Enter prompt: ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        line = line.rstrip("\n")
        if line.strip():
            yield line


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    conn, path = _connection(args.url, args.timeout)
    interactive = sys.stdin.isatty()
    failures = 0
    try:
        for prompt in _prompts(interactive):
            try:
                status, payload = generate(conn, path, request_body(args, prompt))
            except (OSError, http.client.HTTPException) as e:
                conn.close()  # reconnect on the next request
                print(f"Error: cannot reach the server at {args.url}: {e}", file=sys.stderr)
                failures += 1
                continue
            if status != 200:
                message = payload.get("message") or payload.get("error", {}).get("message") or payload
                print(f"Error {status}: {message}", file=sys.stderr)
                failures += 1
                continue
            print("Megatron Response: ")
            print(payload["text"][0], flush=True)
            if args.logprobs and payload.get("logprobs"):
                print("logprobs:", json.dumps(payload["logprobs"][0]), flush=True)
    except KeyboardInterrupt:
        print()
    finally:
        conn.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
