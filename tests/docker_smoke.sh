#!/usr/bin/env bash
# Docker smoke test: build ./Dockerfile and run httpsdump from the image against a local HTTPS origin.
#
#   tests/docker_smoke.sh            (as root; CI runs it from .ci/run after the test suite)
#
# There is no Docker engine here: the image is built and run with podman by the shared tool
# docker-build-check.sh (found next to the clone: $(dirname REPO)/shared/tools/, or $DBC_TOOL). Its
# smoke container runs with --network host, so it reaches an origin started on this host's loopback.
#
# Steps, all on 127.0.0.1:
#   1. a throw-away CA and a leaf for localhost/127.0.0.1 (openssl), an origin `openssl s_server -WWW`
#      serving a file with a random token;
#   2. build the image; in a container of it, as its own user: start httpsdump (--allow-any-client,
#      --upstream-ca = the throw-away CA, --log-file), check that it runs the compiled build of the hot
#      modules, export its CA with `httpsdump ca export` (what the ca-cert service of docker-compose.yml
#      does), fetch https://localhost:PORT/token.txt through it
#      with https_proxy + SSL_CERT_FILE = that CA (the compose client's setup), check the body, the JSON
#      Lines flow (origin verified) and that without the CA the client refuses; SIGTERM -> exit 0;
#   3. check docker-compose.yml's structure (python3-yaml).
# Exit status: 0 OK; non-zero with the reason on stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
tool=${DBC_TOOL:-$(dirname "$repo")/shared/tools/docker-build-check.sh}
[[ -x $tool ]] || { echo "docker_smoke: $tool not found (set DBC_TOOL)" >&2; exit 2; }
for t in openssl python3; do
  command -v "$t" >/dev/null || { echo "docker_smoke: needs $t" >&2; exit 2; }
