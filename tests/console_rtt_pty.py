#!/usr/bin/python3
"""Keystroke-to-echo round trips of a console command run in a pseudo-terminal (for
`virsh console`, the baseline of docs/benchmarks.md (p)): waits for READY, presses Enter,
then types N characters one at a time, each after the last one's echo, and prints
{"ms": [...]} as one JSON line. Ctrl-U then clears the typed line and Ctrl-] detaches.

Usage: console_rtt_pty.py N READY -- COMMAND...
"""
import json
import os
import select
import subprocess
import sys
import time

n, ready = int(sys.argv[1]), sys.argv[2].encode()
cmd = sys.argv[sys.argv.index("--") + 1:]
master, slave = os.openpty()
p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
seen = b""


def wait_for(marker, seconds):
    global seen
    end = time.monotonic() + seconds
    while marker not in seen:
        left = end - time.monotonic()
        if left <= 0:
            raise SystemExit(json.dumps({"error": f"{marker!r} not seen", "seen": seen[-500:].decode(errors="replace")}))
        r, _, _ = select.select([master], [], [], left)
        if r:
            seen += os.read(master, 4096)


wait_for(ready, 30)
os.write(master, b"\r")
time.sleep(1)
times = []
for i in range(n):
    ch = "abcdefghijklmnopqrstuvwxyz"[i % 26].encode()
    seen = b""
    t0 = time.perf_counter()
    os.write(master, ch)
    wait_for(ch, 10)
    times.append((time.perf_counter() - t0) * 1000)
os.write(master, b"\x15\x1d")
try:
    p.wait(timeout=10)
except subprocess.TimeoutExpired:
    p.kill()
print(json.dumps({"ms": times}), flush=True)
