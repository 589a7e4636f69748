#!/usr/bin/env python3
"""Tests of check_metrics.py (it finds the metric names, and fails on a name meterd
does not export) and of the dashboard's shape. Run: python3 -m unittest -v
deploy/tests/test_check_metrics.py (deploy/test does)."""
import contextlib
import io
import json
import pathlib
import sys
import tempfile
import unittest

HERE = pathlib.Path(__file__).resolve().parent
DEPLOY = HERE.parent
sys.path.insert(0, str(HERE))
import check_metrics  # noqa: E402

DASHBOARD = DEPLOY / "grafana" / "meterd.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"


def run(*files):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = check_metrics.main([str(f) for f in files])
    return code, out.getvalue() + err.getvalue()


class Extraction(unittest.TestCase):
    def test_selectors_functions_and_label_lists(self):
        expr = ('histogram_quantile(0.99, sum by (le, route) (rate(meterd_http_request_duration_seconds_bucket'
                '{instance=~"$instance", route!="metrics"}[$__rate_interval])))')
        self.assertEqual(check_metrics.metric_names(expr), {"meterd_http_request_duration_seconds_bucket"})

    def test_binary_operators_numbers_and_keywords(self):
        expr = ('sum without (status) (rate(a_total{x="fake_name"}[5m] offset 1h)) / on (instance) group_left (version) '
                'b_info > bool 0.8 * 1073741824 and c unless d or 1e9')
        self.assertEqual(check_metrics.metric_names(expr), {"a_total", "b_info", "c", "d"})

    def test_strings_and_grafana_variables_are_not_metrics(self):
        self.assertEqual(check_metrics.metric_names('up{job="meterd_wal_bytes", instance=~"${instance}"} == 0'), {"up"})

    def test_histograms_export_only_their_series(self):
        src = ('pub const H: &str = "meterd_h_seconds";\npub const C: &str = "meterd_c_total";\n'
               'fn f() { metrics::histogram!(H).record(1.0); }')
        self.assertEqual(check_metrics.exported_metrics(src),
                         {"meterd_h_seconds_bucket", "meterd_h_seconds_sum", "meterd_h_seconds_count", "meterd_c_total"})

    def test_the_dashboard_and_rules_yield_expressions(self):
        exprs = check_metrics.dashboard_exprs(json.loads(DASHBOARD.read_text()))
        self.assertGreater(len(exprs), 40)
        # the instance variable's label_values(metric, label) is checked as its metric
        self.assertIn("meterd_http_requests_total", exprs[-1])


class Check(unittest.TestCase):
    def test_the_shipped_dashboard_and_rules_pass(self):
        code, out = run(DASHBOARD, ALERTS)
        self.assertEqual(code, 0, out)
        self.assertIn("check_metrics: ok", out)

    def _mutated(self, src, old, new, suffix):
        text = src.read_text()
        self.assertIn(old, text)
        tmp = tempfile.NamedTemporaryFile("w", suffix=suffix, delete=False)
        tmp.write(text.replace(old, new, 1))
        tmp.close()
        self.addCleanup(pathlib.Path(tmp.name).unlink)
        return tmp.name

    def test_a_misspelt_metric_in_the_dashboard_fails(self):
        bad = self._mutated(DASHBOARD, "meterd_wal_bytes{", "meterd_wal_bytez{", ".json")
        code, out = run(bad, ALERTS)
        self.assertEqual(code, 1, out)
        self.assertIn("unknown metric meterd_wal_bytez", out)

    def test_a_misspelt_metric_in_the_rules_fails(self):
        bad = self._mutated(ALERTS, "meterd_redis_up == 0", "meterd_redis_upp == 0", ".yml")
        code, out = run(DASHBOARD, bad)
        self.assertEqual(code, 1, out)
        self.assertIn("unknown metric meterd_redis_upp", out)

    def test_a_histogram_named_without_its_suffix_fails(self):
        bad = self._mutated(DASHBOARD, "meterd_http_request_duration_seconds_bucket{",
                            "meterd_http_request_duration_seconds{", ".json")
        code, out = run(bad)
        self.assertEqual(code, 1, out)
        self.assertIn("unknown metric meterd_http_request_duration_seconds ", out)

    def test_a_file_without_expressions_is_an_error(self):
        empty = tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False)
        empty.write("groups: []\n")
        empty.close()
        self.addCleanup(pathlib.Path(empty.name).unlink)
        self.assertEqual(run(empty.name)[0], 2)


class Dashboard(unittest.TestCase):
    doc = json.loads(DASHBOARD.read_text())

    def test_one_row_per_concern(self):
        rows = [p["title"] for p in self.doc["panels"] if p["type"] == "row"]
        for concern in ["Ingest and checks", "Decisions", "Latency", "WAL and flushes", "Usage store (ClickHouse)",
                        "Redis sync", "Stripe reporter", "Memory and process"]:
            self.assertIn(concern, rows)

    def test_panels_are_well_formed(self):
        ids = [p["id"] for p in self.doc["panels"]]
        self.assertEqual(len(ids), len(set(ids)), "panel ids are unique")
        for p in self.doc["panels"]:
            g = p["gridPos"]
            self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
            if p["type"] != "row":
                self.assertEqual(p["datasource"]["uid"], "${datasource}", p["title"])
                self.assertTrue(p["targets"], p["title"])

    def test_p50_and_p99_by_route(self):
        exprs = check_metrics.dashboard_exprs(self.doc)
        for q in ("0.5", "0.99"):
            self.assertTrue(any(f"histogram_quantile({q}, sum by (le, route) (rate(meterd_http_request_duration_seconds_bucket" in e
                                for e in exprs), q)


if __name__ == "__main__":
    unittest.main()
