"""Runs the benchmark cases, alternating and repeated, and prints medians.

Every server listens on a free 127.0.0.1 port; everything stops at the end.
With --train, runs each case once, briefly, with more shapes of request:
the training load of the profile-guided build (scripts/build-release).
"""
import base64, collections, http.client, json, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, time, urllib.request

TRAIN = "--train" in sys.argv[1:]
REPEATS = 1 if TRAIN else int(os.environ.get("BENCH_REPEATS", "5"))
LOGIN_CLIENTS = 16
SESSIONS = 2_000 if TRAIN else 10_000
SECONDS = 2 if TRAIN else int(os.environ.get("BENCH_SECONDS", "3"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The optimized build (scripts/build-release), or another given.
RELEASE = os.path.abspath(os.environ.get("BENCH_RELEASE", os.path.join(ROOT, "target", "pgo", "release")))
# The session check behind nginx auth_request, and the passkey and session clients.
TOOLS = os.path.join(RELEASE, "bench-tools")
PASSWORD = "Bench password 42!"
BODY = "x" * 1024
# nginx in front of a PBX as operators configure it: keep-alive to the PBX,
# and the Host, client address and scheme passed on, as pbxgate passes them.
PROXY = ("proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ''; "
         "proxy_set_header Host $host; proxy_set_header X-Real-IP $remote_addr; "
         "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; "
         "proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $host;")
# And the forward-auth pattern as Authelia documents it for nginx: the check's
# answer says who the user is, and that goes to the PBX.
AUTH_REQUEST = ("auth_request /_auth; auth_request_set $user $upstream_http_remote_user; "
                "auth_request_set $groups $upstream_http_remote_groups; "
                "proxy_set_header Remote-User $user; proxy_set_header Remote-Groups $groups;")
procs = []
# A started gateway: its process, a signed-in session's cookie, how long it took to
# get ready, and its ports.
Gateway = collections.namedtuple("Gateway", "proc cookie ready_ms plain https admin")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, **kw):
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
    procs.append(p)
    return p


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"nothing listens on {port}")


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total


def machine_ticks():
    """Busy time of the whole machine (every core, every process), in ticks."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


def nginx_pids(master):
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return [master] + [int(p) for p in out]


def wrk(url, conns, seconds, cookie):
    threads = 1 if conns == 1 else 2
    args = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "-H", "Host: localhost"]
    if cookie:
        args += ["-H", header(cookie)]
    out = subprocess.run(args + [url], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        sys.exit(f"{url}: {non2xx.group(1)} failed responses\n{out}")
    return rps, reqs, pct(50), pct(99)


def header(credential):
    """A session cookie, or a whole header line (Basic credentials)."""
    return credential if ":" in credential else f"Cookie: {credential}"


def metric(admin_port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics").read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def rss_mb(pid):
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def h2load(url, cookie):
    args = ["h2load", "-c", "64", "-m", "1", "-D", str(SECONDS), "-H", header(cookie) if cookie else "x-bench: 1", url]
    out = subprocess.run(args, capture_output=True, text=True).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    failed = re.search(r"(\d+) failed", out)
    if not m or (failed and int(failed.group(1)) > 0):
        sys.exit(f"h2load {url} failed:\n{out}")
    return float(m.group(1))


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def main():
    tmp = tempfile.mkdtemp(prefix="pbxgate-bench-")
    try:
        run(tmp)
    finally:
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def nginx(tmp, name, server_block, upstreams=""):
    conf = f"""