done
t0=$SECONDS
log() { printf '[docker_smoke %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

work=$(mktemp -d /tmp/httpsdump-docker-smoke.XXXXXX)
origin_pid=""
cleanup() {
  if [[ -n $origin_pid ]]; then kill "$origin_pid" 2>/dev/null || true; wait "$origin_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- 1. throw-away PKI and the origin ------------------------------------------------------------
cd "$work"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout root.key -out root.pem -days 2 \
  -subj "/CN=httpsdump docker smoke root" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key -out leaf.csr \
  -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n' >leaf.ext
openssl x509 -req -in leaf.csr -CA root.pem -CAkey root.key -CAcreateserial -out leaf.pem -days 2 \
  -extfile leaf.ext 2>/dev/null
mkdir www
token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
printf 'httpsdump docker smoke %s\n' "$token" >www/token.txt
origin_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd www && exec openssl s_server -quiet -accept "127.0.0.1:$origin_port" -cert ../leaf.pem -key ../leaf.key -WWW) \
  >"$work/origin.log" 2>&1 </dev/null &
origin_pid=$!
for ((i = 0; i < 100; i++)); do
  (exec 3<>"/dev/tcp/127.0.0.1/$origin_port") 2>/dev/null && break
  kill -0 "$origin_pid" 2>/dev/null || { cat "$work/origin.log" >&2; log "the origin did not start"; exit 1; }
  sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$origin_port") 2>/dev/null || { log "the origin is not listening on $origin_port"; exit 1; }
log "origin https://localhost:$origin_port/token.txt (openssl s_server, pid $origin_pid)"

# --- 2. the image, and the smoke run inside it -------------------------------------------------
# Runs in the container (/bin/sh -c, user httpsdump, host network). Everything it needs is inline.
read -r -d '' inner <<'PY' || true
import json, os, signal, ssl, subprocess, sys, threading, time, urllib.error, urllib.request

ORIGIN = int(os.environ["ORIGIN_PORT"])
TOKEN = os.environ["TOKEN"]
D = "/tmp/smoke"
url = f"https://localhost:{ORIGIN}/token.txt"


def fail(msg):
    print(f"SMOKE FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


proxy = subprocess.Popen(
    ["httpsdump", "--listen-host", "127.0.0.1", "--listen-port", "0", "--allow-any-client", "--confdir", f"{D}/conf",
     "--upstream-ca", f"{D}/upstream-ca.pem", "--log-file", f"{D}/flows.jsonl"],
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
lines = []
threading.Thread(target=lambda: lines.extend(proxy.stderr), daemon=True).start()
deadline = time.monotonic() + 30
port = None
while port is None:
    for line in list(lines):
        if line.startswith("httpsdump: listening on 127.0.0.1:"):
            port = int(line.rsplit(":", 1)[1])
    if port is None:
        if proxy.poll() is not None or time.monotonic() > deadline:
            fail(f"httpsdump did not start (exit {proxy.poll()}): {''.join(lines)[-2000:]}")
        time.sleep(0.05)
print(f"httpsdump runs in the image, listening on 127.0.0.1:{port}")
st = subprocess.run(["python", "-m", "proxy.accel_build", "--status"], capture_output=True, text=True, timeout=30)
if st.returncode != 0:
    fail(f"the image must run the compiled build of the hot modules: {st.stdout}{st.stderr}")
print(f"the image's {st.stdout.strip()}")

# what the ca-cert service of docker-compose.yml does: the certificate, never the key
os.makedirs(f"{D}/ca-public")
r = subprocess.run(["httpsdump", "ca", "export", "--confdir", f"{D}/conf", "-o", f"{D}/ca-public/httpsdump-ca.pem"],
                   capture_output=True, text=True, timeout=30)
pem = open(f"{D}/ca-public/httpsdump-ca.pem").read() if r.returncode == 0 else ""
if r.returncode != 0 or "BEGIN CERTIFICATE" not in pem or "PRIVATE KEY" in pem:
    fail(f"ca export: exit {r.returncode} {r.stderr} {pem[:100]!r}")

client = ("import sys, urllib.request\n"
          "print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode(), end='')\n")
env = {"PATH": os.environ["PATH"], "https_proxy": f"http://127.0.0.1:{port}"}  # the compose client's setup
good = subprocess.run(["python", "-c", client, url], capture_output=True, text=True, timeout=60,
                      env={**env, "SSL_CERT_FILE": f"{D}/ca-public/httpsdump-ca.pem"})
if good.returncode != 0 or good.stdout != f"httpsdump docker smoke {TOKEN}\n":
    fail(f"fetch through the proxy: exit {good.returncode}, body {good.stdout!r}, {good.stderr[-1500:]}")
print(f"fetched {url} through httpsdump, trusting only its CA: {good.stdout.strip()}")
bad = subprocess.run(["python", "-c", client, url], capture_output=True, text=True, timeout=60, env=env)
if bad.returncode == 0 or "CERTIFICATE_VERIFY_FAILED" not in bad.stderr:
    fail(f"without the CA the client must refuse the proxy: exit {bad.returncode} {bad.stderr[-500:]}")
print("without httpsdump's CA the same client refuses: CERTIFICATE_VERIFY_FAILED")

deadline = time.monotonic() + 15
flows = []
while time.monotonic() < deadline:
    try:
        flows = [json.loads(x) for x in open(f"{D}/flows.jsonl")]
    except FileNotFoundError:
        flows = []
    if any(f.get("response") for f in flows):
        break
    time.sleep(0.05)
ok = [f for f in flows if f.get("response") and f["request"]["host"] == "localhost" and f["request"]["port"] == ORIGIN]
if not ok:
    fail(f"no successful flow in the log: {json.dumps(flows)[:2000]}")
f = ok[0]
if not (f["response"]["status"] == 200 and f["tls"]["upstream"]["verified"] is True and f["insecure"] is False
        and TOKEN in (f["response"]["body"].get("text") or "")):
    fail(f"unexpected flow: {json.dumps(f)[:2000]}")
print(f"flow logged: {f['request']['url']} -> {f['response']['status']}, origin verified "
      f"({f['tls']['upstream']['cert']['issuer']})")

proxy.send_signal(signal.SIGTERM)
try:
    rc = proxy.wait(15)
except subprocess.TimeoutExpired:
    proxy.kill()
    fail("httpsdump did not exit within 15 s of SIGTERM")
if rc != 0:
    fail(f"httpsdump exited {rc} after SIGTERM: {''.join(lines)[-2000:]}")
print("SIGTERM: httpsdump exited 0")
PY

smoke="set -eu
mkdir -p /tmp/smoke
cat >/tmp/smoke/upstream-ca.pem <<'PEM'
$(cat "$work/root.pem")
PEM
ORIGIN_PORT=$origin_port TOKEN=$token python - <<'INNER'
$inner
INNER
echo 'httpsdump docker smoke: all checks passed'"

tag=localhost/httpsdump:smoke
log "building $repo/Dockerfile as $tag and running the smoke checks (via $tool)"
DBC_SMOKE_TIMEOUT=${DBC_SMOKE_TIMEOUT:-180} "$tool" -t "$tag" -T "${DOCKER_BUILD_TIMEOUT:-1500}" "$repo" "$smoke"

# --- 3. docker-compose.yml ------------------------------------------------------------------------
python3 - "$repo/docker-compose.yml" <<'PY'
import sys
import yaml  # Debian: python3-yaml (.ci/run installs it)

doc = yaml.safe_load(open(sys.argv[1]))
s = doc["services"]
problems = []
p, c, x = s["proxy"], s["client"], s["ca-cert"]
if p.get("build") != "." or p.get("ports") != ["127.0.0.1:8080:8080"]:
    problems.append("proxy: must build . and publish 127.0.0.1:8080:8080 only")
if "httpsdump-ca:/home/httpsdump/.httpsdump" not in p.get("volumes", []):
    problems.append("proxy: the confdir volume must be mounted at the image's confdir")
if not any(v.startswith("httpsdump-ca:") and v.endswith(":ro") for v in x.get("volumes", [])):
    problems.append("ca-cert: must mount the confdir read-only")
if x.get("command", [])[:2] != ["ca", "export"] or "/ca-public/httpsdump-ca.pem" not in x["command"]:
    problems.append("ca-cert: must run `ca export` into ca-public")
if any(v.startswith("httpsdump-ca:") for v in c.get("volumes", [])):
    problems.append("client: must not see the volume that holds the CA key")
env = c.get("environment", {})
if env.get("https_proxy") != "http://proxy:8080" or env.get("CURL_CA_BUNDLE") != "/ca/httpsdump-ca.pem":
    problems.append("client: https_proxy and CURL_CA_BUNDLE")
if set(doc.get("volumes", {})) != {"httpsdump-ca", "ca-public"}:
    problems.append("named volumes")
if problems:
    sys.exit("docker-compose.yml: " + "; ".join(problems))
print("docker-compose.yml: structure OK (not run: no compose engine here)")
PY
log "all docker smoke checks passed in $((SECONDS - t0)) s"
