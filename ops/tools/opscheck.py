#!/usr/bin/env python3
"""Checks behind ops/check.sh that no off-the-shelf tool does. Needs PyYAML.

    opscheck.py metric-names              names of our metrics used by alerts and dashboards
    opscheck.py check-metrics             those names == ops/metrics-contract.txt; external
                                          (cAdvisor / kube-state-metrics) names are allowed ones
    opscheck.py dashboard-rules OUT.yaml  every dashboard query as a recording rule, with Grafana
                                          variables substituted, for `promtool check rules`
    opscheck.py check-dashboards          uid, schemaVersion, datasource variable, titles
    opscheck.py check-alert-tests         every alert has a firing and a not-firing test case
    opscheck.py check-k8s [--external-secrets A,B] FILE...
                                          references inside rendered manifests resolve (the
                                          named Secrets are made outside, e.g. sealed-secrets)
    opscheck.py helm-external-secrets CHART VALUES
                                          names of the Secrets the chart leaves to others with
                                          these values (secret.create false), comma-separated
"""
import glob
import json
import os
import re
import sys

import yaml

OPS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALERTS = os.path.join(OPS, "prometheus", "alerts.yaml")
ALERT_TESTS = os.path.join(OPS, "prometheus", "alerts_test.yaml")
DASHBOARDS = sorted(glob.glob(os.path.join(OPS, "grafana", "dashboards", "*.json")))
CONTRACT = os.path.join(OPS, "metrics-contract.txt")

# Names from cAdvisor and kube-state-metrics that rules and dashboards may use. They are not ours,
# so `metric-names` leaves them out.
EXTERNAL = {
    "container_cpu_usage_seconds_total",
    "container_memory_working_set_bytes",
    "container_spec_memory_limit_bytes",
    "kube_deployment_status_replicas_available",
    "kube_pod_container_status_restarts_total",
    "kube_statefulset_status_replicas_ready",
}
DASHBOARD_UIDS = {"enablement-overview", "metering", "oversight", "runtime", "messaging",
                  "golden-signals", "cost-attribution", "k8s-resources"}

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "atan2"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    return 1


