#!/usr/bin/env python3
"""Checks the compose sandbox (deploy/compose) and the Dockerfile hang together, where
docker itself is absent: every mounted file exists, the two meterd configs differ only
in instance_id and are valid for meterd (`meterd check-config`, with a meterd binary),
nginx, Prometheus and Grafana point at the services that exist, the image's volume,
port and health check match its config. `docker compose config` (deploy/test runs it
when docker is present) checks the file against the compose schema.
"""
import os
import pathlib
import re
import subprocess
import tomllib
import unittest
from urllib.parse import urlparse

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
METERD = ["meterd-a", "meterd-b"]


def meterd_binary():
    return os.environ.get("METERD_BIN") or next(
        (str(p) for p in (ROOT / "target" / "debug" / "meterd", ROOT / "target" / "release" / "meterd") if p.exists()), None)


def config_of(service):
    [mount] = [v for v in SERVICES[service]["volumes"] if v.split(":")[1] == SERVICES[service]["environment"]["METERD_CONFIG"]]
    return COMPOSE_DIR / mount.split(":")[0]


def seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


class Compose(unittest.TestCase):
    def test_the_stack(self):
        self.assertEqual(set(SERVICES), {"meterd-a", "meterd-b", "lb", "redis", "clickhouse", "prometheus", "grafana"})

    def test_every_bind_mount_exists(self):
        for name, svc in SERVICES.items():
            for v in svc.get("volumes", []):
                src = v.split(":")[0]
                if src.startswith("."):
                    self.assertTrue((COMPOSE_DIR / src).exists(), f"{name}: {src}")
                else:
                    self.assertIn(src, COMPOSE["volumes"], f"{name}: named volume {src}")

    def test_the_image_is_built_once_from_the_dockerfile(self):
        built = [n for n, s in SERVICES.items() if "build" in s]
        self.assertEqual(built, ["meterd-a"])
        b = SERVICES["meterd-a"]["build"]
        self.assertTrue((COMPOSE_DIR / b["context"] / b["dockerfile"]).exists())
        self.assertEqual(SERVICES["meterd-b"]["image"], SERVICES["meterd-a"]["image"])

    def test_the_instances_differ_only_in_instance_id(self):
        a, b = (tomllib.loads(config_of(s).read_text()) for s in METERD)
        self.assertEqual((a["server"].pop("instance_id"), b["server"].pop("instance_id")), ("meterd-a", "meterd-b"))
        self.assertEqual(a, b)
        self.assertNotEqual(config_of("meterd-a"), config_of("meterd-b"))

    def test_configs_point_at_the_services_and_own_volumes(self):
        data = set()
        for s in METERD:
            cfg = tomllib.loads(config_of(s).read_text())
            self.assertEqual(urlparse(cfg["redis"]["url"]).hostname, "redis")
            self.assertEqual(urlparse(cfg["clickhouse"]["url"]).hostname, "clickhouse")
            [vol] = [v.split(":")[0] for v in SERVICES[s]["volumes"] if v.split(":")[1] == cfg["storage"]["data_dir"]]
            data.add(vol)
            # non-loopback, so meterd needs keys: each one's variable is set for the service
            self.assertTrue(cfg["server"]["listen"].startswith("0.0.0.0:"))
            self.assertTrue(cfg["auth"]["keys"])
            for key in cfg["auth"]["keys"]:
                self.assertIn(key["key_env"], SERVICES[s]["environment"])
            self.assertGreater(seconds(SERVICES[s]["stop_grace_period"]), seconds(cfg["server"]["shutdown_grace"]))
            self.assertEqual(set(SERVICES[s]["depends_on"]), {"redis", "clickhouse"})
        self.assertEqual(len(data), 2, "a data volume per instance")

    def test_the_configs_are_valid_for_meterd(self):
        binary = meterd_binary()
        if not binary:
            self.skipTest("no meterd binary (set METERD_BIN or build target/debug/meterd)")
        for s in METERD + ["image"]:
            path = ROOT / "deploy" / "docker" / "meterd.toml" if s == "image" else config_of(s)
            env = {"PATH": os.environ["PATH"], "METERD_API_KEY": "k"}
            r = subprocess.run([binary, "check-config", "--config", str(path)], env=env, capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_nginx_balances_both_instances(self):
        conf = (COMPOSE_DIR / "nginx.conf").read_text()
        port = tomllib.loads(config_of("meterd-a").read_text())["server"]["listen"].rsplit(":", 1)[1]
        self.assertEqual(sorted(re.findall(r"^\s*server\s+([\w.-]+:\d+)", conf, re.M)), [f"{s}:{port}" for s in METERD])
        self.assertIn("8480:8480", SERVICES["lb"]["ports"])

    def test_prometheus_scrapes_both_instances_and_loads_the_alerts(self):
        prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
        [job] = prom["scrape_configs"]
        self.assertEqual(job["job_name"], "meterd")  # the alerts select job="meterd"
        port = tomllib.loads(config_of("meterd-a").read_text())["server"]["listen"].rsplit(":", 1)[1]
        self.assertEqual(sorted(job["static_configs"][0]["targets"]), [f"{s}:{port}" for s in METERD])
        mounts = dict(v.split(":")[:2] for v in SERVICES["prometheus"]["volumes"])
        self.assertEqual(mounts["../prometheus/alerts.yml"], "/etc/prometheus/" + prom["rule_files"][0])

    def test_grafana_provisions_the_dashboard(self):
        prov = COMPOSE_DIR / "grafana" / "provisioning"
        ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
        self.assertEqual(urlparse(ds["url"]).hostname, "prometheus")
        provider = yaml.safe_load((prov / "dashboards" / "meterd.yaml").read_text())["providers"][0]
        mounts = dict(v.split(":")[:2] for v in SERVICES["grafana"]["volumes"])
        self.assertEqual(mounts["../grafana/meterd.json"], provider["options"]["path"] + "/meterd.json")
        self.assertEqual(mounts["./grafana/provisioning"], "/etc/grafana/provisioning")


class Dockerfile(unittest.TestCase):
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    config = tomllib.loads((ROOT / "deploy" / "docker" / "meterd.toml").read_text())

    def test_builder_and_runtime(self):
        froms = re.findall(r"^FROM\s+(\S+)", self.text, re.M)
        self.assertEqual(len(froms), 2, "multi-stage")
        version = re.search(r"^ARG RUST_VERSION=(\d+)\.(\d+)", self.text, re.M)
        self.assertGreaterEqual((int(version.group(1)), int(version.group(2))), (1, 88))
        self.assertIn("cargo build --release --locked -p meterd", self.text)
        self.assertTrue(froms[1].startswith("debian:"))

    def test_non_root_volume_port_and_health(self):
        user = re.findall(r"^USER\s+(\S+)", self.text, re.M)
        self.assertEqual(user, ["10001:10001"])
        self.assertIn(f'VOLUME ["{self.config["storage"]["data_dir"]}"]', self.text)
        port = self.config["server"]["listen"].rsplit(":", 1)[1]
        self.assertRegex(self.text, rf"(?m)^EXPOSE {port}$")
        self.assertIn(f"METERD_HEALTHCHECK_URL=http://127.0.0.1:{port}/healthz", self.text)
        self.assertRegex(self.text, r"(?m)^HEALTHCHECK .*\n\s+CMD .*METERD_HEALTHCHECK_URL")
        self.assertIn("METERD_CONFIG=/etc/meterd/meterd.toml", self.text)

    def test_dockerignore_keeps_build_output_out(self):
        ignored = (ROOT / ".dockerignore").read_text().split()
        self.assertIn("target/", ignored)
        for needed in ("src", "config", "loadtest", "benches", "Cargo.toml", "Cargo.lock", "deploy/docker"):
            self.assertFalse(any(needed == i.rstrip("/") for i in ignored), needed)


if __name__ == "__main__":
    unittest.main()
