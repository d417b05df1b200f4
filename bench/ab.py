"""A/B of pbxgate builds against nginx-plain, for performance work.

    python3 bench/ab.py ROUNDS SECONDS BINARY [BINARY...]

Starts the upstream and nginx-plain as bench/run does, and each binary as a
gateway (embedded store, plain HTTP, one signed-in session), then runs wrk
against nginx-plain and every gateway in turn, alternating the order each
round. Prints each run, then medians: requests/s, the ratio to the
nginx-plain run of the same round, the proxy's user and system CPU per
request, and the rest of the machine's (wrk and the upstream) per request.
Build the binaries to compare first (`cargo build --release`, copied aside).
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as b  # noqa: E402


def ticks(pids):
    """User and system CPU ticks of these processes, and their threads' context
    switches (voluntary, involuntary)."""
    user = system = voluntary = involuntary = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
        for task in os.listdir(f"/proc/{pid}/task"):
            for line in open(f"/proc/{pid}/task/{task}/status"):
                if line.startswith("voluntary_ctxt_switches"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    involuntary += int(line.split()[1])
    return user, system, voluntary, involuntary


def gateway(tmp, i, binary, upstream_port):
    port, admin = b.free_port(), b.free_port()
    conf = b.write(f"{tmp}/gateway-{i}.toml", f"""
policy_file = "policy.toml"
public_url = "http://localhost:{port}"
[listen]
https = ""
http = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin}"
[upstream]
url = "http://127.0.0.1:{upstream_port}"
[store]
url = "embedded://store-{i}.db"
""")
    subprocess.run([binary, "user", "set-password", "bench", "--config", conf], input="Bench password 42!\n",
                   text=True, check=True, capture_output=True)
    proc = b.start([binary, "serve", "--config", conf], env=dict(os.environ, RUST_LOG="warn"))
    b.wait_port(admin)
    login = urllib.request.Request(
        f"http://127.0.0.1:{port}/.pbxgate/api/password/login",
        data=b'{"login":"bench","password":"Bench password 42!"}',
        headers={"Host": "localhost", "Origin": f"http://localhost:{port}", "Content-Type": "application/json"},
        method="POST")
    with urllib.request.urlopen(login) as r:
        cookie = next(v.split(";")[0] for k, v in r.headers.items()
                      if k.lower() == "set-cookie" and v.startswith("__Host-pbxgate="))
    return f"http://127.0.0.1:{port}/", cookie, [proc.pid]


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    rounds, seconds, binaries = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    tmp = tempfile.mkdtemp(prefix="pbxgate-ab-")
    up_port, plain_port = b.free_port(), b.free_port()
    b.nginx(tmp, "upstream", f"listen 127.0.0.1:{up_port} reuseport backlog=4096; "
            f"default_type text/plain; location / {{ return 200 '{b.BODY}'; }}")
    upstream = f"upstream up {{ server 127.0.0.1:{up_port}; keepalive 128; }}"
    plain = b.nginx(tmp, "plain", f"listen 127.0.0.1:{plain_port}; location / {{ {b.PROXY} }}", upstream)
    b.write(f"{tmp}/policy.toml", 'domains = ["localhost"]\n[[route]]\npath = "/"\naccess = "user"\n'
            '[[user]]\nname = "bench"\npassword_login = true\n')
    b.wait_port(plain_port)
    time.sleep(0.2)  # its workers are forked after the port opens
    cases = [("nginx-plain", f"http://127.0.0.1:{plain_port}/", None, b.nginx_pids(plain.pid))]
    for i, binary in enumerate(binaries):
        cases.append((f"{i}:{os.path.basename(binary)}", *gateway(tmp, i, binary, up_port)))
    hz = os.sysconf("SC_CLK_TCK")
    runs = {name: [] for name, *_ in cases}
    for round_ in range(rounds):
        for name, url, cookie, pids in cases if round_ % 2 == 0 else cases[::-1]:
            (user, system, vol, invol), machine = ticks(pids), b.machine_ticks()
            rps, reqs, _, p99 = b.wrk(url, 64, seconds, cookie)
            (user2, system2, vol2, invol2), machine2 = ticks(pids), b.machine_ticks()
            per = lambda t: t / hz / reqs * 1e6
            rest = per(machine2 - machine - (user2 - user) - (system2 - system))
            switches = ((vol2 - vol) / reqs, (invol2 - invol) / reqs)
            runs[name].append((rps, per(user2 - user), per(system2 - system), rest, p99, *switches))
            print(f"round {round_ + 1} {name}: {rps:.0f} req/s, proxy user {runs[name][-1][1]:.1f} "
                  f"system {runs[name][-1][2]:.1f}, rest {rest:.1f} µs/req, context switches/req "
                  f"{switches[0]:.2f} voluntary {switches[1]:.2f} involuntary", flush=True)
    med = statistics.median
    print("\n| case | req/s | / nginx-plain | user µs/req | system µs/req | rest µs/req | p99 ms "
          "| switches/req vol. | invol. |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        ratio = med(x[0] / y[0] for x, y in zip(run, runs["nginx-plain"]))
        print(f"| {name} | {med(x[0] for x in run):.0f} | {ratio:.2f} | {med(x[1] for x in run):.1f} "
              f"| {med(x[2] for x in run):.1f} | {med(x[3] for x in run):.1f} | {med(x[4] for x in run):.2f} "
              f"| {med(x[5] for x in run):.2f} | {med(x[6] for x in run):.2f} |")


if __name__ == "__main__":
    try:
        main()
    finally:
        for p in b.procs:
            p.terminate()
