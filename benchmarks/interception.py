"""Interception cost, side by side in one run: direct vs `oisp record` vs mitmproxy.

    sudo python benchmarks/interception.py [--lean] [--rounds 3] [--seconds 5] [--ttfc 50] [--json FILE]

Two namespaces joined by a veth (made here, removed here, even on failure): `b`
runs the fake provider (tests/fakeprovider.py, hypercorn, HTTPS with its own test
CA) on :443; in `a` the hosts file names it api.openai.com, and the same client
(benchmarks/interception/client.py, plain httpx over HTTP/1.1, its own process so
its CPU is its own) talks to https://api.openai.com three ways:

  direct     trusting the upstream CA
  oisp       unmodified, while `oisp record` runs in `a` (reflect redirect + TLS
             MITM + decoding + redaction + JSONL sink), trusting oisp's CA
  mitmproxy  through `mitmdump` (pip, in its own venv /tmp/mitm-venv, created if
             missing) as an explicit proxy in `a`, trusting mitmproxy's CA

Workloads per path: `seq` (small JSON POSTs, one kept-alive connection, for
--seconds), `newconn` (the same with a new TCP+TLS connection per request), `conc`
(16 concurrent connections, AsyncClient), `ttfc` (SSE streams of 500 chunks: time
from sending the request to the first `data:` event; --ttfc streams in all, spread
over the rounds). Rounds are interleaved (direct, oisp, mitmproxy, repeat) and
medians are reported. `oisp record` runs only during its own turn, since it would
otherwise intercept the other paths' connections to :443 too.

--lean swaps the client and the upstream, for all three paths alike, for lean ones
(benchmarks/interception/lean_client.py and lean_provider.py: stdlib socket + ssl,
prebuilt requests and replies). httpx and hypercorn each cost about as much CPU per
request as the proxies, so on 2 cores the default run measures them as much as the
proxies; in lean mode the proxies are the bottleneck. The workloads are the same; the
JSON says "lean": true, the report's header says so, and the report checks that oisp
wrote one ai.request and one ai.response with usage tokens per request it carried.

After the timed rounds, one extra untimed oisp turn runs under py-spy
(--nonblocking, so the sampler does not stop the process) to show where oisp's CPU
goes and the share taken by the decoder (oisp/decode) and event building
(oisp/events). CPU per request for every proxy comes from /proc/PID/stat
(all threads) around each workload.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.fakeprovider import make_test_pki  # noqa: E402
from tests.netns import VethPair  # noqa: E402

CLIENT = HERE / "interception" / "client.py"
LEAN_CLIENT = HERE / "interception" / "lean_client.py"
LEAN_PROVIDER = HERE / "interception" / "lean_provider.py"
MITM_VENV = Path("/tmp/mitm-venv")
MITM_PORT = 18080
PATHS = ("direct", "oisp", "mitmproxy")
DIAGNOSTIC = "oisp+nodelay"
# Diagnostic only (--nodelay-diagnostic): `oisp record` unmodified, but started with asyncio's
# _set_nodelay patched to also accept sockets made as socket(AF_INET*, SOCK_STREAM) with proto 0,
# which is how oisp/proxy/server.py makes its listener and upstream sockets (asyncio sets
# TCP_NODELAY only when sock.proto == IPPROTO_TCP, so oisp's sockets keep Nagle on).
NODELAY_PRELUDE = """
import socket, sys, runpy, asyncio.base_events as b
def _set_nodelay(sock):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
b._set_nodelay = _set_nodelay
sys.argv = ["oisp"] + sys.argv[1:]
runpy.run_module("oisp", run_name="__main__", alter_sys=True)
"""
RATE_WORKLOADS = ("seq", "newconn", "conc")
CLK_TCK = os.sysconf("SC_CLK_TCK")
RATE = 200  # py-spy samples/s


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_mitm_venv() -> Path:
    mitmdump, pyspy = MITM_VENV / "bin" / "mitmdump", MITM_VENV / "bin" / "py-spy"
    if not (mitmdump.exists() and pyspy.exists()):
        log(f"creating {MITM_VENV} and installing mitmproxy + py-spy there (kept apart from the project's packages)")
        if not (MITM_VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(MITM_VENV)], check=True)
        subprocess.run([str(MITM_VENV / "bin" / "pip"), "install", "-q", "mitmproxy", "py-spy"], check=True,
                       timeout=900)
    return MITM_VENV


def cpu_seconds(pid) -> float:
    """utime + stime of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid) -> float:
    """cpu_seconds of a process and its live descendants: a split `oisp record` does its
    proxy work in its sensor child (the guardians, its other children, sleep)."""
    import psutil

    total = cpu_seconds(pid)
    for child in psutil.Process(pid).children(recursive=True):
        try:
            total += cpu_seconds(child.pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = cpu_seconds(f"{pid}/task/{tid}")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, nproc {os.cpu_count()}, Linux {platform.release()}, Python {platform.python_version()}"


def versions(lean: bool = False) -> str:
    import httpx

    mitm = subprocess.run([str(MITM_VENV / "bin" / "mitmdump"), "--version"], capture_output=True, text=True).stdout
    mitm = next((line.split(":", 1)[1].strip() for line in mitm.splitlines() if line.startswith("Mitmproxy")), "?")
    if lean:
        import ssl

        return f"lean client and provider on stdlib ssl ({ssl.OPENSSL_VERSION}), mitmproxy {mitm}"
    return f"httpx {httpx.__version__}, mitmproxy {mitm}"


def pctl(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Lab:
    """The namespaces, the provider, and the proxies; everything is undone by close()."""

    def __init__(self, tmp: Path, lean: bool = False):
        self.tmp = tmp
        self.lean = lean
        self.oisp_requests = 0  # every request sent through oisp, warm-ups included
        self.processes: list[subprocess.Popen] = []
        self.pair = VethPair.create()
        self.hosts_dir = Path("/etc/netns") / self.pair.a.name
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        (self.hosts_dir / "hosts").write_text(f"127.0.0.1 localhost\n{self.pair.b_ip4} api.openai.com\n")
        self.upstream_ca, cert, key = make_test_pki(tmp)
        self.env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.env["XDG_DATA_HOME"] = str(tmp / "data")
        self.env["PYTHONPATH"] = str(ROOT)
        provider = LEAN_PROVIDER if lean else ROOT / "tests" / "fakeprovider.py"
        self.provider = self._start(self.pair.b, sys.executable, str(provider),
                                    "--host", self.pair.b_ip4, "--port", "443", "--cert", cert, "--key", key)
        self._wait_port(self.pair.b, self.pair.b_ip4, 443)
        self.oisp: subprocess.Popen | None = None
        self.oisp_ca = tmp / "data" / "oisp" / "oisp-ca.pem"
        self.mitm: subprocess.Popen | None = None
        self.mitm_ca = tmp / "mitm" / "mitmproxy-ca-cert.pem"

    def _start(self, ns, *argv, **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        kw.setdefault("env", self.env)
        kw.setdefault("cwd", str(ROOT))
        process = ns.popen(*argv, **kw)
        self.processes.append(process)
        return process

    def _wait_port(self, ns, host: str, port: int, timeout: float = 20.0) -> None:
        probe = f"import socket; socket.create_connection(({host!r}, {port}), 1).close()"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ns.run(sys.executable, "-c", probe, check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"nothing listening on {host}:{port} after {timeout} s")

    # -- oisp record: only during its own turn ---------------------------------------
    def start_oisp(self, nodelay: bool = False, tree: Path = ROOT, extra: tuple[str, ...] = ()) -> int:
        """`oisp record` from `tree` (another checkout, for an A/B: interception_ab.py), with
        `extra` arguments (e.g. `--ui 0`: ui_overhead.py)."""
        launcher = ["-c", NODELAY_PRELUDE] if nodelay else ["-m", "oisp"]
        process = self._start(self.pair.a, sys.executable, *launcher, "record", "-o", str(self.tmp / "events.jsonl"),
                              "--upstream-ca", self.upstream_ca, "--quiet", *extra, stderr=subprocess.PIPE, text=True,
                              cwd=str(tree), env={**self.env, "PYTHONPATH": str(tree)})
        deadline = time.monotonic() + 60
        lines = []
        for line in process.stderr:  # bounded: the process ends or says "recording"
            lines.append(line)
            if line.startswith("oisp record: recording"):
                break
            if time.monotonic() > deadline:
                break
        else:
            raise RuntimeError(f"oisp record did not start (exit {process.wait(10)}):\n{''.join(lines)}")
        if not lines[-1].startswith("oisp record: recording"):
            raise RuntimeError(f"oisp record did not start in 60 s:\n{''.join(lines)}")
        self.oisp_log = lines
        threading.Thread(target=lambda: self.oisp_log.extend(process.stderr), daemon=True).start()
        self.oisp = process
        return process.pid

    def stop_oisp(self) -> None:
        if self.oisp is None:
            return
        self.oisp.send_signal(signal.SIGINT)
        try:
            code = self.oisp.wait(20)
            if code != 0:
                log(f"oisp record exited {code}: {''.join(self.oisp_log[-5:])}")
        except subprocess.TimeoutExpired:
            log("oisp record did not stop in 20 s: killed")
            self.oisp.kill()
            self.oisp.wait(10)
        self.oisp = None

    # -- mitmdump: started once, an explicit proxy on 127.0.0.1 in `a` ---------------
    def start_mitm(self) -> int:
        confdir = self.tmp / "mitm"
        confdir.mkdir(exist_ok=True)
        self.mitm = self._start(self.pair.a, str(MITM_VENV / "bin" / "mitmdump"), "-q",
                                "--listen-host", "127.0.0.1", "--listen-port", str(MITM_PORT),
                                "--set", f"confdir={confdir}",
                                "--set", f"ssl_verify_upstream_trusted_ca={self.upstream_ca}",
                                "--set", "flow_detail=0", "--set", "termlog_verbosity=error",
                                "-s", str(HERE / "interception" / "mitm_stream.py"))
        self._wait_port(self.pair.a, "127.0.0.1", MITM_PORT, timeout=60)
        if not self.mitm_ca.exists():
            raise RuntimeError(f"mitmproxy made no CA at {self.mitm_ca}")
        return self.mitm.pid

    # -- the client -------------------------------------------------------------------
    def client(self, path: str, workload: str, seconds: float, n: int, script: Path | None = None) -> dict:
        """One client run; `script` replaces the client (with the same arguments and JSON line:
        ws_interception.py's WebSocket client)."""
        client = script or (LEAN_CLIENT if self.lean else CLIENT)
        argv = [sys.executable, str(client), workload, "--seconds", str(seconds), "--n", str(n)]
        if path == "direct":
            argv += ["--ca", self.upstream_ca]
        elif path in ("oisp", DIAGNOSTIC):
            argv += ["--ca", str(self.oisp_ca)]
        else:
            argv += ["--ca", str(self.mitm_ca), "--proxy", f"http://127.0.0.1:{MITM_PORT}"]
        proxy_pid = {"direct": None, "oisp": self.oisp and self.oisp.pid, DIAGNOSTIC: self.oisp and self.oisp.pid,
                     "mitmproxy": self.mitm and self.mitm.pid}[path]
        provider0 = cpu_seconds(self.provider.pid)
        proxy0 = tree_cpu_seconds(proxy_pid) if proxy_pid else 0.0
        done = subprocess.run(self.pair.a.cmd(*argv), capture_output=True, text=True, env=self.env,
                              timeout=seconds * 4 + n * 5 + 120)
        if done.returncode != 0:
            raise RuntimeError(f"client {path}/{workload} exited {done.returncode}:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout)
        total = result["requests"] + result.get("warmup", 0)
        if path in ("oisp", DIAGNOSTIC):
            self.oisp_requests += total
        result["proxy_cpu_ms_per_req"] = ((tree_cpu_seconds(proxy_pid) - proxy0) * 1000 / total) if proxy_pid else 0.0
        result["provider_cpu_ms_per_req"] = (cpu_seconds(self.provider.pid) - provider0) * 1000 / total
        return result

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.pair.delete()
        shutil.rmtree(self.hosts_dir, ignore_errors=True)


# -- py-spy attribution -------------------------------------------------------------------
CATEGORIES = ("decode", "events", "sinks", "spec", "proxy", "redirect", "divert", "cli")


def attribute(raw_file: Path) -> dict:
    """py-spy raw stacks -> samples by the innermost oisp package on the stack (inclusive of
    what it calls: h11, json, ssl …), and the top leaf files (self time)."""
    by_pkg: collections.Counter = collections.Counter()
    by_leaf: collections.Counter = collections.Counter()
    by_func: collections.Counter = collections.Counter()
    total = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        count = int(count)
        total += count
        frames = stack.split(";")
        owner = None
        for frame in reversed(frames):
            if "/oisp/" in frame:
                part = frame.split("/oisp/", 1)[1].split("/", 1)[0].split(".py", 1)[0].split(":", 1)[0]
                owner = part
                break
        if owner in (None, "cli", "__main__"):
            # The event loop's own callbacks (transports, TLS) run under asyncio.run() in
            # oisp/cli: no proxy frame on the stack, but it is the proxy's I/O.
            below = ";".join(frames[1:])
            kind = ("select/epoll wait" if frames[-1].startswith(("select ", "EpollSelector.select", "poll "))
                    else "TLS (ssl/sslproto)" if "ssl" in below
                    else "a thread's run() in native code (the divert receive ring)"
                    if frames[-1].startswith("Thread.run ") else "other")
            owner = f"{'event loop' if owner else 'no oisp frame'}: {kind}"
        by_pkg[owner] += count
        leaf = frames[-1]
        name = leaf.split(" (", 1)
        where = name[1].rstrip(")").rsplit(":", 1)[0] if len(name) > 1 else "?"
        where = where.split("/site-packages/", 1)[-1].split("/lib/python3.11/", 1)[-1].split(f"{ROOT}/", 1)[-1]
        by_leaf[where] += count
        by_func[f"{name[0]} ({where})"] += count
    return {"total": total, "by_pkg": dict(by_pkg.most_common()), "by_leaf": dict(by_leaf.most_common(15)),
            "by_func": dict(by_func.most_common(15))}


def start_pyspy(lab: Lab, pyspy, pid: int, raw: Path) -> subprocess.Popen:
    """py-spy sampling `pid` into `raw` (--nonblocking: the sampler never stops the process)."""
    spy = subprocess.Popen([str(pyspy), "record", "--pid", str(pid), "--nonblocking", "--rate", str(RATE),
                            "--format", "raw", "--full-filenames", "-o", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lab.processes.append(spy)
    return spy


def stop_pyspy(spy: subprocess.Popen) -> None:
    """SIGINT: py-spy writes its samples, then ends (killed if it takes over 30 s)."""
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()


def check_pyspy(spy: subprocess.Popen, raw: Path) -> None:
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote nothing: {spy.stderr.read()[-2000:]}")


def profile_oisp(lab: Lab, seconds: float, pyspy: Path, tmp: Path) -> dict:
    """An untimed oisp turn under py-spy: the request-rate workloads, then the streams."""
    profiles = {}
    for label, workloads in (("request-rate (seq + newconn + conc)", RATE_WORKLOADS), ("ttfc streams", ("ttfc",))):
        pid = lab.start_oisp()
        raw = tmp / f"pyspy-{len(profiles)}.txt"
        spy = start_pyspy(lab, pyspy, pid, raw)
        idle0 = cpu_seconds(pid)
        time.sleep(2.0)
        idle = (cpu_seconds(pid) - idle0) / 2.0
        cpu0, t0, threads0 = cpu_seconds(pid), time.monotonic(), thread_cpu(pid)
        requests = 0
        try:
            for workload in workloads:
                requests += lab.client("oisp", workload, seconds, 17)["requests"]
        finally:
            cpu = cpu_seconds(pid) - cpu0
            wall = time.monotonic() - t0
            threads1 = thread_cpu(pid)
            stop_pyspy(spy)
            lab.stop_oisp()
        check_pyspy(spy, raw)
        result = attribute(raw)
        per_thread = sorted(((threads1[t] - threads0.get(t, 0.0), "main (event loop)" if t == pid else f"tid {t}")
                             for t in threads1), reverse=True)
        result.update(cpu_s=cpu, wall_s=wall, requests=requests, raw=str(raw), idle_cpu=idle,
                      threads=[(name, round(c, 3)) for c, name in per_thread if c > 0.005])
        profiles[label] = result
    return profiles


# -- the run --------------------------------------------------------------------------------
def run(args) -> dict:
    ensure_mitm_venv()
    tmp = Path(tempfile.mkdtemp(prefix="oisp-icpt-"))
    lab = None
    paths = PATHS + ((DIAGNOSTIC,) if args.nodelay_diagnostic else ())
    results: dict = {path: collections.defaultdict(list) for path in paths}
    ttfc_per_round = math.ceil(args.ttfc / args.rounds)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        lab = Lab(tmp, lean=args.lean)
        lab.start_mitm()
        log(f"lab up: provider {lab.pair.b_ip4}:443 in {lab.pair.b.name}, client/proxies in {lab.pair.a.name}")
        for rnd in range(args.rounds):
            for path in paths:
                if path in ("oisp", DIAGNOSTIC):
                    lab.start_oisp(nodelay=path == DIAGNOSTIC)
                try:
                    for workload in (*RATE_WORKLOADS, "ttfc"):
                        r = lab.client(path, workload, args.seconds, ttfc_per_round)
                        results[path][workload].append(r)
                        if workload == "ttfc":
                            log(f"round {rnd + 1} {path:9} {workload:7} median TTFC "
                                f"{statistics.median(r['ttfc']) * 1000:.2f} ms")
                        else:
                            log(f"round {rnd + 1} {path:9} {workload:7} {r['requests'] / r['elapsed']:8.0f} req/s  "
                                f"p50 {pctl(r['latencies'], .5) * 1000:.2f} ms  proxy CPU "
                                f"{r['proxy_cpu_ms_per_req']:.2f} ms/req")
                finally:
                    if path in ("oisp", DIAGNOSTIC):
                        lab.stop_oisp()
        profiles = {} if args.no_profile else profile_oisp(lab, args.seconds, MITM_VENV / "bin" / "py-spy", tmp)
        event_counts = collections.Counter()
        with_usage = 0
        for events in lab.tmp.glob("events.jsonl*"):  # the sink rotates at 64 MB
            with open(events) as f:
                for line in f:
                    event = json.loads(line)
                    event_counts[event["event_type"]] += 1
                    if event["event_type"] == "ai.response" and (event["data"].get("usage") or {}).get("total_tokens"):
                        with_usage += 1
        data = {"results": results, "profiles": profiles, "events": dict(event_counts)}
        if args.lean:
            data.update(lean=True, oisp_requests=lab.oisp_requests, responses_with_usage=with_usage)
        return data
    finally:
        if lab is not None:
            lab.close()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def summarize(data: dict) -> dict:
    s: dict = {}
    for path in data["results"]:
        row = {}
        for workload in RATE_WORKLOADS:
            rounds = data["results"][path][workload]
            row[workload] = {
                "rps": statistics.median(r["requests"] / r["elapsed"] for r in rounds),
                "p50": statistics.median(pctl(r["latencies"], .5) for r in rounds) * 1000,
                "p99": statistics.median(pctl(r["latencies"], .99) for r in rounds) * 1000,
                "proxy_cpu": statistics.median(r["proxy_cpu_ms_per_req"] for r in rounds),
                "client_cpu": statistics.median(r["client_cpu"] * 1000 / r["requests"] for r in rounds),
                "provider_cpu": statistics.median(r["provider_cpu_ms_per_req"] for r in rounds),
                "rps_rounds": [r["requests"] / r["elapsed"] for r in rounds],
            }
        ttfc_rounds = data["results"][path]["ttfc"]
        pooled = [x for r in ttfc_rounds for x in r["ttfc"]]
        row["ttfc"] = {"median": statistics.median(pooled) * 1000, "n": len(pooled),
                       "p90": pctl(pooled, .9) * 1000,
                       "rounds": [statistics.median(r["ttfc"]) * 1000 for r in ttfc_rounds],
                       "stream_total": statistics.median(x for r in ttfc_rounds for x in r["totals"]) * 1000,
                       "proxy_cpu_per_stream": statistics.median(r["proxy_cpu_ms_per_req"] for r in ttfc_rounds)}
        s[path] = row
    return s


def report(data: dict, args) -> str:
    s = summarize(data)
    paths = list(s)
    out = []
    p = out.append
    if data.get("lean"):
        p("# LEAN mode: lean_client.py + lean_provider.py (stdlib socket/ssl) for all three paths, not httpx/hypercorn")
    p(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  {machine()}")
    p(f"# {versions(data.get('lean', False))}; {args.rounds} rounds interleaved, "
      f"{args.seconds:g} s per request-rate workload, "
      f"median of rounds; TTFC: {s['direct']['ttfc']['n']} streams of 500 chunks per path, pooled median")
    p("")
    p(f"{'path':10} {'seq req/s':>9} {'p50 ms':>7} {'p99 ms':>7} | {'newconn/s':>9} {'p50 ms':>7} {'p99 ms':>7} | "
      f"{'conc16/s':>8} {'p50 ms':>7} {'p99 ms':>7} | {'TTFC ms':>7} {'p90':>6}")
    for path in paths:
        r = s[path]
        p(f"{path:10} {r['seq']['rps']:9.0f} {r['seq']['p50']:7.2f} {r['seq']['p99']:7.2f} | "
          f"{r['newconn']['rps']:9.0f} {r['newconn']['p50']:7.2f} {r['newconn']['p99']:7.2f} | "
          f"{r['conc']['rps']:8.0f} {r['conc']['p50']:7.2f} {r['conc']['p99']:7.2f} | "
          f"{r['ttfc']['median']:7.2f} {r['ttfc']['p90']:6.2f}")
    p("")
    p("CPU ms per request (median of rounds): proxy process (all threads) / client / provider")
    for path in paths:
        r = s[path]
        p(f"{path:10} " + "  ".join(f"{w} {r[w]['proxy_cpu']:.2f}/{r[w]['client_cpu']:.2f}/{r[w]['provider_cpu']:.2f}"
                                    for w in RATE_WORKLOADS)
          + f"  ttfc-stream proxy {r['ttfc']['proxy_cpu_per_stream']:.1f}")
    p("")
    p("req/s per round: " + "; ".join(f"{path} " + " ".join(
        f"{w}=" + "/".join(f"{x:.0f}" for x in s[path][w]['rps_rounds']) for w in RATE_WORKLOADS) for path in paths))
    p("TTFC median per round (ms): " + "; ".join(
        f"{path} " + "/".join(f"{x:.2f}" for x in s[path]['ttfc']['rounds']) for path in paths))
    p("")
    d, o, m = s["direct"], s["oisp"], s["mitmproxy"]
    ok = lambda cond: "met" if cond else "MISSED"  # noqa: E731
    added = o["seq"]["p50"] - d["seq"]["p50"]
    p(f"added p50, keep-alive (oisp - direct):   {added:6.2f} ms   target <= 1 ms: {ok(added <= 1)}")
    p(f"added p99, keep-alive (oisp - direct):   {o['seq']['p99'] - d['seq']['p99']:6.2f} ms")
    p(f"added p50, new connection per request:   {o['newconn']['p50'] - d['newconn']['p50']:6.2f} ms"
      f"   (mitmproxy: {m['newconn']['p50'] - d['newconn']['p50']:.2f} ms)")
    p(f"added p50, concurrency 16:               {o['conc']['p50'] - d['conc']['p50']:6.2f} ms"
      f"   (mitmproxy: {m['conc']['p50'] - d['conc']['p50']:.2f} ms)")
    p(f"mitmproxy added p50, keep-alive:         {m['seq']['p50'] - d['seq']['p50']:6.2f} ms")
    for w in RATE_WORKLOADS:
        ratio = o[w]["rps"] / m[w]["rps"]
        p(f"oisp req/s / mitmproxy req/s, {w:8}   {ratio:6.2f}x  target >= 2x: {ok(ratio >= 2)}"
          f"   (oisp / direct {o[w]['rps'] / d[w]['rps']:.2f})")
    for w in RATE_WORKLOADS:
        p(f"proxy CPU per request, {w:8}: oisp {o[w]['proxy_cpu']:.2f} ms, mitmproxy {m[w]['proxy_cpu']:.2f} ms"
          f"  (mitmproxy / oisp {m[w]['proxy_cpu'] / max(o[w]['proxy_cpu'], 1e-9):.2f}x)")
    added_ttfc = o["ttfc"]["median"] - d["ttfc"]["median"]
    p(f"added TTFC (oisp - direct):              {added_ttfc:6.2f} ms   target <= 1 ms: {ok(added_ttfc <= 1)}"
      f"   (mitmproxy: {m['ttfc']['median'] - d['ttfc']['median']:.2f} ms)")
    if DIAGNOSTIC in s:
        x = s[DIAGNOSTIC]
        p(f"diagnostic {DIAGNOSTIC} (TCP_NODELAY forced from outside): added p50 keep-alive "
          f"{x['seq']['p50'] - d['seq']['p50']:.2f} ms, p99 {x['seq']['p99'] - d['seq']['p99']:.2f} ms; req/s / mitmproxy "
          + ", ".join(f"{w} {x[w]['rps'] / m[w]['rps']:.2f}x" for w in RATE_WORKLOADS)
          + f"; added TTFC {x['ttfc']['median'] - d['ttfc']['median']:.2f} ms")
    p(f"events written by oisp over the run: {data['events']}")
    if data.get("lean"):
        sent, ev = data["oisp_requests"], data["events"]
        pairs = ev.get("ai.request", 0) == ev.get("ai.response", 0) == data["responses_with_usage"] == sent
        p(f"requests sent through oisp (warm-ups and the py-spy turn included): {sent}; ai.request "
          f"{ev.get('ai.request', 0)}, ai.response {ev.get('ai.response', 0)}, of which with usage tokens "
          f"{data['responses_with_usage']}: {'one pair per request' if pairs else 'MISMATCH'}")
    for label, prof in data["profiles"].items():
        total = prof["total"] or 1
        p("")
        p(f"py-spy of `oisp record`, {label}: {prof['requests']} requests, {prof['total']} non-idle samples "
          f"at {RATE} Hz over {prof['wall_s']:.1f} s; process CPU {prof['cpu_s']:.2f} s "
          f"({prof['cpu_s'] * 1000 / max(prof['requests'], 1):.2f} ms/request); idle before: "
          f"{prof['idle_cpu'] * 100:.1f} % of a core")
        p("  CPU s by thread: " + ", ".join(f"{name} {c:.2f}" for name, c in prof["threads"]))
        dec = prof["by_pkg"].get("decode", 0) / total
        ev = prof["by_pkg"].get("events", 0) / total
        dec_s, ev_s = prof["by_pkg"].get("decode", 0) / RATE, prof["by_pkg"].get("events", 0) / RATE
        p(f"  time in oisp/decode {dec_s:.2f} s, oisp/events {ev_s:.2f} s (samples / {RATE} Hz) = "
          f"{dec_s / prof['cpu_s'] * 100:.1f} % and {ev_s / prof['cpu_s'] * 100:.1f} % of the process CPU "
          f"({prof['cpu_s']:.2f} s); py-spy counts native waits (epoll, the ring) as busy, so per-sample shares "
          f"below understate them")
        p(f"  decoder share of samples (oisp/decode, incl. h11 etc.): {dec * 100:5.1f} %;  events (oisp/events: build, "
          f"redact, attribution): {ev * 100:5.1f} %;  together {(dec + ev) * 100:5.1f} %")
        p("  by innermost oisp package on the stack (inclusive):")
        for pkg, n in prof["by_pkg"].items():
            p(f"    {pkg:32} {n * 100 / total:5.1f} %")
        p("  top leaf files (self):")
        for where, n in prof["by_leaf"].items():
            p(f"    {where:60} {n * 100 / total:5.1f} %")
        p("  top leaf functions (self):")
        for where, n in prof["by_func"].items():
            p(f"    {where[:90]:90} {n * 100 / total:5.1f} %")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per request-rate workload, per path, per round")
    parser.add_argument("--ttfc", type=int, default=50, help="SSE streams per path in all, spread over the rounds")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy turn")
    parser.add_argument("--nodelay-diagnostic", action="store_true",
                        help=f"add a 4th path, {DIAGNOSTIC}: oisp record with TCP_NODELAY forced on its sockets "
                             "from outside (diagnostic; oisp itself is not changed)")
    parser.add_argument("--lean", action="store_true",
                        help="lean client and upstream (stdlib socket + ssl) for every path, so the proxies "
                             "are the bottleneck rather than httpx and hypercorn")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, the divert handle)")
    data = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(data))
    print(report(data, args))


if __name__ == "__main__":
    main()
