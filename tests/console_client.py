#!/usr/bin/python3
"""A console client nobody here wrote the WebSocket side of (Python's `websockets`), for
tests/vm_console.rs. It attaches to ws://ADDR/vms/NAME/console/attach and reports what
happens as JSON lines on stdout:

  {"event": "refused", "status": 409, "body": "..."}   the upgrade was answered otherwise
  {"event": "open", "subprotocol": "..."}
  {"event": "saw", "ms": 12.3}                          EXPECT appeared in the output
  {"event": "closed", "code": 4001, "reason": "..."}    the agent closed the session

Usage: console_client.py ADDR NAME TOKEN [--force] [--send TEXT] [--expect TEXT]
       [--hold SECONDS] [--subprotocol-token] [--rtt N]
--hold: stay attached (reading) that long after EXPECT, then close (code 1000).
--rtt N: then type N single characters one at a time, each after the last one's echo,
and report {"event": "rtt", "ms": [...]}.
"""
import argparse
import asyncio
import base64
import json
import socket
import sys
import time

import websockets


def say(**kw):
    print(json.dumps(kw), flush=True)


async def read_until(ws, marker, timeout):
    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{marker!r} not seen; got {seen[-300:]!r}")
        msg = await asyncio.wait_for(ws.recv(), left)
        seen += msg if isinstance(msg, bytes) else msg.encode()
    return seen


async def rtt(ws, n):
    times = []
    for i in range(n):
        ch = "abcdefghijklmnopqrstuvwxyz"[i % 26]
        t0 = time.perf_counter()
        await ws.send(ch.encode())
        await read_until(ws, ch, 10)
        times.append((time.perf_counter() - t0) * 1000)
    await ws.send(b"\x15")  # Ctrl-U: the shell forgets the typed line
    say(event="rtt", ms=times)


async def probe(a):
    """A raw upgrade request: the agent's answer's status and JSON body."""
    host, port = a.addr.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if a.stall:
        # A reader that stops reading: a tiny window, so the agent's side fills soon.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    r, w = await asyncio.open_connection(sock=sock)
    w.write((f"GET /vms/{a.name}/console/attach HTTP/1.1\r\nHost: {a.addr}\r\n"
             f"Authorization: Bearer {a.token}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
             "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
    status = int(head.split()[1])
    length = 0
    for line in head.decode().split("\r\n"):
        if line.lower().startswith("content-length:"):
            length = int(line.split(":")[1])
    body = await asyncio.wait_for(r.readexactly(length), 30) if length else b""
    say(event="refused" if status != 101 else "open", status=status, body=body.decode(errors="replace"))
    if status == 101 and a.wait_ping:
        await first_ping(r, a.wait_ping)
    if status == 101 and a.stall:
        if a.send:
            w.write(masked(a.send.encode()))
            await w.drain()
        await asyncio.sleep(a.stall)
        say(event="stalled", s=a.stall)
    w.close()


def masked(data):
    """One binary frame from a client (masked, with a zero mask)."""
    n = len(data)
    head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    return head + b"\0\0\0\0" + data


async def first_ping(r, seconds):
    """Reads raw frames (the agent's are unmasked) until a ping: {"event": "ping", "s": ...}."""
    t0 = time.monotonic()
    while True:
        left = seconds - (time.monotonic() - t0)
        if left <= 0:
            return say(event="no-ping", s=seconds)
        try:
            b0, b1 = await asyncio.wait_for(r.readexactly(2), left)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            return say(event="no-ping", s=time.monotonic() - t0)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await r.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await r.readexactly(8), "big")
        await r.readexactly(n)
        if b0 & 0x0F == 0x9:
            return say(event="ping", s=time.monotonic() - t0)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("addr")
    p.add_argument("name")
    p.add_argument("token")
    p.add_argument("--force", action="store_true")
    p.add_argument("--send")
    p.add_argument("--expect")
    p.add_argument("--hold", type=float, default=0)
    p.add_argument("--subprotocol-token", action="store_true")
    p.add_argument("--rtt", type=int, default=0)
    p.add_argument("--probe", action="store_true")
    p.add_argument("--wait-ping", type=float, default=0)
    p.add_argument("--stall", type=float, default=0)
    a = p.parse_args()
    if a.probe or a.wait_ping or a.stall:
        return await probe(a)
    url = f"ws://{a.addr}/vms/{a.name}/console/attach?force={'true' if a.force else 'false'}"
    kw = {"open_timeout": 30, "ping_interval": None, "max_size": None}
    if a.subprotocol_token:
        tok = base64.urlsafe_b64encode(a.token.encode()).decode().rstrip("=")
        kw["subprotocols"] = ["base64url.bearer.authorization.k8s.io." + tok, "console.node-vm-agent"]
    else:
        kw["extra_headers"] = {"Authorization": f"Bearer {a.token}"}
    try:
        ws = await websockets.connect(url, **kw)
    except websockets.exceptions.InvalidStatusCode as e:
        body = getattr(e, "body", b"") or b""
        say(event="refused", status=e.status_code, body=body.decode(errors="replace") if isinstance(body, bytes) else str(body))
        return
    except websockets.exceptions.InvalidHandshake as e:
        say(event="refused", status=0, body=str(e))
        return
    say(event="open", subprotocol=ws.subprotocol)
    try:
        if a.send:
            t0 = time.perf_counter()
            await ws.send(a.send.encode())
            if a.expect:
                await read_until(ws, a.expect, 60)
                say(event="saw", ms=(time.perf_counter() - t0) * 1000)
        if a.rtt:
            await rtt(ws, a.rtt)
        if a.hold:
            end = time.monotonic() + a.hold
            while time.monotonic() < end:
                try:
                    await asyncio.wait_for(ws.recv(), end - time.monotonic())
                except asyncio.TimeoutError:
                    break
        await ws.close()
        say(event="closed", code=ws.close_code, reason=ws.close_reason, by="client")
    except websockets.exceptions.ConnectionClosed as e:
        say(event="closed", code=e.code, reason=e.reason, by="agent")
    except TimeoutError as e:
        say(event="timeout", error=str(e))


asyncio.run(main())
