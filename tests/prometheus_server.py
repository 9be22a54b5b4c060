"""A real Prometheus for tests: the Debian `prometheus` binary on loopback, scraping static
targets every second into a temporary TSDB, queried over its HTTP API.

    with PrometheusServer(require_prometheus_binary(), ["127.0.0.1:9400"]) as prom:
        prom.wait_for_scrapes(after_s=time.time(), count=2, num_targets=1, timeout_s=10)
        series = prom.query("splice_epoch")

`check_dashboard_against(prom, path)` evaluates every PromQL expression of a Grafana
dashboard (panels, annotations, template variables) and returns what failed, so the same
check runs against synthetic exporters and against a real local job.

Without the binary the tests skip, except in CI (CI=true) where they fail: a CI run that
silently skipped the scrape tests would prove nothing about the metrics.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

PROMETHEUS_BINARY_ENV = "SPLICE_PROMETHEUS_BINARY"
JOB_LABEL = "splice"
SCRAPE_INTERVAL_S = 1.0
READY_TIMEOUT_S = 30.0   # ~1 s on an idle 2-core machine; a loaded one replays slower

# How the dashboard's variables are filled in when it is checked: every job and namespace,
# and intervals long enough to hold several 1 s scrapes.
DEFAULT_VARIABLES = {"job": ".*", "namespace": ".*", "__rate_interval": "1m",
                     "__interval": "15s", "__range": "1h", "datasource": ""}

Series = dict[str, Any]   # one element of an API result: {"metric": {...}, "value": [t, v]}


class PromQLError(RuntimeError):
    """Prometheus refused the query (bad PromQL, or it failed); `error` is its text."""

    def __init__(self, expr: str, error: str) -> None:
        super().__init__(f"{error} in query: {expr}")
        self.expr = expr
        self.error = error


def find_prometheus_binary() -> str | None:
    return os.environ.get(PROMETHEUS_BINARY_ENV) or shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)


def require_prometheus_binary() -> str:
    """The prometheus binary, or skip the test (fail it in CI, where a skip hides a gap)."""
    binary = find_prometheus_binary()
    if binary is None:
        reason = (f"prometheus binary not found (PATH, /usr/bin/prometheus or "
                  f"${PROMETHEUS_BINARY_ENV}); install the Debian package `prometheus` "
                  "(make setup-test) to run the scrape tests")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " -- required in CI")
        pytest.skip(reason)
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_config(targets: Sequence[str],
                  target_labels: Mapping[str, Mapping[str, str]] | None = None) -> dict:
    """Prometheus configuration: job "splice" scraping `targets` ("host:port") every
    second; `target_labels[target]` adds labels to that target's series (as a PodMonitor's
    relabelling adds `namespace` and `pod`)."""
    labels = target_labels or {}
    interval = f"{int(SCRAPE_INTERVAL_S * 1000)}ms"
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{
                "job_name": JOB_LABEL, "scrape_timeout": interval,
                "static_configs": [{"targets": [t], "labels": dict(labels.get(t, {}))}
                                   for t in targets]}]}


class PrometheusServer:
    """One Prometheus process with its own config, TSDB directory and port."""

    def __init__(self, binary: str, targets: Sequence[str],
                 target_labels: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="splice-prometheus-"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "prometheus.log"
        config = self.root / "prometheus.yml"
        config.write_text(json.dumps(scrape_config(targets, target_labels), indent=2))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready(READY_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready after {timeout_s} s:\n{self.log()}")
            time.sleep(0.05)

    def _api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:   # 400/422/503 carry the error as JSON
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PromQLError(params.get("query", path) if params else path,
                              f"{body.get('errorType', 'error')}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[Series]:
        """Evaluate `expr` now; the result's series (a scalar or string comes back as one
        series without labels). Raises PromQLError when Prometheus refuses it."""
        data = self._api("query", {"query": expr})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def wait_for_series(self, expr: str, timeout_s: float) -> list[Series]:
        """Poll `expr` until it returns at least one series; returns them."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no series for {expr} after {timeout_s} s; targets: "
                                   f"{self.target_health()}")
            time.sleep(0.1)

    def wait_for_scrapes(self, *, after_s: float, count: int, num_targets: int,
                         timeout_s: float) -> None:
        """Wait until each of `num_targets` targets was scraped successfully `count` times
        after Unix time `after_s` (so rate() over what changed before `after_s` works)."""
        deadline = time.monotonic() + timeout_s
        while True:
            window_ms = max(1, int((time.time() - after_s) * 1000))
            # up is 1 for each successful scrape, so its sum over the window counts them.
            expr = f'sum_over_time(up{{job="{JOB_LABEL}"}}[{window_ms}ms]) >= {count}'
            if len(self.query(expr)) >= num_targets:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} scrapes of {num_targets} targets "
                                   f"after {timeout_s} s; targets: {self.target_health()}")
            time.sleep(0.1)

    def target_health(self) -> list[dict[str, str]]:
        """Each target's scrape URL, health and last error (for failure messages)."""
        return [{k: t.get(k, "") for k in ("scrapeUrl", "health", "lastError")}
                for t in self._api("targets")["activeTargets"]]

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ---- checking a Grafana dashboard against what Prometheus holds ---------------------------

_LABEL_VALUES = re.compile(r"^label_values\((?P<expr>.*),\s*(?P<label>\w+)\s*\)$", re.S)
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def substitute_variables(expr: str, variables: Mapping[str, str]) -> str:
    """`$name` / `${name}` replaced from `variables`; KeyError names one that is missing."""
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"dashboard variable ${name} has no value to check with")
        return variables[name]
    return _VARIABLE.sub(one, expr)


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every query: panel targets, annotations, template variables
    (Grafana's `label_values(expr, label)` is kept whole; see check_dashboard_against)."""
    out = []
    for panel in dashboard.get("panels", []):
        for t in panel.get("targets", []):
            out.append((f"panel {panel['id']} {panel['title']!r} {t['refId']}", t["expr"]))
    for ann in dashboard.get("annotations", {}).get("list", []):
        if "expr" in ann:
            out.append((f"annotation {ann['name']!r}", ann["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            out.append((f"variable ${var['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def check_dashboard_against(prom: PrometheusServer, dashboard_path: str | Path,
                            variables: Mapping[str, str] = DEFAULT_VARIABLES,
                            require_numbers: bool = False) -> list[str]:
    """Evaluate every query of the dashboard at `dashboard_path`; one line per failure:
    Prometheus refused it, it returned no series, or (for `label_values`) no series had
    the label. An empty list means every panel would show data.

    `require_numbers`: also fail a query whose every value is NaN (a quantile of a
    histogram that saw nothing in the window); only for data that should fill every panel.
    """
    dashboard = json.loads(Path(dashboard_path).read_text())
    failures = []
    for where, raw in dashboard_queries(dashboard):
        try:
            expr = substitute_variables(raw, variables)
        except KeyError as e:
            failures.append(f"{where}: {e.args[0]}: {raw}")
            continue
        m = _LABEL_VALUES.match(expr.strip())
        expr, label = (m["expr"], m["label"]) if m else (expr, None)
        try:
            result = prom.query(expr)
        except PromQLError as e:
            failures.append(f"{where}: {e.error}: {expr}")
            continue
        if label is not None:
            result = [s for s in result if s["metric"].get(label)]
        if not result:
            failures.append(f"{where}: no series" + (f" with label {label}" if label else "")
                            + f": {expr}")
        elif require_numbers and all(math.isnan(float(s["value"][1])) for s in result):
            failures.append(f"{where}: only NaN: {expr}")
    return failures
