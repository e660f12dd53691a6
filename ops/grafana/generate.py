#!/usr/bin/env python3
"""Writes the Grafana dashboards in ops/grafana/dashboards/ (one JSON file per dashboard).

The JSON files are committed; edit this file and run it again instead of editing them by hand.
`ops/check.sh` regenerates into a temporary directory and fails if the committed files differ.

    python3 ops/grafana/generate.py [OUTPUT_DIR]

Only metrics from ops/metrics-contract.txt are used (plus cAdvisor / kube-state-metrics names in
k8s-resources); check.sh verifies that too. Standard library only.
"""
import json
import os
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"

# Label matcher every query carries: the namespace label is added by the ServiceMonitor scrape.
NS = 'namespace=~"$namespace"'

# gRPC codes that are the caller's fault; the same list as HighErrorRate in alerts.yaml.
CLIENT_CODES = ("(?i)ok|canceled|cancelled|invalid_?argument|not_?found|already_?exists|"
                "permission_?denied|unauthenticated|resource_?exhausted|failed_?precondition|"
                "out_?of_?range")


def sel(*matchers):
    """A label selector with the namespace matcher first: sel('a="b"') -> {namespace=~..,a="b"}."""
    return "{" + ",".join((NS,) + matchers) + "}"


def rate(metric, *matchers):
    return f"rate({metric}{sel(*matchers)}[{RI}])"


def quantile(q, metric, by="", *matchers):
    group = f"{by}, le" if by else "le"
    return (f"histogram_quantile({q}, sum by ({group}) "
            f"({rate(metric + '_bucket', *matchers)}))")


def ratio(num, den):
    return f"({num}) / ({den})"


SERVER_ERRORS = f'grpc_code!~"{CLIENT_CODES}"'


# Full gRPC service names (the grpc_service label) of the products whose name is fixed.
GRPC_SERVICES = {
    "messaging": "creto.enablement.messaging.v1.MessagingService",
    "oversight": "creto.enablement.oversight.v1.OversightService",
    "runtime": "creto.enablement.runtime.v1.RuntimeService",
}


def svc(product):
    """Matcher for one product's gRPC service: its full name when known, else a pattern."""
    if product in GRPC_SERVICES:
        return f'grpc_service="{GRPC_SERVICES[product]}"'
    return f'grpc_service=~"(?i).*{product}.*"'


class Dashboard:
    def __init__(self, uid, title, description, ns_metric):
        self.uid, self.title, self.description = uid, title, description
        self.ns_metric = ns_metric
        self.panels = []
        self._x = self._y = 0
        self._row_h = 0

    def _place(self, w, h):
        if self._x + w > 24:
            self._x, self._y = 0, self._y + self._row_h
            self._row_h = 0
        pos = {"x": self._x, "y": self._y, "w": w, "h": h}
        self._x += w
        self._row_h = max(self._row_h, h)
        return pos

    def _panel(self, kind, title, targets, unit, w, h, description, extra):
        panel = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": self._place(w, h),
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {"datasource": DS, "refId": chr(ord("A") + i), "expr": expr,
                 "legendFormat": legend}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        panel.update(extra)
        self.panels.append(panel)

    def graph(self, title, targets, unit="short", description="", w=12, h=8, stack=False):
        custom = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
        if stack:
            custom["stacking"] = {"mode": "normal", "group": "A"}
        extra = {"options": {"legend": {"displayMode": "list", "placement": "bottom"},
                             "tooltip": {"mode": "multi", "sort": "desc"}}}
        self._panel("timeseries", title, targets, unit, w, h, description, extra)
        self.panels[-1]["fieldConfig"]["defaults"]["custom"] = custom

    def stat(self, title, expr, unit="short", description="", w=6, h=4, legend=""):
        extra = {"options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                               "values": False},
                             "colorMode": "value", "graphMode": "area",
                             "textMode": "auto"}}
        self._panel("stat", title, [(expr, legend)], unit, w, h, description, extra)

    def to_json(self):
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["creto", "enablement"],
            "schemaVersion": 39,
            "version": 1,
            "editable": True,
            "graphTooltip": 1,
            "time": {"from": "now-6h", "to": "now"},
            "refresh": "30s",
            "timezone": "utc",
            "links": [],
            "annotations": {"list": []},
            "templating": {"list": [
                {"name": "datasource", "label": "Data source", "type": "datasource",
                 "query": "prometheus", "current": {}, "hide": 0, "refresh": 1,
                 "regex": "", "options": []},
                {"name": "namespace", "label": "Namespace", "type": "query",
                 "datasource": DS,
                 "query": {"query": f"label_values({self.ns_metric}, namespace)",
                           "refId": "namespace"},
                 "definition": f"label_values({self.ns_metric}, namespace)",
                 "includeAll": True, "allValue": ".*", "multi": True,
                 "current": {}, "hide": 0, "refresh": 2, "regex": "", "sort": 1,
                 "options": []},
            ]},
            "panels": self.panels,
        }


