"""--keylog-file: a real loopback capture of a proxied exchange, decrypted by tshark with our key log,
shows the HTTP request line and response status on BOTH TLS legs (client↔proxy and proxy↔origin)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from helpers import https, poll, run_curl


def test_key_log_decrypts_both_sides_in_tshark(start_proxy, origin, tmp_path, token):
    tshark = shutil.which("tshark")
    assert tshark, "tshark is needed (Debian package tshark; .ci/run installs it)"
    keys = tmp_path / "keys.log"
    p = start_proxy("--keylog-file", str(keys))
    pcap = tmp_path / "cap.pcapng"
    cap = subprocess.Popen([tshark, "-i", "lo", "-f", f"tcp port {p.port} or tcp port {origin.port}", "-w", str(pcap)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        started = b""
        deadline = time.monotonic() + 30
        while b"Capturing on" not in started:
            assert time.monotonic() < deadline and cap.poll() is None, f"tshark did not start: {started!r}"
            started += os.read(cap.stderr.fileno(), 4096)
        # "Capturing on" comes slightly before packets are really captured: knock on the proxy's port
        # until the capture file grows, so the exchanges below are seen from their first packet.
        size0 = pcap.stat().st_size if pcap.exists() else 0

        def knocked() -> bool:
            socket.create_connection(("127.0.0.1", p.port), timeout=5).close()
            return pcap.exists() and pcap.stat().st_size > size0

        poll(knocked, timeout=30, interval=0.2, what="tshark to capture packets")
        r = run_curl("--tlsv1.2", "--tls-max", "1.2", *https("good.test", origin, f"/hello?{token}"),
                     proxy_url=p.url, cacert=p.ca_pem)
        assert r.rc == 0, str(r)
        r = run_curl(*https("good.test", origin, f"/json?{token}"), proxy_url=p.url, cacert=p.ca_pem)  # TLS 1.3
        assert r.rc == 0, str(r)
        p.flows(2)
        time.sleep(0.5)  # let the last packets reach the capture file (bounded, not a correctness wait)
    finally:
        cap.send_signal(signal.SIGINT)
        cap.wait(20)
    assert keys.stat().st_mode & 0o777 == 0o600
    text = keys.read_text()
    assert "CLIENT_RANDOM" in text and "CLIENT_TRAFFIC_SECRET_0" in text  # TLS 1.2 and 1.3 lines
    out = subprocess.run(
        [tshark, "-r", str(pcap), "-o", f"tls.keylog_file:{keys}", "-d", f"tcp.port=={p.port},http",
         "-d", f"tcp.port=={origin.port},tls", "-Y", "http", "-T", "fields", "-e", "tcp.port",
         "-e", "http.request.line", "-e", "http.request.uri", "-e", "http.response.code"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for path in (f"/hello?{token}", f"/json?{token}"):
        legs = {ports for ports in (ln.split("\t")[0] for ln in lines if path in ln)}
        # Seen decrypted on the client leg (proxy port) and on the origin leg (origin port).
        assert any(str(p.port) in x for x in legs) and any(str(origin.port) in x for x in legs), (path, lines)
    assert sum("200" in ln.split("\t")[-1] for ln in lines) >= 4  # two responses, each on both legs
