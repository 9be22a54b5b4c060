"""The Grafana dashboard ConfigMap, generated from manifests/grafana/dashboard.json.

The JSON is the source (edit it in Grafana, export, save); the ConfigMap that Grafana's
dashboard sidecar loads is derived from it:

    python -m splice.kube.dashboard manifests/grafana/dashboard.json \
        > manifests/monitoring/grafana-dashboard-configmap.yaml
"""

from __future__ import annotations

import json
import sys

HEADER = """\
# Generated from manifests/grafana/dashboard.json by `python -m splice.kube.dashboard`;
# do not edit by hand. Grafana's dashboard sidecar (kube-prometheus-stack) loads ConfigMaps
# labelled grafana_dashboard=1 in the namespaces it watches.
apiVersion: v1
kind: ConfigMap
metadata:
  name: splice-grafana-dashboard
  namespace: splice-system
  labels:
    app.kubernetes.io/name: splice
    grafana_dashboard: "1"
data:
  splice-dashboard.json: |
"""


def configmap_yaml(dashboard_json: str) -> str:
    json.loads(dashboard_json)   # refuse to wrap something that is not JSON
    body = "".join(f"    {line}\n" if line else "\n"
                   for line in dashboard_json.rstrip("\n").split("\n"))
    return HEADER + body


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        sys.stdout.write(configmap_yaml(f.read()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
