#!/usr/bin/env python3
"""The compose sandbox's topology without docker: two meterd processes run with
deploy/compose/meterd-a.toml and meterd-b.toml (only hosts, ports and data dirs
rewritten to this machine) against a real Redis and ClickHouse, and a real Prometheus
(Debian's `prometheus`) with the sandbox's scrape config and deploy/prometheus/alerts.yml.
After some traffic through both instances:

- Prometheus scrapes both targets; the dashboard's queries for ingest, decisions,
  latency, WAL, flushes and Redis sync return data; no alert is pending or firing;
- with Redis shut down and traffic going on, `meterd_redis_up` is 0 for that instance
  (what MeterdRedisDown fires on), and a strict consume is refused as `unavailable`.

Needs METERD_BIN (a meterd binary), METERD_TEST_CLICKHOUSE_URL (a ClickHouse server, as
scripts/test exports), redis-server (METERD_TEST_REDIS_SERVER_BIN or on PATH: the test
starts its own, as it shuts it down) and prometheus. deploy/test runs it when they are
there and reports it skipped otherwise, e.g. `METERD_TEST_CMD=deploy/test scripts/test`.
Every address is 127.0.0.1.
"""
import json
import os
import pathlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from check_metrics import dashboard_exprs  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
NEEDED = ("METERD_BIN", "METERD_TEST_CLICKHOUSE_URL")
REDIS_SERVER = os.environ.get("METERD_TEST_REDIS_SERVER_BIN") or shutil.which("redis-server")
KEY = "sandbox-key"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, key=KEY, timeout=5):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
    req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(what, probe, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@unittest.skipUnless(all(os.environ.get(v) for v in NEEDED) and shutil.which("prometheus") and REDIS_SERVER,
                     f"needs {', '.join(NEEDED)}, redis-server and prometheus")
class SandboxLocal(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = pathlib.Path(tempfile.mkdtemp(prefix="meterd-sandbox-"))
        cls.procs, cls.logs, cls.ports = [], [], {}
        cls.redis_port = free_port()
        cls.redis = subprocess.Popen([REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(cls.redis_port), "--save", "",
                                      "--appendonly", "no", "--dir", str(cls.tmp)], stdout=cls.log("redis"), stderr=subprocess.STDOUT)
        cls.procs.append(cls.redis)
        wait_for("redis", lambda: cls.redis_ping() == 0, 20)
        redis_url = f"redis://127.0.0.1:{cls.redis_port}/0"
        database = f"sandbox_{random.randrange(10**9)}"
        for name in ("meterd-a", "meterd-b"):
            port = free_port()
            cls.ports[name] = port
            text = (ROOT / "deploy" / "compose" / f"{name}.toml").read_text()
            for old, new in (("redis://redis:6379/0", redis_url),
                             ("http://clickhouse:8123", os.environ["METERD_TEST_CLICKHOUSE_URL"]),
                             ('database = "meterd"', f'database = "{database}"'),
                             ("/var/lib/meterd", str(cls.tmp / name)),
                             ("0.0.0.0:8480", f"127.0.0.1:{port}")):
                assert old in text, old
                text = text.replace(old, new)
            (cls.tmp / f"{name}.toml").write_text(text)
            env = {**os.environ, "METERD_API_KEY": KEY}
            cls.procs.append(subprocess.Popen([os.environ["METERD_BIN"], "serve", "--config", str(cls.tmp / f"{name}.toml")],
                                              env=env, stdout=cls.log(name), stderr=subprocess.STDOUT))
        for name, port in cls.ports.items():
            wait_for(f"{name} ready", lambda: http("GET", f"http://127.0.0.1:{port}/readyz")[0] == 200)
        prom = cls.tmp / "prometheus"
        prom.mkdir()
        shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", prom / "alerts.yml")
        conf = (ROOT / "deploy" / "compose" / "prometheus.yml").read_text()
        targets = ", ".join(f'"127.0.0.1:{p}"' for p in cls.ports.values())
        for old, new in (("scrape_interval: 15s", "scrape_interval: 1s"), ("evaluation_interval: 15s", "evaluation_interval: 1s"),
                         ('"meterd-a:8480", "meterd-b:8480"', targets)):
            assert old in conf, old
            conf = conf.replace(old, new)
        (prom / "prometheus.yml").write_text(conf)
        cls.prom_port = free_port()
        cls.procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={prom / 'prometheus.yml'}", f"--storage.tsdb.path={prom / 'data'}",
             f"--web.listen-address=127.0.0.1:{cls.prom_port}"],
            stdout=cls.log("prometheus"), stderr=subprocess.STDOUT))
        wait_for("prometheus", lambda: http("GET", f"http://127.0.0.1:{cls.prom_port}/-/ready", key=None)[0] == 200)

    @classmethod
    def log(cls, name):
        f = open(cls.tmp / f"{name}.log", "w")
        cls.logs.append(f)
        return f

    @classmethod
    def redis_ping(cls):
        return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(cls.redis_port), "ping"],
                              capture_output=True, timeout=5).returncode

    @classmethod
    def tearDownClass(cls):
        for p in cls.procs:
            p.terminate()
        for p in cls.procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in cls.logs:
            f.close()
        if os.environ.get("METERD_DEPLOY_KEEP"):
            print(f"kept {cls.tmp}")
        else:
            shutil.rmtree(cls.tmp, ignore_errors=True)

    def query(self, expr):
        url = f"http://127.0.0.1:{self.prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http("GET", url, key=None)
        self.assertEqual(status, 200, body)
        return json.loads(body)["data"]["result"]

    def traffic(self, rounds, port_names=("meterd-a", "meterd-b"), tag="t"):
        for r in range(rounds):
            for name in port_names:
                base = f"http://127.0.0.1:{self.ports[name]}"
                for n in range(20):
                    self.assertEqual(http("POST", f"{base}/v1/events", {"id": f"{tag}-{name}-{r}-{n}", "customer": f"u_{n}", "meter": "api_calls"})[0], 202)
                    self.assertEqual(http("POST", f"{base}/v1/check", {"customer": "u_1", "meter": "api_calls", "quantity": 5,
                                                                       "consume": True, "id": f"{tag}-c-{name}-{r}-{n}"})[0], 200)
            time.sleep(1)

    def test_1_dashboard_and_alerts_on_a_healthy_sandbox(self):
        self.traffic(5)
        time.sleep(4)  # a few scrapes and rule evaluations after the traffic
        targets = json.loads(http("GET", f"http://127.0.0.1:{self.prom_port}/api/v1/targets", key=None)[1])["data"]["activeTargets"]
        self.assertEqual(sorted(t["health"] for t in targets), ["up", "up"], targets)
        self.assertEqual({t["labels"]["job"] for t in targets}, {"meterd"})
        d = json.loads((ROOT / "deploy" / "grafana" / "meterd.json").read_text())
        exprs = {t["expr"]: p["title"] for p in d["panels"] for t in p.get("targets", [])}
        must = ["Events by result", "Requests by route", "Responses by status", "Decisions by reason", "p50 by route", "p99 by route",
                "WAL bytes (not yet checkpointed)", "Flush lag", "Rows flushed", "Pending usage (units not yet in Redis)",
                "Sync round duration (p50 / p99)", "Dedupe ids remembered", "Instances up",
                "WAL fsync (p50 / p99)", "Records per WAL group (mean)"]
        empty = [t for e, t in exprs.items() if t in must
                 and not self.query(e.replace("$__rate_interval", "30s").replace("$instance", ".*"))]
        self.assertEqual(empty, [], "dashboard panels without data")
        self.assertEqual(len(dashboard_exprs(d)), len(exprs) + 1)  # + the instance variable
        routes = {r["metric"]["route"] for r in self.query("meterd_http_requests_total")}
        self.assertLessEqual({"events", "check", "metrics"}, routes)
        # Redis is up, and says so on both instances (a gauge set before the exporter is
        # installed is lost: then the series is missing, or 0 and MeterdRedisDown fires).
        up = {r["metric"]["instance"]: r["value"][1] for r in self.query("meterd_redis_up")}
        self.assertEqual(up, {f"127.0.0.1:{p}": "1" for p in self.ports.values()}, "meterd_redis_up while Redis is up")
        self.assertEqual(self.query("ALERTS"), [], "no alert pending or firing on a healthy sandbox")

    def test_2_redis_down(self):
        self.redis.terminate()  # the test's own redis-server
        self.redis.wait(timeout=20)
        self.assertNotEqual(self.redis_ping(), 0)
        base = f"http://127.0.0.1:{self.ports['meterd-a']}"
        for n in range(10):  # ingest goes on (usage stays pending for Redis)
            self.assertEqual(http("POST", f"{base}/v1/events", {"id": f"down-{n}", "customer": "u_9", "meter": "api_calls"})[0], 202)
            time.sleep(0.3)
        status, body = http("POST", f"{base}/v1/check", {"customer": "u_1", "meter": "gpu_seconds", "quantity": 1, "consume": True, "id": "strict-1"})
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["reason"], "unavailable")  # strict_when_unavailable = "deny"
        a = f"127.0.0.1:{self.ports['meterd-a']}"
        wait_for("meterd_redis_up == 0 in Prometheus",
                 lambda: [r["value"][1] for r in self.query(f'meterd_redis_up{{instance="{a}"}}')] == ["0"], 30)


if __name__ == "__main__":
    unittest.main()
