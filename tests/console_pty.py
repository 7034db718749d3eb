#!/usr/bin/python3
"""Drives `node-vm-agent console NAME` through a pseudo-terminal, for tests/vm_console.rs:
types SEND, waits for EXPECT, types Ctrl-], and reports as one JSON line whether the
command exited, with what status, and whether the terminal's settings were given back
as they were (compared with tcgetattr before and after).

Usage: console_pty.py EXPECT SEND -- COMMAND...
"""
import json
import os
import select
import subprocess
import sys
import termios
import time

expect, send = sys.argv[1].encode(), sys.argv[2].encode()
cmd = sys.argv[sys.argv.index("--") + 1:]
master, slave = os.openpty()
before = termios.tcgetattr(slave)
p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
seen = b""


def read_for(seconds, until=None):
    global seen
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                seen += os.read(master, 4096)
            except OSError:
                return False
        if until is not None and until in seen:
            return True
        if p.poll() is not None and not r:
            return until is None
    return until is None


attached = read_for(30, b"Escape character")
raw_while_attached = not (termios.tcgetattr(slave)[3] & termios.ICANON)
os.write(master, send)
saw = read_for(60, expect)
os.write(master, b"\x1d")
try:
    status = p.wait(timeout=10)
except subprocess.TimeoutExpired:
    p.kill()
    status = None
read_for(0.5)
after = termios.tcgetattr(slave)
print(json.dumps({
    "attached": attached,
    "raw_while_attached": raw_while_attached,
    "saw": saw,
    "status": status,
    "restored": before == after,
    "output": seen.decode(errors="replace")[-2000:],
}), flush=True)
