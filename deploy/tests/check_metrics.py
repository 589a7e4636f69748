#!/usr/bin/env python3
"""Checks that every PromQL expression in the Grafana dashboards and Prometheus
rule files names only metrics meterd exports.

    deploy/tests/check_metrics.py [--telemetry src/telemetry.rs] FILE...

FILE is a Grafana dashboard (.json: every `expr` in it, and query variables'
`query`/`definition`) or a Prometheus rule file (.yml/.yaml: every rule's `expr`).

Exported names are the `pub const X: &str = "meterd_...";` constants of
src/telemetry.rs -- a histogram (a constant passed to `histogram!` or
`describe_histogram!`) as NAME_bucket, NAME_sum and NAME_count -- plus ALLOWED
below. Exits 1 naming every unknown metric and the expression it is in, 2 on a
usage error or a file with no expression at all.
"""
import argparse
import json
import pathlib
import re
import sys

import yaml

# Not meterd_* constants of src/telemetry.rs, yet on meterd's /metrics or in Prometheus.
ALLOWED = {
    "up",  # written by Prometheus for every scrape target
    # process metrics on meterd's /metrics
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
}
# meterd metrics being added by parallel work (issue 23's telemetry branch): accepted
# with a warning while src/telemetry.rs does not have them; delete an entry once it does.
PENDING: set = set()

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan", "atan2", "start", "end",
}


def exported_metrics(telemetry: str) -> set:
    consts = dict(re.findall(r'pub\s+const\s+([A-Z0-9_]+)\s*:\s*&str\s*=\s*"(meterd_[a-z0-9_]+)"', telemetry))
    histograms = set(re.findall(r'(?:describe_histogram|histogram)!\(\s*([A-Z0-9_]+)', telemetry))
    names = set()
    for const, name in consts.items():
        if const in histograms:
            names |= {name + "_bucket", name + "_sum", name + "_count"}
        else:
            names.add(name)
    return names


def metric_names(expr: str) -> set:
    """The metric names a PromQL expression selects (Grafana variables allowed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    e = re.sub(r"\{[^{}]*\}", " ", e)                                             # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                                             # ranges, subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\$\{?[A-Za-z0-9_]+\}?", " ", e)                                 # Grafana variables
    e = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", e)
    names = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(word)
    return names


def dashboard_exprs(doc) -> list:
    out = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "expr" and isinstance(v, str):
                    out.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc.get("panels", []))
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            if isinstance(q, str):
                out.append(re.sub(r"^\s*(label_values|query_result)\((.*)\)\s*$", _variable_selector, q))
    return out


def _variable_selector(m):
    # label_values(metric, label) -> metric; query_result(expr) -> expr
    args = m.group(2)
    return args.rsplit(",", 1)[0] if m.group(1) == "label_values" and "," in args else args


def rule_exprs(doc) -> list:
    return [r["expr"] for g in (doc or {}).get("groups", []) for r in g.get("rules", []) if "expr" in r]


def main(argv=None) -> int:
    root = pathlib.Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--telemetry", default=str(root / "src" / "telemetry.rs"))
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)

    exported = exported_metrics(pathlib.Path(args.telemetry).read_text())
    if not exported:
        print(f"check_metrics: no meterd_* constants found in {args.telemetry}", file=sys.stderr)
        return 2
    known = exported | ALLOWED
    unknown, pending_used, checked, n_exprs = [], set(), set(), 0
    for f in args.files:
        text = pathlib.Path(f).read_text()
        exprs = dashboard_exprs(json.loads(text)) if f.endswith(".json") else rule_exprs(yaml.safe_load(text))
        if not exprs:
            print(f"check_metrics: {f}: no expression found", file=sys.stderr)
            return 2
        n_exprs += len(exprs)
        for expr in exprs:
            for name in sorted(metric_names(expr)):
                checked.add(name)
                if name in known:
                    continue
                if name in PENDING:
                    pending_used.add(name)
                    continue
                unknown.append((f, name, " ".join(expr.split())))
    for name in sorted(pending_used):
        print(f"check_metrics: warning: {name} is not in {args.telemetry} yet (PENDING list)", file=sys.stderr)
    for name in sorted(PENDING & exported):
        print(f"check_metrics: note: {name} is exported now: delete it from PENDING", file=sys.stderr)
    for f, name, expr in unknown:
        print(f"{f}: unknown metric {name} in: {expr}", file=sys.stderr)
    if unknown:
        print(f"check_metrics: FAILED: {len(unknown)} unknown metric reference(s)", file=sys.stderr)
        return 1
    print(f"check_metrics: ok: {n_exprs} expressions in {len(args.files)} file(s) name {len(checked)} metrics, all exported "
          f"({len(exported)} names from {pathlib.Path(args.telemetry).name}, {len(ALLOWED)} allowed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