def product_tail(d, product, projector=True):
    """gRPC and projector panels every product dashboard ends with (messaging has no projector)."""
    d.graph(f"{product} gRPC requests by method",
            [(f"sum by (grpc_method, grpc_code) ({rate('grpc_server_handled_total', svc(product))})",
              "{{grpc_method}} {{grpc_code}}")], "reqps")
    d.graph(f"{product} gRPC latency P95 by method",
            [(quantile(0.95, "grpc_server_handling_seconds", "grpc_method", svc(product)),
              "{{grpc_method}}")], "s")
    if not projector:
        return
    lag = f'enablement_projector_lag_events{sel(f"product={json.dumps(product)}")}'
    d.graph(f"{product} projection lag",
            [(f"max by (product) ({lag})", "lag")], "short",
            "Events on the log not yet in the read models")


def overview():
    d = Dashboard("enablement-overview", "Enablement Overview",
                  "High-level health across all products", "enablement_build_info")
    d.stat("Running versions", f"count by (version) (enablement_build_info{sel()})",
           legend="{{version}}")
    d.stat("Requests / s", f"sum({rate('grpc_server_handled_total')})", "reqps")
    d.stat("Server error ratio",
           ratio(f"sum({rate('grpc_server_handled_total', SERVER_ERRORS)})",
                 f"sum({rate('grpc_server_handled_total')})"), "percentunit")
    d.stat("P95 latency", quantile(0.95, "grpc_server_handling_seconds"), "s")
    d.graph("Requests by service",
            [(f"sum by (grpc_service) ({rate('grpc_server_handled_total')})",
              "{{grpc_service}}")], "reqps")
    d.graph("Server error ratio by service",
            [(ratio(f"sum by (grpc_service) ({rate('grpc_server_handled_total', SERVER_ERRORS)})",
                    f"sum by (grpc_service) ({rate('grpc_server_handled_total')})"),
              "{{grpc_service}}")], "percentunit", "Alert HighErrorRate at 1%")
    d.graph("P95 latency by service",
            [(quantile(0.95, "grpc_server_handling_seconds", "grpc_service"),
              "{{grpc_service}}")], "s", "Alert HighLatency at 500ms")
    d.graph("Projector batch duration P95 by product",
            [(quantile(0.95, "enablement_projector_batch_duration_seconds", "product"),
              "{{product}}")], "s", "Fetch, apply and checkpoint of one batch")
    d.graph("Projection lag by product",
            [(f"max by (product) (enablement_projector_lag_events{sel()})", "{{product}}")],
            description="Alert ProjectionLagHigh at 10000 events")
    d.graph("JetStream consumer pending",
            [(f"max by (stream, consumer) (enablement_stream_consumer_pending{sel()})",
              "{{stream}}/{{consumer}}")],
            description="Alert JetStreamConsumerLagHigh at 10000 messages")
    d.stat("Redis reachable (all pods)", f"min(redis_up{sel()})", "bool",
           "1 when every pod reaches Redis", w=12)
    d.graph("Dead letters / s",
            [(f"sum by (stream, reason) ({rate('enablement_deadletters_total')})",
              "{{stream}} {{reason}}")], "ops")
    return d


