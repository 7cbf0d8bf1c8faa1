"""Prometheus metrics of the daemon, in a registry of their own (not the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class DaemonMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.beats = Counter("tron_beats_received", "Heartbeats accepted", registry=r)
        self.beats_rejected = Counter("tron_beats_rejected", "Heartbeats rejected", ["verdict"], registry=r)
        self.beats_batched = Counter("tron_beats_batched", "Heartbeats accepted in batches (POST /beats: node agents)",
                                     registry=r)
        self.beats_on_channel = Counter("tron_beats_on_channel", "Heartbeats accepted on an agent's own connection "
                                        "to the daemon (beat_channel.py), not over HTTP", registry=r)
        self.requests_refused = Counter("tron_requests_refused", "Requests refused for a missing scope (403)",
                                        ["scope"], registry=r)
        self.alerts = Counter("tron_alerts", "Alerts raised by TRON", ["reason"], registry=r)
        self.restarts = Counter("tron_restarts", "Restarts carried out", ["kind"], registry=r)
        self.restarts_answered = Counter("tron_restarts_answered", "Restarts a parent answered its alert with "
                                         "(carried by the daemon; no POST /control/restart of the parent's own)",
                                         registry=r)
        self.restarts_at_once = Counter("tron_restarts_at_once", "Idle failures' restarts the daemon carried at once, "
                                        "on the parent's view, without waiting for it (it is told after)", registry=r)
        self.escalations = Counter("tron_escalations", "Escalation hops recorded", registry=r)
        self.provider_switches = Counter("tron_provider_switches", "Provider switches", registry=r)
        self.permanent_failures = Counter("tron_permanent_failures", "Tasks declared failed", registry=r)
        self.detection_latency = Histogram("tron_detection_latency_seconds",
                                           "Delay between a failure becoming true and TRON alerting",
                                           ["reason"], buckets=LATENCY_BUCKETS, registry=r)
        self.recovery_latency = Histogram("tron_recovery_latency_seconds",
                                          "From failure to the new incarnation answering /health",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.services_up = Gauge("tron_services_running", "Services in state running", registry=r)
        self.crash_looping = Gauge("tron_services_crash_looping", "Services in a crash-loop episode", registry=r)
        self.crash_loops = Counter("tron_crash_loops", "Crash-loop episodes started", registry=r)
        self.lanes_paused = Counter("tron_lanes_paused", "Lanes paused by the breaker", registry=r)
        self.http_evicted = Counter("tron_http_connections_evicted", "Idle HTTP connections closed to stay under the "
                                    "connection cap (common/conn_guard.py: a client holding connections open)",
                                    registry=r)
        self.monitor_stalls = Counter("tron_monitor_stalls", "Stalls of the daemon itself (no agent convicted)",
                                      registry=r)
        self.registry_degraded = Gauge("tron_registry_degraded", "1 while the registry refuses writes", registry=r)
        self.registry_pending = Gauge("tron_registry_pending_writes", "Rows waiting in the journal", registry=r)
        self.log_pump_deaths = Counter("tron_log_pump_deaths", "Deaths of the log pump (each is followed by a "
                                       "new one, handed the pipes the daemon holds)", registry=r)
        self.notify_deliveries = Counter("tron_notify_deliveries", "Notification attempts, by outcome (delivered, "
                                         "retrying, gave_up; dropped: a full queue's oldest)", ["outcome"], registry=r)

        self.provider_state = Gauge("tron_provider_state", "0 closed, 1 half_open, 2 open", ["provider"], registry=r)
        self.provider_opens = Counter("tron_provider_opens", "Times a provider opened", ["provider"], registry=r)
        self.provider_failures = Counter("tron_provider_failures", "Provider calls that failed, by reason",
                                         ["provider", "reason"], registry=r)
        self.provider_refused = Counter("tron_provider_refused", "Calls not sent: the provider was open",
                                        ["provider"], registry=r)
        self.provider_retries = Counter("tron_provider_retries", "Tasks retried in place after a provider failure",
                                        ["provider"], registry=r)
        self.provider_failbacks = Counter("tron_provider_failbacks", "Services moved back to their own provider, "
                                          "by provider", ["provider"], registry=r)
        self.provider_probes = Counter("tron_provider_probes", "The daemon's own probes of a provider nobody "
                                       "calls, by outcome (ok, failed, no_verdict)", ["provider", "outcome"], registry=r)
        self.tasks_parked = Counter("tron_tasks_parked", "Tasks parked with every provider down", registry=r)
        self.tasks_resumed = Counter("tron_tasks_resumed", "Parked tasks that went on", registry=r)
        self.llm_tokens = Counter("tron_llm_tokens", "Tokens of LLM calls, by kind (input, output, cache_read, "
                                  "cache_write)", ["provider", "model", "kind"], registry=r)
        self.llm_cost = Counter("tron_llm_cost_usd", "Cost of LLM calls in USD, from the price table",
                                ["provider", "model"], registry=r)
        self.spans_dropped = Counter("tron_otel_spans_dropped", "Trace spans not delivered to the OTLP collector "
                                     "(queue full, collector down, refusing or slow), by process", ["service"],
                                     registry=r)
        self._dropped_seen: dict[str, int] = {}  # per incarnation (and the daemon): the count last added

    def spans_dropped_total(self, service: str, incarnation: str, total: int) -> None:
        """A process's own running count of dropped spans (its beats carry it): add what is new."""
        seen = self._dropped_seen.get(incarnation, 0)
        if total > seen:
            self._dropped_seen[incarnation] = total
            self.spans_dropped.labels(service=service).inc(total - seen)

    def render(self) -> bytes:
        from tron.common import telemetry

        self.spans_dropped_total("daemon", "daemon", telemetry.dropped())
        return generate_latest(self.registry)
