"""The live status line: on a terminal (a real pseudo-terminal here), redrawn in place below the flow
lines without breaking them; never when the output is not a terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

from helpers import REPO_ROOT, clean_env, https, poll, run_curl

STATUS = re.compile(rb"\[(\d+) open \| [\d.]+ flows/s \| (\d+) flows \| [\d.]+ (?:B|kB|MB|GB) relayed\]")


def test_status_line_on_a_terminal(pki, origin, tmp_path):
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--listen-port", "0", "--confdir", str(tmp_path / "conf"),
         "--upstream-ca", str(pki.root_pem), "--no-store"],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=clean_env())
    os.close(slave)
    out = bytearray()

    def pump(until, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, f"timed out; terminal so far: {bytes(out)!r}"
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    out.extend(os.read(master, 65536))
                except OSError:
                    break

    try:
        port = None
        deadline = time.monotonic() + 20
        err = b""
        while port is None:
            assert time.monotonic() < deadline, err
            err += os.read(proc.stderr.fileno(), 4096)
            m = re.search(rb"listening on 127\.0\.0\.1:(\d+)", err)
            port = int(m.group(1)) if m else None
        pump(lambda: STATUS.search(out))  # drawn within a second or two
        assert STATUS.search(out).group(2) == b"0"
        r = run_curl(*https("good.test", origin, "/hello"), proxy_url=f"http://127.0.0.1:{port}",
                     cacert=tmp_path / "conf" / "httpsdump-ca.pem")
        assert r.rc == 0, str(r)
        pump(lambda: b"GET https://good.test/hello" in out and any(m.group(2) == b"1" for m in STATUS.finditer(out)))
        text = bytes(out)
        # The flow line starts at the beginning of a cleared line and ends with a newline: the status
        # line was erased before it and drawn again after it, never mixed into it.
        line = re.search(rb"\r\x1b\[2K([^\r\n]*GET https://good\.test/hello[^\r\n]*)\r?\n", text)
        assert line and b"flows/s" not in line.group(1), text[-2000:]
        assert b"200" in line.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        os.close(master)


def test_no_status_line_when_not_a_terminal(proxy, origin):
    r = run_curl(*https("good.test", origin, "/hello"), proxy_url=proxy.url, cacert=proxy.ca_pem)
    assert r.rc == 0
    proxy.flows(1)
    poll(lambda: "good.test/hello" in proxy.stdout_text(), what="the flow line")
    time.sleep(1.5)  # longer than one status interval: a status line would have been drawn by now
    assert "flows/s" not in proxy.stdout_text() and "\x1b[2K" not in proxy.stdout_text()