def metering():
    d = Dashboard("metering", "Metering Dashboard", "Event ingestion, quota checks, billing",
                  "metering_events_total")
    d.graph("Events ingested / s by type",
            [(f"sum by (event_type) ({rate('metering_events_total')})", "{{event_type}}")],
            "ops", stack=True)
    d.graph("Invalid events / s by reason",
            [(f"sum by (reason) ({rate('metering_events_invalid_total')})", "{{reason}}")], "ops")
    d.stat("Invalid event ratio",
           ratio(f"sum({rate('metering_events_invalid_total')})",
                 f"sum({rate('metering_events_total')})"), "percentunit")
    d.stat("Quota check P99", quantile(0.99, "metering_quota_check_duration_seconds"), "s",
           "Target 10us (alert QuotaCheckSlow)")
    d.stat("Quota exceeded / s", f"sum({rate('metering_quota_exceeded_total')})", "ops")
    d.stat("Events / s", f"sum({rate('metering_events_total')})", "ops")
    d.graph("Quota check latency by action",
            [(quantile(0.5, "metering_quota_check_duration_seconds", "action"), "P50 {{action}}"),
             (quantile(0.99, "metering_quota_check_duration_seconds", "action"),
              "P99 {{action}}")], "s")
    d.graph("Quota exceeded / s by event type",
            [(f"sum by (event_type) ({rate('metering_quota_exceeded_total')})",
              "{{event_type}}")], "ops")
    d.graph("Top 10 subscriptions by events / s",
            [(f"topk(10, sum by (subscription_id) ({rate('metering_events_total')}))",
              "{{subscription_id}}")], "ops")
    d.graph("Aggregation duration P95 by type",
            [(quantile(0.95, "metering_aggregation_duration_seconds", "aggregation_type"),
              "{{aggregation_type}}")], "s")
    d.graph("Invoices generated / s by status",
            [(f"sum by (status) ({rate('metering_invoice_generation_total')})", "{{status}}")],
            "ops")
    d.graph("Redis operations / s",
            [(f"sum by (operation, status) ({rate('metering_redis_operations_total')})",
              "{{operation}} {{status}}")], "ops")
    d.graph("Postgres queries / s",
            [(f"sum by (query_type, status) ({rate('metering_postgres_queries_total')})",
              "{{query_type}} {{status}}")], "ops")
    product_tail(d, "metering")
    return d