worker_processes 2;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/{name}-body;
  proxy_temp_path {tmp}/{name}-proxy;
  fastcgi_temp_path {tmp}/{name}-fcgi;
  uwsgi_temp_path {tmp}/{name}-uwsgi;
  scgi_temp_path {tmp}/{name}-scgi;
  keepalive_requests 1000000;
  {upstreams}
  server {{ {server_block} }}
}}
"""
    path = write(f"{tmp}/{name}.conf", conf)
    return start(["nginx", "-c", path, "-g", "daemon off;"])


def run(tmp):
    ports = {k: free_port() for k in ["up", "plain", "auth", "check", "ssl", "redis", "pe", "pet", "pr", "prt", "ae", "ar"]}
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", f"{tmp}/key.pem", "-out", f"{tmp}/cert.pem", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    start(["redis-server", "--port", str(ports["redis"]), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    wait_port(ports["redis"])
    subprocess.run(["redis-cli", "-p", str(ports["redis"]), "SET", "session:bench", "bench"], check=True, capture_output=True)

    up = f"default_type text/plain; location / {{ return 200 '{BODY}'; }}"
    nginx(tmp, "upstream", f"listen 127.0.0.1:{ports['up']} reuseport backlog=4096; {up}")
    upstream = f"upstream up {{ server 127.0.0.1:{ports['up']}; keepalive 128; }}"
    masters = {}
    masters["nginx-plain"] = nginx(tmp, "plain", f"listen 127.0.0.1:{ports['plain']}; location / {{ {PROXY} }}", upstream)
    start([TOOLS, "session-check", f"127.0.0.1:{ports['check']}", f"redis://127.0.0.1:{ports['redis']}/0"])
    auth_up = upstream + f" upstream check {{ server 127.0.0.1:{ports['check']}; keepalive 128; }}"
    auth = (f"listen 127.0.0.1:{ports['auth']}; location / {{ {AUTH_REQUEST} {PROXY} }} "
            "location = /_auth { internal; proxy_pass http://check; proxy_http_version 1.1; proxy_set_header Connection ''; "
            "proxy_pass_request_body off; proxy_set_header Content-Length ''; }")
    masters["nginx-auth_request"] = nginx(tmp, "auth", auth, auth_up)
    ssl = (f"listen 127.0.0.1:{ports['ssl']} ssl http2; ssl_certificate {tmp}/cert.pem; ssl_certificate_key {tmp}/key.pem; "
           f"location / {{ {PROXY} }}")
    masters["nginx-ssl"] = nginx(tmp, "ssl", ssl, upstream)

    write(f"{tmp}/policy.toml", 'domains = ["localhost"]\n'
          '[[route]]\npath = "/api/"\naccess = "api"\n[[route]]\npath = "/"\naccess = "user"\n'
          '[[user]]\nname = "bench"\npassword_login = true\n'
          '[[user]]\nname = "api"\nrole = "api"\nbasic_auth = true\nnetworks = ["127.0.0.1/32"]\n'
          + "".join(f'[[user]]\nname = "bench-{i}"\npassword_login = true\n' for i in range(LOGIN_CLIENTS)))
    pbx = os.path.join(RELEASE, "pbxgate")
    gateways = {}
    for name, store, plain, https, admin in [("embedded", "embedded://store-e.db", "pe", "pet", "ae"),
                                            ("redis", f"redis://127.0.0.1:{ports['redis']}/1", "pr", "prt", "ar")]:
        # Measured with access lines off, as nginx's are. Training also runs
        # them as the example configuration writes them, on the embedded one.
        logged = TRAIN and name == "embedded"
        conf = write(f"{tmp}/gateway-{name}.toml", f"""
