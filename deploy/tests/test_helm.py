#!/usr/bin/env python3
"""Tests of the Helm chart deploy/helm/meterd: `helm lint --strict`, `helm template`
(both through helm-python-sdk, Helm's Go SDK as a library from PyPI: no helm binary,
no cluster), every rendered manifest validated against the Kubernetes 1.30 schema
(kubernetes-validate, strict), and the chart's invariants: a StatefulSet with a PVC per
pod for the data dir, an instance_id rendered from the pod name, config from a
ConfigMap, keys from Secrets, readiness on /readyz and liveness on /healthz,
terminationGracePeriodSeconds longer than [server].shutdown_grace, Services (API and
headless), PodDisruptionBudget, optional ServiceMonitor.

deploy/test installs the two Python packages in a virtualenv and runs this file. With a
meterd binary (METERD_BIN, else target/debug/meterd or target/release/meterd) the
rendered config is also run through `meterd check-config`; without one that test is
reported as skipped.
"""
import base64
import os
import pathlib
import shlex
import subprocess
import tempfile
import tomllib
import unittest

import yaml

try:
    import helm_python as helm
    import kubernetes_validate
except ImportError as e:  # a failure, not a skip: deploy/test installs them
    raise SystemExit(f"test_helm.py needs helm-python-sdk and kubernetes-validate ({e}); run deploy/test") from e

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "meterd"
KUBE = "1.30.0"
NS = "billing"


def render(values=None, name="meterd"):
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values or {}, name=name, namespace=NS)
    docs = []
    for path, text in manifests.items():
        if not path.endswith("NOTES.txt"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def meterd_toml(docs):
    return one(docs, "ConfigMap")["data"]["meterd.toml"]


def duration_seconds(text):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for u in ("ms", "s", "m", "h"):
        if text.endswith(u) and text[: -len(u)].isdigit():
            return int(text[: -len(u)]) * units[u]
    raise ValueError(text)


FULL = {
    "replicaCount": 3,
    "redis": {"url": "redis://redis:6379/0"},
    "clickhouse": {"url": "http://clickhouse:8123"},
    "stripe": {"enabled": True, "apiKeySecret": {"name": "stripe", "key": "sk"}},
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True},
    "storage": {"storageClassName": "fast-ssd", "size": "50Gi"},
    "server": {"shutdownGraceSeconds": 120},
    "extraEnv": [{"name": "RUST_LOG", "value": "info"}],
}


class Lint(unittest.TestCase):
    def test_helm_lint_strict_is_clean(self):
        for values in ({}, FULL):
            report = helm.lint(str(CHART), values, strict=True, namespace=NS, kube_version=f"v{KUBE}")
            self.assertEqual(report["errors"], [], report)
            serious = [m for m in report["messages"] if m["severity"] >= 2]
            self.assertEqual(serious, [], report)

    def test_every_manifest_matches_the_kubernetes_schema(self):
        for values in ({}, FULL, {"auth": {"existingSecret": "keys"}}):
            docs = render(values)
            for d in docs:
                if d["apiVersion"].startswith("monitoring.coreos.com/"):
                    continue  # a CRD: its shape is checked in ServiceMonitorTest
                kubernetes_validate.validate(d, KUBE, strict=True)