def oversight():
    # Metrics of gateways/src/oversight/metrics.rs and notify/mod.rs. Every gateway replica folds
    # every request, so the pending gauge is the same on each: max over replicas (per namespace),
    # never the sum. Counters are counted once, by the replica that did the thing: sum them.
    d = Dashboard("oversight", "Oversight Dashboard", "Pending requests, response times, channels",
                  "oversight_requests_total")
    pending = f"max by (namespace, priority) (oversight_pending_requests{sel()})"
    notified = "oversight_notification_duration_seconds_count"
    slow = rate("oversight_notification_duration_seconds_bucket", 'le="2.5"')
    d.stat("Pending requests", f"sum({pending})", "short",
           "Waiting for a decision, all priorities")
    d.stat("Requests created / s", f"sum({rate('oversight_requests_total')})", "ops")
    approved = sel('decision="approved"')
    d.stat("Approved share of responses (1h)",
           ratio(f"sum(increase(oversight_responses_total{approved}[1h]))",
                 f"sum(increase(oversight_responses_total{sel()}[1h]))"), "percentunit",
           "Approver responses that approve, any channel")
    d.stat("Missed deadlines (1h)",
           f"sum(increase(oversight_timeout_total{sel()}[1h]))", "short",
           "Timed out or escalated (alert OversightTimeoutRateHigh per policy)")
    d.graph("Pending requests by priority",
            [(f"sum by (priority) ({pending})", "{{priority}}")],
            description="Alert OversightBacklog at 50 per priority")
    d.graph("Requests created / s by policy",
            [(f"sum by (policy_id) ({rate('oversight_requests_total')})", "{{policy_id}}")], "ops",
            "policy none: no policy matched (approved at once)")
    d.graph("Responses / s by decision and channel",
            [(f"sum by (decision, channel) ({rate('oversight_responses_total')})",
              "{{decision}} via {{channel}}")], "ops",
            "grpc: Respond; web: the approval page and its one-click links")
    d.graph("Missed deadlines / s by policy",
            [(f"sum by (policy_id) ({rate('oversight_timeout_total')})", "{{policy_id}}")], "ops",
            "Deadlines that passed without a decision: timed out or escalated")
    d.graph("State transitions / s",
            [(f"sum by (from_state, to_state) ({rate('oversight_state_transitions_total')})",
              "{{from_state}} -> {{to_state}}")], "ops")
    d.graph("Top 10 agents by requests / s",
            [(f"topk(10, sum by (agent_id) ({rate('oversight_requests_total')}))",
              "{{agent_id}}")], "ops")
    d.graph("Notifications / s by channel",
            [(f"sum by (channel) ({rate(notified)})", "{{channel}}")], "ops",
            "Deliveries finished (delivered or given up after every attempt)")
    d.graph("Notification delivery time by channel",
            [(quantile(0.5, "oversight_notification_duration_seconds", "channel"),
              "P50 {{channel}}"),
             (quantile(0.95, "oversight_notification_duration_seconds", "channel"),
              "P95 {{channel}}")], "s", "All attempts and backoff included")
    d.graph("Notifications over 2.5s by channel",
            [(ratio(f"sum by (channel) ({rate(notified)}) - sum by (channel) ({slow})",
                    f"sum by (channel) ({rate(notified)})"), "{{channel}}")], "percentunit",
            "Failed, or retried up to the last attempt, with the default retry settings "
            "(alert OversightNotificationsFailing at 20%)")
    notifier = sel('consumer="oversight-notifier"')
    d.graph("Notifier backlog",
            [(f"max by (stream) (enablement_stream_consumer_pending{notifier})", "{{stream}}")],
            "short", "Request events the oversight-notifier consumer has not received yet "
            "(alert OversightNotifierBehind at 100)")
    product_tail(d, "oversight")
    return d