policy_file = "policy.toml"
public_url = "https://localhost:{ports[https]}"
[listen]
https = "127.0.0.1:{ports[https]}"
http = "127.0.0.1:{ports[plain]}"
admin = "127.0.0.1:{ports[admin]}"
[tls]
self_signed = true
[upstream]
url = "http://127.0.0.1:{ports['up']}"
[store]
url = "{store}"
[log]
format = "{'pretty' if logged else 'json'}"
""")
        # The passkey clients (bench-N) sign in with it first, to register their passkeys.
        users = ["bench", "api"] + ([f"bench-{i}" for i in range(LOGIN_CLIENTS)] if name == "redis" else [])
        for user in users:
            subprocess.run([pbx, "user", "set-password", user, "--config", conf], input=PASSWORD + "\n",
                           text=True, check=True, capture_output=True)
        started = time.time()
        p = start([pbx, "serve", "--config", conf], env=dict(os.environ, RUST_LOG="info" if logged else "warn"))
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{ports[admin]}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.005)
            if time.time() - started > 20:
                sys.exit("pbxgate did not get ready")
        ready_ms = (time.time() - started) * 1000
        req = urllib.request.Request(f"http://127.0.0.1:{ports[plain]}/.pbxgate/api/password/login",
                                     data=json.dumps({"login": "bench", "password": PASSWORD}).encode(),
                                     headers={"Host": "localhost", "Origin": f"https://localhost:{ports[https]}",
                                              "Content-Type": "application/json"}, method="POST")
        cookie = None
        with urllib.request.urlopen(req) as r:
            for k, v in r.headers.items():
                if k.lower() == "set-cookie" and v.startswith("__Host-pbxgate="):
                    cookie = v.split(";")[0]
        gateways[name] = Gateway(p, cookie, ready_ms, ports[plain], ports[https], ports[admin])

    BASIC = "Authorization: Basic " + base64.b64encode(f"api:{PASSWORD}".encode()).decode()
    cases = [
        ("direct", f"http://127.0.0.1:{ports['up']}/", None, None),
        ("nginx-auth_request", f"http://127.0.0.1:{ports['auth']}/", "s=bench", masters["nginx-auth_request"].pid),
        ("pbxgate-embedded", f"http://127.0.0.1:{ports['pe']}/", gateways["embedded"].cookie, gateways["embedded"].proc.pid),
        # Between the two gateways: each ratio to it compares neighbours, as
        # the machine's speed drifts over the seconds a round takes.
        ("nginx-plain", f"http://127.0.0.1:{ports['plain']}/", None, masters["nginx-plain"].pid),
        ("pbxgate-redis", f"http://127.0.0.1:{ports['pr']}/", gateways["redis"].cookie, gateways["redis"].proc.pid),
        ("pbxgate-redis-basic", f"http://127.0.0.1:{ports['pr']}/api/", BASIC, gateways["redis"].proc.pid),
        ("nginx-ssl", f"https://127.0.0.1:{ports['ssl']}/", None, masters["nginx-ssl"].pid),
        ("pbxgate-redis-tls", f"https://127.0.0.1:{ports['prt']}/", gateways["redis"].cookie, gateways["redis"].proc.pid),
    ]
    before_basic = metric(gateways["redis"].admin, "pbxgate_password_verifications_total")
    results = {name: {"rps": [], "p50": [], "p99": [], "p50_1": [], "p99_1": [], "cpu_us": [], "rest_us": [], "h2": []}
               for name, *_ in cases}
    for round_ in range(REPEATS):
        # Every other round in reverse: no case always runs just after another.
        for name, url, cookie, pid in cases if round_ % 2 == 0 else cases[::-1]:
            pids = ([pid] if name.startswith("pbxgate") else nginx_pids(pid)) if pid else []
            before, machine_before = cpu_ticks(pids), machine_ticks()
            rps, reqs, p50, p99 = wrk(url, 64, SECONDS, cookie)
            hz = os.sysconf("SC_CLK_TCK")
            cpu = (cpu_ticks(pids) - before) / hz
            machine = (machine_ticks() - machine_before) / hz
            _, _, p50_1, p99_1 = wrk(url, 1, 1, cookie)
            r = results[name]
            r["rps"].append(rps); r["p50"].append(p50); r["p99"].append(p99)
            r["p50_1"].append(p50_1); r["p99_1"].append(p99_1)
            if pids:
                r["cpu_us"].append(cpu / reqs * 1e6)
            # wrk, the upstream and the proxy's own helpers (Redis, the session check).
            r["rest_us"].append((machine - cpu) / reqs * 1e6)
            if url.startswith("https"):
                r["h2"].append(h2load(url.replace("127.0.0.1", "localhost"), cookie))
            print(f"round {round_ + 1}/{REPEATS} {name}: {rps:.0f} req/s", file=sys.stderr)

    if TRAIN:
        shapes(gateways["redis"].plain, gateways["redis"].cookie)
        clients(gateways["redis"])
        return
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    print(f"\npbxgate benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, loopback, "
          f"{REPEATS} alternated runs of {SECONDS}s, medians; 1 KiB responses\n")
    print("| case | req/s @64 | p50 ms @64 | p99 ms @64 | p50 ms @1 | p99 ms @1 | CPU µs/req | rest µs/req "
          "| h2 req/s @64 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    # Shown in the usual order: nginx-plain after direct, whatever order it ran in.
    shown = [name for name, *_ in cases if name != "nginx-plain"]
    shown.insert(1, "nginx-plain")
    for name in shown:
        r = results[name]
        h2 = f"{med(r['h2']):.0f}" if r["h2"] else ""
        cpu = f"{med(r['cpu_us']):.1f}" if r["cpu_us"] else ""
        print(f"| {name} | {med(r['rps']):.0f} | {med(r['p50']):.2f} | {med(r['p99']):.2f} | {med(r['p50_1']):.3f} "
              f"| {med(r['p99_1']):.3f} | {cpu} | {med(r['rest_us']):.1f} | {h2} |")
    rps = {name: med(results[name]["rps"]) for name, *_ in cases}

    def rounds(a, b):
        """Each round's own ratio: the cases of a round ran back to back."""
        return ", ".join(f"{x / y:.2f}" for x, y in zip(results[a]["rps"], results[b]["rps"]))

    print()
    for gw in ["pbxgate-embedded", "pbxgate-redis"]:
        print(f"- {gw} / nginx-plain: {rps[gw] / rps['nginx-plain']:.3f}x (rounds {rounds(gw, 'nginx-plain')}); "
              f"/ nginx-auth_request: {rps[gw] / rps['nginx-auth_request']:.3f}x "
              f"(rounds {rounds(gw, 'nginx-auth_request')}); p99 @64 vs nginx-plain: "
              f"{med(results[gw]['p99']) - med(results['nginx-plain']['p99']):+.2f} ms; p50 @1: "
              f"{med(results[gw]['p50_1']) - med(results['nginx-plain']['p50_1']):+.3f} ms; p99 @1: "
              f"{med(results[gw]['p99_1']) - med(results['nginx-plain']['p99_1']):+.3f} ms")
    tls, ssl = results["pbxgate-redis-tls"], results["nginx-ssl"]
    print(f"- pbxgate-redis-tls / nginx-ssl: {rps['pbxgate-redis-tls'] / rps['nginx-ssl']:.3f}x (h1, rounds "
          f"{rounds('pbxgate-redis-tls', 'nginx-ssl')}); h2: {med(tls['h2']) / med(ssl['h2']):.3f}x; "
          f"p99 @64 vs nginx-ssl: {med(tls['p99']) - med(ssl['p99']):+.2f} ms; "
          f"p50 @1: {med(tls['p50_1']) - med(ssl['p50_1']):+.3f} ms")
    print(f"- Basic-auth API requests / cookie sessions: {rps['pbxgate-redis-basic'] / rps['pbxgate-redis']:.2f}x; "
          f"argon2 runs during {REPEATS * 2} Basic runs: "
          f"{metric(gateways['redis'].admin, 'pbxgate_password_verifications_total') - before_basic:.0f}")
    for name in ["embedded", "redis"]:
        print(f"- start-up to ready ({name} store): {gateways[name].ready_ms:.0f} ms")

    print(clients(gateways["redis"]))


