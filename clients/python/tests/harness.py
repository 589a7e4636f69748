"""Starts the real meterd binary for the tests: a config in a temp dir (a free
loopback port, data_dir inside, one all-scopes API key), SIGKILL and restart
on the same port and data dir. The binary is $METERD_BIN or this
repository's target/debug/meterd; without it the tests fail."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, Optional

HERE = Path(__file__).resolve().parent
BIN = Path(os.environ.get("METERD_BIN") or HERE.parents[2] / "target" / "debug" / "meterd")

METERS_AND_PLANS = """
[[meters]]
name = "tokens"
aggregation = "sum"

[[meters]]
name = "interview_minutes"
aggregation = "sum"
precision = 2

[[meters]]
name = "interviews"
aggregation = "count"

[[meters]]
name = "ai_credits"
aggregation = "sum"

[[plans]]
name = "starter"
default = true
features = { advanced_analytics = false }
[plans.limits]
tokens = { limit = "unlimited", window = "month" }
interview_minutes = { limit = 300, window = "total" }
interviews = { limit = 3, window = "total" }
ai_credits = { limit = "credits", low_balance = 10 }

[[plans]]
name = "premium"
features = { advanced_analytics = true }
[plans.limits]
tokens = { limit = "unlimited", window = "month" }
interview_minutes = { limit = "unlimited" }
interviews = { limit = "unlimited" }
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MeterdProcess:
    def __init__(self, extra: str = "", env: Optional[Dict[str, str]] = None) -> None:
        if not BIN.exists():
            raise RuntimeError(f"no meterd binary at {BIN}: run `cargo build` first (or set METERD_BIN)")
        self.dir = Path(tempfile.mkdtemp(prefix="meterd-py-"))
        self.port = free_port()
        self.api_key = "key-" + secrets.token_hex(12)
        self.limited_key = "limited-" + secrets.token_hex(12)
        sha = hashlib.sha256(self.api_key.encode()).hexdigest()
        limited_sha = hashlib.sha256(self.limited_key.encode()).hexdigest()
        self.config = self.dir / "meterd.toml"
        self.config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\n\n[storage]\ndata_dir = "{self.dir / "data"}"\n'
            + METERS_AND_PLANS
            + f'\n[[auth.keys]]\nname = "all"\nkey_sha256 = "{sha}"\nscopes = ["ingest", "check", "read", "admin"]\n'
            + f'\n[[auth.keys]]\nname = "limited"\nkey_sha256 = "{limited_sha}"\nscopes = ["ingest"]\n'
            + "rate_limit_per_second = 1\nrate_limit_burst = 1\n"
            + extra
        )
        self.log = self.dir / "meterd.log"
        self.env = {k: v for k, v in os.environ.items() if k not in ("METERD_LISTEN", "METERD_CONFIG")}
        self.env.update(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self.restart()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restart(self) -> None:
        """Starts meterd (again) on the same port and data dir; waits for /healthz."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN), "--config", str(self.config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env
            )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meterd exited early; log:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"meterd never became healthy; log:\n{self.log.read_text()}")
            time.sleep(0.025)

    def kill(self) -> None:
        """SIGKILL, and wait for the exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def get(self, path: str):
        """An authorized GET, independent of the client under test."""
        req = urllib.request.Request(self.url + path, headers={"authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def total(self, meter: str, customer: Optional[str] = None) -> float:
        """The total of `meter` (over every customer, or one) from /v1/usage (store + unflushed)."""
        now = datetime.now(timezone.utc)
        q = {
            "meter": meter,
            "from": (now - timedelta(days=2)).isoformat(),
            "to": (now + timedelta(days=2)).isoformat(),
            "granularity": "day",
        }
        if customer is not None:
            q["customer"] = customer
        body = self.get("/v1/usage?" + urllib.parse.urlencode(q))
        return sum(row["value"] for row in body["data"])