def runtime():
    # Metrics of gateways/src/runtime/metrics.rs. Every series is one replica's own sandboxes
    # (the `pod` label comes from the scrape): sum over pods for the fleet, by pod per replica.
    # Labels: backend (bwrap, runsc), status (success, failure), pool_type (cold: provisioned for
    # the call, warm: claimed from the pool), decision (allow, deny), outcome (exit_zero,
    # exit_nonzero, signal, timeout, oom, pids_limit, disk_full).
    d = Dashboard("runtime", "Runtime Dashboard", "Sandbox lifecycle, warm pool, egress",
                  "runtime_sandbox_active")
    spawned = "runtime_sandbox_spawn_duration_seconds_count"
    failed = rate("runtime_sandbox_spawns_total", 'status="failure"')
    warm = rate(spawned, 'pool_type="warm"')
    denied = rate("runtime_egress_checks_total", 'decision="deny"')
    at_limit = rate("runtime_execs_total", 'outcome=~"oom|pids_limit|disk_full"')
    d.stat("Active sandboxes", f"sum(runtime_sandbox_active{sel()})", "short",
           "Tenants' sandboxes live on the replicas (requested, provisioning or ready)")
    d.stat("Warm sandboxes ready", f"sum(runtime_warmpool_size{sel()})", "short",
           "Every replica keeps RUNTIME_WARM_POOL per template (alert WarmPoolDepleted when a "
           "pool in use stays empty)")
    d.stat("Spawn failure ratio",
           ratio(f"sum({failed})",
                 f"sum({rate('runtime_sandbox_spawns_total')})"), "percentunit",
           "Cold spawns and pool refills that failed (alert RuntimeSpawnFailures at 10% per "
           "replica)")
    d.stat("Cold spawn P95",
           quantile(0.95, "runtime_sandbox_spawn_duration_seconds", "", 'pool_type="cold"'), "s",
           "CreateSandbox to ready when no warm sandbox served it; goal 100 ms "
           "(alert RuntimeColdSpawnSlow)")
    d.stat("Served from the warm pool",
           ratio(f"sum({warm})", f"sum({rate(spawned)})"),
           "percentunit", "Share of CreateSandbox calls answered with a warm sandbox")
    d.stat("Egress deny ratio",
           ratio(f"sum({denied})",
                 f"sum({rate('runtime_egress_checks_total')})"), "percentunit",
           "Connection attempts out of sandboxes refused by their allowlists")
    d.stat("Execs at a limit",
           ratio(f"sum({at_limit})",
                 f"sum({rate('runtime_execs_total')})"), "percentunit",
           "Execs ended by the sandbox's memory (OOM kill) or pids limit "
           "(alert RuntimeExecsHittingLimits at 10%)")
    d.stat("Attestation P99",
           quantile(0.99, "runtime_attestation_generation_duration_seconds"), "s",
           "Build and sign one attestation statement")
    d.graph("Sandbox spawns / s by status",
            [(f"sum by (backend, status) ({rate('runtime_sandbox_spawns_total')})",
              "{{backend}} {{status}}")], "ops",
            "Provisioned sandboxes: cold spawns for callers and warm-pool refills")
    d.graph("Spawn time by pool type",
            [(quantile(0.5, "runtime_sandbox_spawn_duration_seconds", "backend, pool_type"),
              "P50 {{backend}} {{pool_type}}"),
             (quantile(0.95, "runtime_sandbox_spawn_duration_seconds", "backend, pool_type"),
              "P95 {{backend}} {{pool_type}}")], "s",
            "CreateSandbox to ready: warm = claimed from the pool, cold = provisioned "
            "(goal: cold P95 under 100 ms)")
    d.graph("CreateSandbox / s, warm and cold",
            [(f"sum by (pool_type) ({rate(spawned)})", "{{pool_type}}")], "ops",
            "Cold while warm ones were wanted: raise RUNTIME_WARM_POOL", stack=True)
    d.graph("Active sandboxes by replica",
            [(f"sum by (pod) (runtime_sandbox_active{sel()})", "{{pod}}")], "short",
            "A sandbox lives on the replica that created it (its `node`)")
    d.graph("Warm pool by replica, claims / min",
            [(f"sum by (pod) (runtime_warmpool_size{sel()})", "ready {{pod}}"),
             (f"sum by (pod) ({rate('runtime_warmpool_claims_total')}) * 60",
              "claims/min {{pod}}")], "short")
    d.graph("Egress checks / s by decision",
            [(f"sum by (decision) ({rate('runtime_egress_checks_total')})", "{{decision}}")],
            "ops", "Which sandboxes and destinations: table sandbox_egress "
            "(alert RuntimeEgressDenySpike)")
    d.graph("Execs / s by outcome",
            [(f"sum by (outcome) ({rate('runtime_execs_total')})", "{{outcome}}")], "ops",
            "exit_zero, exit_nonzero, signal, timeout, oom (memory limit), pids_limit, disk_full",
            stack=True)
    d.graph("Attestation generation time",
            [(quantile(0.5, "runtime_attestation_generation_duration_seconds"), "P50"),
             (quantile(0.99, "runtime_attestation_generation_duration_seconds"), "P99")], "s")
    product_tail(d, "runtime")
    return d