def clients(gateway):
    """Passkey sign-ins and memory against one gateway; their lines."""
    # Passkey sign-ins through the JSON API, a software authenticator per client.
    gateway_args = [f"127.0.0.1:{gateway.plain}", f"https://localhost:{gateway.https}", str(LOGIN_CLIENTS)]
    env = dict(os.environ, BENCH_PASSWORD=PASSWORD)
    out = subprocess.run([TOOLS, "passkeys", *gateway_args, str(SECONDS)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"passkey benchmark failed:\n{out.stdout}{out.stderr}")
    lines = f"- {out.stdout.strip()} (Redis store)\n"

    # Memory: the gateway's resident set with many live sessions in its cache.
    before = rss_mb(gateway.proc.pid)
    out = subprocess.run([TOOLS, "sessions", *gateway_args, str(SESSIONS)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"session benchmark failed:\n{out.stdout}{out.stderr}")
    return lines + f"- RSS with {SESSIONS} live sessions: {rss_mb(gateway.proc.pid):.1f} MB (before them, after the runs above: {before:.1f} MB)"


def shapes(port, cookie):
    """For training: what a PBX's users send besides small GETs: uploads
    (sized and chunked), HEAD, a refused route, sign-in pages and redirects
    for the signed-out, an unknown cookie."""
    def send(method, path, headers=None, body=None, chunked=False):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(method, path, body=body, headers={"Host": "localhost", **(headers or {})},
                     encode_chunked=chunked)
        response = conn.getresponse()
        response.read()
        conn.close()
        if response.status >= 500:
            sys.exit(f"training: {method} {path}: {response.status}")
    signed_in = {"Cookie": cookie}
    browser = {"Accept": "text/html", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"}
    upload = b"x" * 20_000
    for i in range(100):
        send("GET", f"/admin/users/{i}?page={i}&sort=name", signed_in)
        send("HEAD", "/", signed_in)
        send("POST", f"/upload/{i}", {**signed_in, "Content-Type": "application/octet-stream"}, upload)
        send("PUT", "/stream", {**signed_in, "Content-Type": "application/octet-stream"},
             iter([upload[:8000], upload[8000:]]), chunked=True)
        send("GET", f"/calls?day={i}", browser)
        send("GET", "/api/cdr", signed_in)
        send("GET", "/", {**browser, "Cookie": "__Host-pbxgate=not-a-session"})
        send("GET", "/.pbxgate/login?rd=%2F", browser)


if __name__ == "__main__":
    main()