def promql_metric_names(expr):
    """Metric names in a PromQL expression (Grafana variables allowed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)                                          # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                                         # ranges
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def alert_rules():
    with open(ALERTS, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_queries():
    """(file, panel title, expr) for every panel target and every query variable."""
    for path in DASHBOARDS:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        for p in d.get("panels", []):
            for t in p.get("targets", []):
                yield path, p.get("title", ""), t["expr"]
        for v in d.get("templating", {}).get("list", []):
            if v.get("type") == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q.strip())
                yield path, f"variable {v['name']}", m.group(1) if m else q


def used_names():
    names = set()
    for r in alert_rules():
        names |= promql_metric_names(r["expr"])
    for _, _, expr in dashboard_queries():
        names |= promql_metric_names(expr)
    base = set()
    for n in names:
        for suffix in HISTOGRAM_SUFFIXES:
            if n.endswith(suffix):
                n = n[: -len(suffix)]
                break
        base.add(n)
    return base


def contract_names():
    with open(CONTRACT, encoding="utf-8") as f:
        return {l.strip() for l in f if l.strip() and not l.startswith("#")}


def cmd_metric_names():
    for n in sorted(used_names() - EXTERNAL):
        print(n)
    return 0


def cmd_check_metrics():
    used, contract = used_names(), contract_names()
    rc = 0
    ours = {n for n in used if n not in EXTERNAL}
    for n in sorted(ours - contract):
        rc |= fail(f"{n} is used by alerts/dashboards but is not in metrics-contract.txt")
    for n in sorted(contract - ours):
        rc |= fail(f"{n} is in metrics-contract.txt but no alert or dashboard uses it")
    if rc == 0:
        print(f"metrics: {len(ours)} contract names used, "
              f"{len(used & EXTERNAL)} cAdvisor/kube-state-metrics names")
    return rc


def cmd_dashboard_rules(out):
    subst = {"$__rate_interval": "5m", "$__range": "6h", "$__interval": "1m",
             "$namespace": ".*", "${datasource}": ""}
    rules = []
    for path, title, expr in dashboard_queries():
        for k, v in subst.items():
            expr = expr.replace(k, v)
        if "$" in expr:
            return fail(f"{os.path.basename(path)} '{title}': unknown variable in {expr}")
        rules.append({"record": f"dashboard:query_{len(rules)}", "expr": expr,
                      "labels": {"dashboard": os.path.basename(path), "panel": title}})
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard_queries", "rules": rules}]}, f)
    print(f"dashboards: {len(rules)} queries written to {out}")
    return 0


def cmd_check_dashboards():
    rc = 0
    uids = set()
    for path in DASHBOARDS:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        name = os.path.basename(path)
        uids.add(d.get("uid"))
        if name != f"{d.get('uid')}.json":
            rc |= fail(f"{name}: file name must be <uid>.json")
        if d.get("schemaVersion") != 39:
            rc |= fail(f"{name}: schemaVersion must be 39")
        variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
        if variables.get("datasource", {}).get("query") != "prometheus":
            rc |= fail(f"{name}: needs a Prometheus datasource variable")
        ids = [p["id"] for p in d["panels"]]
        if len(ids) != len(set(ids)):
            rc |= fail(f"{name}: duplicate panel ids")
        for p in d["panels"]:
            if p.get("datasource", {}).get("uid") != "${datasource}":
                rc |= fail(f"{name} '{p['title']}': panel must use the datasource variable")
            if not p.get("targets"):
                rc |= fail(f"{name} '{p['title']}': panel has no query")
    if uids != DASHBOARD_UIDS:
        rc |= fail(f"dashboard uids {sorted(uids)} != {sorted(DASHBOARD_UIDS)}")
    if rc == 0:
        print(f"dashboards: {len(DASHBOARDS)} dashboards well-formed")
    return rc


def cmd_check_alert_tests():
    with open(ALERT_TESTS, encoding="utf-8") as f:
        tests = yaml.safe_load(f)["tests"]
    firing, quiet = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    rc = 0
    names = [r["alert"] for r in alert_rules() if "alert" in r]
    for n in names:
        if n not in firing:
            rc |= fail(f"alert {n} has no test case where it fires")
        if n not in quiet:
            rc |= fail(f"alert {n} has no test case where it does not fire")
    for n in sorted((firing | quiet) - set(names)):
        rc |= fail(f"alerts_test.yaml tests {n}, which alerts.yaml does not define")
    if rc == 0:
        print(f"alert tests: all {len(names)} alerts have firing and not-firing cases")
    return rc


def cmd_helm_external_secrets(chart, values_file):
    def merge(base, over):
        for k, v in over.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                merge(base[k], v)
            else:
                base[k] = v
        return base

    with open(os.path.join(chart, "values.yaml"), encoding="utf-8") as f:
        values = yaml.safe_load(f)
    with open(values_file, encoding="utf-8") as f:
        merge(values, yaml.safe_load(f) or {})
    secrets = [values.get("secret", {}), values.get("auditExporter", {}).get("secret") or {}]
    secrets += [p.get("secret") or {} for p in values.get("products", {}).values()]
    print(",".join(s["name"] for s in secrets if s.get("name") and not s.get("create", True)))
    return 0


def cmd_check_k8s(args):
    """Cross-object references kubernetes-validate cannot see (it checks objects one by one)."""
    external = set()
    if args[:1] == ["--external-secrets"]:
        external = {n for n in args[1].split(",") if n}
        args = args[2:]
    paths = args
    rc = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        by_kind = {}
        for d in docs:
            by_kind.setdefault(d["kind"], []).append(d)
        name = os.path.basename(path)

        def matches(selector, labels):
            return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

        workloads = by_kind.get("Deployment", []) + by_kind.get("StatefulSet", [])
        pods = [(d, d["spec"]["template"]) for d in workloads]
        pod_templates = [t for _, t in pods] + [d["spec"]["template"]
                                                 for d in by_kind.get("Job", [])]
        configmaps = {d["metadata"]["name"] for d in by_kind.get("ConfigMap", [])}
        secrets = {d["metadata"]["name"] for d in by_kind.get("Secret", [])} | external
        scalable = {(d["kind"], d["metadata"]["name"]) for d in workloads}
        services = {d["metadata"]["name"]: d for d in by_kind.get("Service", [])}

        for dep, tpl in pods:
            n = dep["metadata"]["name"]
            if not matches(dep["spec"]["selector"]["matchLabels"], tpl["metadata"]["labels"]):
                rc |= fail(f"{name}: {dep['kind']} {n} selector does not match its pod labels")
            if dep["kind"] == "StatefulSet":
                governing = services.get(dep["spec"].get("serviceName"))
                if not governing or governing["spec"].get("clusterIP") != "None":
                    rc |= fail(f"{name}: StatefulSet {n} needs its serviceName to be a headless "
                               f"Service of the same manifests")
            for c in tpl["spec"]["containers"]:
                ports = {p["name"] for p in c.get("ports", [])}
                for probe in ("readinessProbe", "livenessProbe"):
                    port = c.get(probe, {}).get("httpGet", {}).get("port")
                    if port is None:
                        rc |= fail(f"{name}: {n} has no HTTP {probe}")
                    elif isinstance(port, str) and port not in ports:
                        rc |= fail(f"{name}: {n} {probe} uses unknown port {port}")
        for tpl in pod_templates:
            for c in tpl["spec"].get("containers", []) + tpl["spec"].get("initContainers", []):
                for ef in c.get("envFrom", []):
                    ref = ef.get("configMapRef", {}).get("name")
                    if ref and ref not in configmaps:
                        rc |= fail(f"{name}: {c['name']} uses missing ConfigMap {ref}")
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")
                    if ref and ref not in secrets:
                        rc |= fail(f"{name}: {c['name']} uses missing Secret {ref}")
                    ref = e.get("valueFrom", {}).get("configMapKeyRef", {}).get("name")
                    if ref and ref not in configmaps:
                        rc |= fail(f"{name}: {c['name']} uses missing ConfigMap {ref}")
                mounts = {m["name"] for m in c.get("volumeMounts", [])}
                volumes = {v["name"] for v in tpl["spec"].get("volumes", [])}
                for m in sorted(mounts - volumes):
                    rc |= fail(f"{name}: {c['name']} mounts undeclared volume {m}")
            for v in tpl["spec"].get("volumes", []):
                ref = v.get("secret", {}).get("secretName")
                if ref and ref not in secrets:
                    rc |= fail(f"{name}: volume {v['name']} uses missing Secret {ref}")
                ref = v.get("configMap", {}).get("name")
                if ref and ref not in configmaps:
                    rc |= fail(f"{name}: volume {v['name']} uses missing ConfigMap {ref}")
        for svc in by_kind.get("Service", []):
            n = svc["metadata"]["name"]
            targets = [t for t in pod_templates if matches(svc["spec"]["selector"],
                                                           t["metadata"]["labels"])]
            if not targets:
                rc |= fail(f"{name}: Service {n} selects no pods")
            names = {p["name"] for t in targets for c in t["spec"]["containers"]
                     for p in c.get("ports", [])}
            for p in svc["spec"]["ports"]:
                if isinstance(p["targetPort"], str) and p["targetPort"] not in names:
                    rc |= fail(f"{name}: Service {n} targets unknown port {p['targetPort']}")
        for hpa in by_kind.get("HorizontalPodAutoscaler", []):
            ref = hpa["spec"]["scaleTargetRef"]
            if (ref["kind"], ref["name"]) not in scalable:
                rc |= fail(f"{name}: HPA {hpa['metadata']['name']} targets a missing "
                           f"{ref['kind']} {ref['name']}")
        for pdb in by_kind.get("PodDisruptionBudget", []):
            if not any(matches(pdb["spec"]["selector"]["matchLabels"], t["metadata"]["labels"])
                       for t in pod_templates):
                rc |= fail(f"{name}: PDB {pdb['metadata']['name']} selects no pods")
        for sm in by_kind.get("ServiceMonitor", []):
            svcs = [s for s in by_kind.get("Service", [])
                    if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
            ports = {p.get("name") for s in svcs for p in s["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                if not svcs or ep["port"] not in ports:
                    rc |= fail(f"{name}: ServiceMonitor {sm['metadata']['name']} scrapes "
                               f"port {ep['port']} of no Service")
        if rc == 0:
            print(f"{name}: {len(docs)} objects, references resolve")
    return rc


def main(argv):
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "metric-names":
        return cmd_metric_names()
    if cmd == "check-metrics":
        return cmd_check_metrics()
    if cmd == "dashboard-rules":
        return cmd_dashboard_rules(args[0])
    if cmd == "check-dashboards":
        return cmd_check_dashboards()
    if cmd == "check-alert-tests":
        return cmd_check_alert_tests()
    if cmd == "check-k8s":
        return cmd_check_k8s(args)
    if cmd == "helm-external-secrets":
        return cmd_helm_external_secrets(*args)
    print(f"unknown command {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