def messaging():
    # Metrics of gateways/src/messaging/metrics.rs. Messaging has no projector: every gateway
    # replica reads the MESSAGING stream, so there is no projection lag to show.
    d = Dashboard("messaging", "Messaging Dashboard", "Message flow, encryption, delivery",
                  "messaging_messages_sent_total")
    sent = "messaging_messages_sent_total"
    sigs = "messaging_signature_verification_total"
    deliveries = "messaging_delivery_duration_seconds_count"
    accepted = rate(sent, 'status="accepted"')
    refused = rate(sent, 'status!~"accepted|duplicate"')
    bad_sig = rate(sigs, 'status="invalid"')
    redelivered = rate(deliveries, 'status="redelivered"')
    expired = rate(deliveries, 'status="expired"')
    # A replica keeps its last value for a recipient that moved to another replica: take each
    # recipient's highest value, never the sum over replicas.
    depth = f"max by (namespace, recipient_id) (messaging_queue_depth{sel()})"
    d.stat("Sends accepted / s", f"sum({accepted})", "ops")
    d.stat("Refused send ratio", ratio(f"sum({refused})", f"sum({rate(sent)})"), "percentunit",
           "Send calls not accepted, any reason (alert MessagingSendsRefused at 5% per reason)")
    d.stat("Unacknowledged messages", f"sum({depth})", "short",
           "Delivered and not yet acknowledged, summed over recipients (a replica keeps its "
           "last value for a recipient that has since disconnected from it)")
    d.stat("Signature failure ratio", ratio(f"sum({bad_sig})", f"sum({rate(sigs)})"),
           "percentunit", "Alert MessagingSignatureFailures at 1%")
    d.graph("Sends / s by status",
            [(f"sum by (status) ({rate(sent)})", "{{status}}")], "ops",
            "accepted, duplicate (a resend, answered with the stored cursor) or why refused",
            stack=True)
    d.graph("Message flow / s",
            [(f"sum({accepted})", "accepted"),
             (f"sum({rate('messaging_messages_received_total')})", "delivered"),
             (f"sum({redelivered})", "redelivered"),
             (f"sum({expired})", "expired before delivery")],
            "ops", "Stored, handed to the recipient the first time, again after ack_wait, expired")
    d.graph("Signature verifications / s by status",
            [(f"sum by (status) ({rate(sigs)})", "{{status}}")], "ops")
    d.graph("Envelope crypto check latency by algorithm",
            [(quantile(0.5, "messaging_encryption_duration_seconds", "algorithm"),
              "P50 {{algorithm}}"),
             (quantile(0.99, "messaging_encryption_duration_seconds", "algorithm"),
              "P99 {{algorithm}}")], "s",
            "Server time to decode the suite and verify the signature of one envelope "
            "(the server never encrypts or decrypts)")
    d.graph("Delivery time P95 by status",
            [(quantile(0.95, "messaging_delivery_duration_seconds", "status"), "{{status}}")],
            "s", "From store to hand-out (alert MessagingDeliverySlow at 5s for delivered)")
    d.graph("Unacknowledged messages, top 10 recipients",
            [(f"topk(10, {depth})", "{{recipient_id}}")], "short",
            "Alert MessagingQueueDepthGrowing above 1000 and growing")
    product_tail(d, "messaging", projector=False)
    return d


def golden_signals():
    d = Dashboard("golden-signals", "Golden Signals", "Latency, traffic, errors, saturation",
                  "grpc_server_handled_total")
    d.graph("Latency percentiles",
            [(quantile(q, "grpc_server_handling_seconds"), f"P{int(q * 100)}")
             for q in (0.5, 0.95, 0.99)], "s", "SLA: P95 < 100ms, P99 < 500ms")
    d.graph("Traffic by service",
            [(f"sum by (grpc_service) ({rate('grpc_server_handled_total')})",
              "{{grpc_service}}")], "reqps", stack=True)
    d.graph("Server error ratio",
            [(ratio(f"sum({rate('grpc_server_handled_total', SERVER_ERRORS)})",
                    f"sum({rate('grpc_server_handled_total')})"), "errors")],
            "percentunit", "SLA: < 0.1%")
    not_ok = rate("grpc_server_handled_total", 'grpc_code!~"(?i)ok"')
    d.graph("Non-OK responses by code",
            [(f"sum by (grpc_code) ({not_ok})",
              "{{grpc_code}}")], "reqps")
    d.graph("Postgres pool utilisation",
            [(ratio(f"sum by (job) (postgres_pool_connections_active{sel()})",
                    f"sum by (job) (postgres_pool_connections_max{sel()})"), "{{job}}")],
            "percentunit")
    d.graph("Postgres pool connections",
            [(f"sum(postgres_pool_connections_active{sel()})", "active"),
             (f"sum(postgres_pool_connections_idle{sel()})", "idle"),
             (f"sum(postgres_pool_connections_max{sel()})", "max")])
    d.graph("Postgres connection errors / s",
            [(f"sum by (job) ({rate('postgres_connection_errors_total')})", "{{job}}")], "ops")
    d.graph("In-flight gRPC requests",
            [(f"sum(grpc_server_started_total{sel()}) - sum(grpc_server_handled_total{sel()})",
              "in flight")])
    return d


