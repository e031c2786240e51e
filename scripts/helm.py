#!/usr/bin/env python3
"""Lint and render the chart with Helm's own engine (the helm-python-sdk wheel from PyPI binds
Helm's Go SDK; no helm binary needed). `pip install helm-python-sdk` first.

    python3 scripts/helm.py lint charts/philotes [--set-json '{"watchNamespace": "shop"}']
    python3 scripts/helm.py template charts/philotes [-n NAMESPACE] [--name RELEASE] [--set-json JSON]

`template` prints the rendered manifests as one YAML stream, in a stable order, like
`helm template`; `lint` fails on any warning (like `helm lint --strict`).
"""
import argparse
import json
import sys

try:
    from helm_python import chart as helm_chart
except ImportError:
    sys.exit("helm-python-sdk is not installed: pip install helm-python-sdk")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["lint", "template"])
    p.add_argument("chart")
    p.add_argument("-n", "--namespace", default="philotes-system")
    p.add_argument("--name", default="philotes")
    p.add_argument("--set-json", default="{}")
    a = p.parse_args()
    values = json.loads(a.set_json)
    if a.command == "lint":
        report = helm_chart.lint(a.chart, values, strict=True, namespace=a.namespace)
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        for m in report.get("messages", []):
            print(f"[{m.get('severity')}] {m.get('path')}: {m.get('error')}", file=sys.stderr)
        for e in report.get("errors", []) or []:
            print(f"error: {e}", file=sys.stderr)
        if problems or report.get("errors"):
            return 1
        print(f"linted {report.get('total_charts_linted')} chart(s): no warnings")
        return 0
    c = helm_chart.Chart.load(a.chart)
    rendered = c.render(values, name=a.name, namespace=a.namespace, is_install=True)
    docs = []
    for path in sorted(rendered):
        text = rendered[path].strip()
        if not text or path.endswith("NOTES.txt"):
            continue
        docs.append(f"# Source: {path}\n{text}\n")
    sys.stdout.write("---\n".join(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