class Defaults(unittest.TestCase):
    docs = render()

    def test_kinds(self):
        kinds = sorted(d["kind"] for d in self.docs)
        self.assertEqual(kinds, ["ConfigMap", "PodDisruptionBudget", "Secret", "Service", "Service", "StatefulSet"])

    def test_a_pvc_per_pod_holds_the_data_dir(self):
        sts = one(self.docs, "StatefulSet")
        [claim] = sts["spec"]["volumeClaimTemplates"]
        self.assertEqual(claim["spec"]["accessModes"], ["ReadWriteOnce"])
        container = sts["spec"]["template"]["spec"]["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        data_dir = tomllib.loads(meterd_toml(self.docs))["storage"]["data_dir"]
        self.assertEqual(mounts[claim["metadata"]["name"]], data_dir)
        volumes = {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
        self.assertNotIn(claim["metadata"]["name"], volumes, "the data dir must not be an ordinary volume")

    def test_probes(self):
        c = one(self.docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(c["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "http"})
        self.assertEqual(c["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "http"})
        self.assertEqual(c["startupProbe"]["httpGet"]["path"], "/healthz")
        port = tomllib.loads(meterd_toml(self.docs))["server"]["listen"].rsplit(":", 1)[1]
        self.assertEqual([p["containerPort"] for p in c["ports"] if p["name"] == "http"], [int(port)])

    def test_termination_grace_is_longer_than_shutdown_grace_and_the_pre_stop_sleep(self):
        pod = one(self.docs, "StatefulSet")["spec"]["template"]["spec"]
        grace = duration_seconds(tomllib.loads(meterd_toml(self.docs))["server"]["shutdown_grace"])
        sleep = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
        self.assertGreater(pod["terminationGracePeriodSeconds"], grace + sleep)

    def test_services_and_selectors(self):
        sts = one(self.docs, "StatefulSet")
        pod_labels = sts["spec"]["template"]["metadata"]["labels"]
        selector = sts["spec"]["selector"]["matchLabels"]
        self.assertLessEqual(selector.items(), pod_labels.items())
        headless = one(self.docs, "Service", sts["spec"]["serviceName"])
        self.assertEqual(headless["spec"]["clusterIP"], "None")
        api = one(self.docs, "Service", "meterd")
        for svc in (api, headless):
            self.assertLessEqual(svc["spec"]["selector"].items(), pod_labels.items())
            self.assertEqual(svc["spec"]["ports"][0]["targetPort"], "http")
        pdb = one(self.docs, "PodDisruptionBudget")
        self.assertLessEqual(pdb["spec"]["selector"]["matchLabels"].items(), pod_labels.items())
        self.assertEqual(pdb["spec"]["maxUnavailable"], 1)

    def test_config_comes_from_the_configmap(self):
        pod = one(self.docs, "StatefulSet")["spec"]["template"]["spec"]
        cm = one(self.docs, "ConfigMap")
        [template] = [v for v in pod["volumes"] if "configMap" in v]
        self.assertEqual(template["configMap"]["name"], cm["metadata"]["name"])
        self.assertIn("--config", pod["containers"][0]["args"])

    def test_keys_come_from_secrets(self):
        config = tomllib.loads(meterd_toml(self.docs))
        secret = one(self.docs, "Secret")
        env = {e["name"]: e for e in one(self.docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
        self.assertEqual(len(config["auth"]["keys"]), 2)
        for key in config["auth"]["keys"]:
            self.assertNotIn("key_sha256", key)
            ref = env[key["key_env"]]["valueFrom"]["secretKeyRef"]
            self.assertEqual(ref["name"], secret["metadata"]["name"])
            value = base64.b64decode(secret["data"][ref["key"]])
            self.assertGreaterEqual(len(value), 32, "a generated key is long")
        self.assertNotIn(b"", [base64.b64decode(v) for v in secret["data"].values()])

    def test_no_service_monitor_nor_rules_unless_asked(self):
        self.assertFalse([d for d in self.docs if d["kind"] in ("ServiceMonitor", "PrometheusRule")])


class InstanceId(unittest.TestCase):
    """Runs the init container's command on the rendered ConfigMap, as a pod would."""

    def rendered_config(self, docs, pod_name):
        pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
        [init] = pod["initContainers"]
        tmp = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(subprocess.run, ["rm", "-rf", str(tmp)])
        mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
        (tmp / mounts["/etc/meterd-template"]).mkdir()
        (tmp / mounts["/etc/meterd"]).mkdir()
        (tmp / mounts["/etc/meterd-template"] / "meterd.toml").write_text(meterd_toml(docs))
        script = init["args"][0]
        for path, name in mounts.items():
            script = script.replace(path + "/", f"{tmp / name}/")
        env = {e["name"]: pod_name for e in init["env"] if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"}
        self.assertEqual(list(env), ["POD_NAME"])
        subprocess.run(init["command"] + [script], env={"PATH": os.environ["PATH"], **env}, check=True)
        return tmp / mounts["/etc/meterd"] / "meterd.toml"

    def test_each_pod_gets_its_own_instance_id(self):
        docs = render(FULL)
        for pod_name in ("meterd-0", "meterd-2"):
            path = self.rendered_config(docs, pod_name)
            self.assertEqual(tomllib.loads(path.read_text())["server"]["instance_id"], pod_name)

    def test_the_rendered_config_is_valid_for_meterd(self):
        binary = os.environ.get("METERD_BIN") or next(
            (str(p) for p in (ROOT / "target" / "debug" / "meterd", ROOT / "target" / "release" / "meterd") if p.exists()), None)
        if not binary:
            self.skipTest("no meterd binary (set METERD_BIN or build target/debug/meterd)")
        for values in ({}, FULL):
            docs = render(values)
            path = self.rendered_config(docs, "meterd-1")
            container = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
            env = {"PATH": os.environ["PATH"]}
            for e in container["env"]:
                env[e["name"]] = e.get("value", "a-secret-from-the-cluster")
            ok = subprocess.run([binary, "check-config", "--config", str(path)], env=env, capture_output=True, text=True)
            self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
            # and without the Secret's variables meterd refuses it: the keys really are from the env
            env = {k: v for k, v in env.items() if not k.startswith("METERD_KEY_")}
            bad = subprocess.run([binary, "check-config", "--config", str(path)], env=env, capture_output=True, text=True)
            self.assertEqual(bad.returncode, 2, bad.stdout + bad.stderr)
            self.assertIn("METERD_KEY_APP_SERVERS", bad.stderr)


class Values(unittest.TestCase):
    def test_several_replicas_need_redis(self):
        with self.assertRaises(helm.HelmError) as e:
            render({"replicaCount": 2})
        self.assertIn("redis.url", str(e.exception))
        docs = render({"replicaCount": 2, "redis": {"url": "redis://r:6379/0"}})
        self.assertEqual(one(docs, "StatefulSet")["spec"]["replicas"], 2)
        self.assertEqual(tomllib.loads(meterd_toml(docs))["redis"]["url"], "redis://r:6379/0")

    def test_grace_follows_shutdown_grace(self):
        docs = render({"server": {"shutdownGraceSeconds": 120}})
        self.assertEqual(tomllib.loads(meterd_toml(docs))["server"]["shutdown_grace"], "120s")
        self.assertGreater(one(docs, "StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"], 125)

    def test_existing_secret(self):
        docs = render({"auth": {"existingSecret": "meterd-api-keys"}})
        self.assertFalse([d for d in docs if d["kind"] == "Secret"])
        env = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e}
        self.assertEqual(refs, {"meterd-api-keys"})

    def test_given_key_values_are_used(self):
        docs = render({"auth": {"keys": [{"name": "app", "secretKey": "app", "value": "k-123", "scopes": ["ingest"]}]}})
        self.assertEqual(base64.b64decode(one(docs, "Secret")["data"]["app"]), b"k-123")

    def test_no_keys_is_refused(self):
        with self.assertRaises(helm.HelmError):
            render({"auth": {"keys": []}})

    def test_stripe_key_from_a_secret(self):
        with self.assertRaises(helm.HelmError):
            render({"stripe": {"enabled": True}})
        docs = render(FULL)
        self.assertEqual(tomllib.loads(meterd_toml(docs))["stripe"]["api_key_env"], "STRIPE_API_KEY")
        env = {e["name"]: e for e in one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]}
        self.assertEqual(env["STRIPE_API_KEY"]["valueFrom"]["secretKeyRef"], {"name": "stripe", "key": "sk"})

    def test_storage_class_and_size(self):
        [claim] = one(render(FULL), "StatefulSet")["spec"]["volumeClaimTemplates"]
        self.assertEqual(claim["spec"]["storageClassName"], "fast-ssd")
        self.assertEqual(claim["spec"]["resources"]["requests"]["storage"], "50Gi")

    def test_config_change_rolls_the_pods(self):
        a = one(render(), "StatefulSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        b = one(render({"server": {"shutdownGraceSeconds": 31}}), "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
        self.assertNotEqual(a, b["checksum/config"])


class ServiceMonitorTest(unittest.TestCase):
    def test_scrapes_the_api_service_once_per_pod(self):
        docs = render(FULL)
        sm = one(docs, "ServiceMonitor")
        self.assertEqual(sm["metadata"]["labels"]["release"], "kube-prometheus-stack")
        services = [d for d in docs if d["kind"] == "Service"
                    and sm["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()]
        self.assertEqual([s["metadata"]["name"] for s in services], ["meterd"])
        [ep] = sm["spec"]["endpoints"]
        self.assertIn(ep["port"], [p["name"] for p in services[0]["spec"]["ports"]])
        self.assertEqual(ep["path"], "/metrics")
        self.assertIn({"action": "replace", "targetLabel": "job", "replacement": "meterd"}, ep["relabelings"])
        self.assertEqual(sm["spec"]["namespaceSelector"]["matchNames"], [NS])

    def test_prometheus_rule_is_the_alerts_file(self):
        rule = one(render(FULL), "PrometheusRule")
        alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
        self.assertEqual(rule["spec"], alerts)
        self.assertGreaterEqual(len(rule["spec"]["groups"][0]["rules"]), 10)


if __name__ == "__main__":
    unittest.main()