def cost_attribution():
    d = Dashboard("cost-attribution", "Cost Attribution", "Per-customer resource usage",
                  "metering_events_total")
    top = "topk(20, sum by ({label}) (increase({metric}{sel}[$__range])))"
    d.graph("Events by subscription (top 20, selected range)",
            [(top.format(label="subscription_id", metric="metering_events_total", sel=sel()),
              "{{subscription_id}}")])
    d.graph("Quota exceeded by subscription (top 20)",
            [(top.format(label="subscription_id", metric="metering_quota_exceeded_total",
                         sel=sel()), "{{subscription_id}}")])
    d.graph("Oversight requests by agent (top 20)",
            [(top.format(label="agent_id", metric="oversight_requests_total", sel=sel()),
              "{{agent_id}}")])
    d.graph("Messages sent by sender (top 20)",
            [(top.format(label="sender_id", metric="messaging_messages_sent_total", sel=sel()),
              "{{sender_id}}")])
    d.graph("Messages received by recipient (top 20)",
            [(top.format(label="recipient_id", metric="messaging_messages_received_total",
                         sel=sel()), "{{recipient_id}}")])
    d.graph("Stored events by stream",
            [(f"max by (stream) (enablement_stream_messages{sel()})", "{{stream}}")],
            description="Messages held by each JetStream stream (storage cost)")
    return d


def k8s_resources():
    d = Dashboard("k8s-resources", "Kubernetes Resources", "Pod health, CPU, memory",
                  'kube_deployment_status_replicas_available{deployment=~"creto-.+"}')
    c = sel('container="enablement"')
    dep = sel('deployment=~"creto-.+"')
    sts = sel('statefulset=~"creto-.+"')
    d.stat("Available replicas",
           f"sum(kube_deployment_status_replicas_available{dep}) + "
           f"(sum(kube_statefulset_status_replicas_ready{sts}) or vector(0))", "short",
           "Deployments' available and the runtime StatefulSet's ready replicas")
    d.stat("Restarts (1h)",
           f"sum(increase(kube_pod_container_status_restarts_total{c}[1h]))")
    d.stat("Max memory of limit",
           f"max(container_memory_working_set_bytes{c} / container_spec_memory_limit_bytes{c})",
           "percentunit", "Alert MemoryPressure at 90%")
    d.stat("CPU cores used", f"sum(rate(container_cpu_usage_seconds_total{c}[{RI}]))", "none")
    d.graph("Available replicas by workload",
            [(f"max by (deployment) (kube_deployment_status_replicas_available{dep})",
              "{{deployment}}"),
             (f"max by (statefulset) (kube_statefulset_status_replicas_ready{sts})",
              "{{statefulset}}")], description="Alert PodDown below 2")
    d.graph("CPU by pod",
            [(f"sum by (pod) (rate(container_cpu_usage_seconds_total{c}[{RI}]))", "{{pod}}")],
            "none")
    d.graph("Memory working set by pod",
            [(f"sum by (pod) (container_memory_working_set_bytes{c})", "{{pod}}")], "bytes")
    d.graph("Memory of limit by pod",
            [(f"max by (pod) (container_memory_working_set_bytes{c} / "
              f"container_spec_memory_limit_bytes{c})", "{{pod}}")], "percentunit")
    d.graph("Container restarts by pod (1h)",
            [(f"sum by (pod) (increase(kube_pod_container_status_restarts_total{c}[1h]))",
              "{{pod}}")])
    d.graph("Memory limit by pod",
            [(f"max by (pod) (container_spec_memory_limit_bytes{c})", "{{pod}}")], "bytes")
    return d


DASHBOARDS = [overview, metering, oversight, runtime, messaging, golden_signals,
              cost_attribution, k8s_resources]


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "dashboards")
    os.makedirs(out, exist_ok=True)
    for make in DASHBOARDS:
        d = make()
        with open(os.path.join(out, f"{d.uid}.json"), "w", encoding="utf-8") as f:
            json.dump(d.to_json(), f, indent=2, ensure_ascii=False)
            f.write("\n")


if __name__ == "__main__":
    main()
