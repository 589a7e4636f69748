#!/usr/bin/env python3
"""Prints a Prometheus rule file with one recording rule per expression of a
Grafana dashboard, its variables replaced by plain values, so that
`promtool check rules` parses every dashboard query (deploy/test does that).

    deploy/tests/dashboard_rules.py deploy/grafana/meterd.json > /tmp/rules.yml
"""
import json
import re
import sys

import yaml

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from check_metrics import dashboard_exprs  # noqa: E402

VARS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def plain(expr: str) -> str:
    return re.sub(r"\$\{?([A-Za-z0-9_]+)\}?", lambda m: VARS.get(m.group(1), ".*"), expr)


def main() -> int:
    exprs = dashboard_exprs(json.load(open(sys.argv[1])))
    rules = [{"record": f"dashboard:expr_{i}", "expr": plain(e)} for i, e in enumerate(exprs)]
    yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sys.stdout, sort_keys=False)
    return 0 if rules else 1


if __name__ == "__main__":
    sys.exit(main())
