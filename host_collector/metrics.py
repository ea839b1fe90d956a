"""Prometheus metrics of the collector.

Each Collector owns its own registry so several can live in one process
(tests, benchmarks); the daemon exposes it over HTTP when configured.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.epochs_opened = Counter("fphint_epochs_opened", "Epochs opened", ["vm"], registry=r)
        self.epochs_closed = Counter("fphint_epochs_closed", "Epochs closed, by reason", ["vm", "reason"], registry=r)
        self.requests_sent = Counter("fphint_requests_sent", "Hint requests queued to an agent", ["vm"], registry=r)
        self.ranges_accepted = Counter("fphint_ranges_accepted", "Ranges merged into a bitmap", ["vm"], registry=r)
        self.ranges_rejected = Counter(
            "fphint_ranges_rejected", "Well-formed ranges with no whole page", ["vm"], registry=r
        )
        self.pages_hinted = Counter("fphint_pages_hinted", "Pages marked free (with repeats)", ["vm"], registry=r)
        self.rejects = Counter("fphint_rejects", "Calls or chunks refused, by reason", ["vm", "reason"], registry=r)
        self.latency = Histogram(
            "fphint_request_to_last_chunk_seconds",
            "From queuing a hint request to the last chunk of its snapshot",
            ["vm"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.attached = Gauge("fphint_agents_attached", "Agents with an open Attach stream", registry=r)
        self.agent_cpu = Gauge("fphint_agent_cpu_seconds", "CPU time the agent reports for itself", ["vm"], registry=r)
        self.agent_rss = Gauge("fphint_agent_rss_bytes", "RSS the agent reports for itself", ["vm"], registry=r)
        # Untrusted-input accounting: what was refused instead of being logged line by line.
        self.log_suppressed = Counter(
            "fphint_log_lines_suppressed", "Log lines left out by rate limiting, by reason", ["reason"], registry=r
        )
        self.budget_refused = Counter(
            "fphint_budget_refused",
            "Calls refused because their own budget was spent (health watch, reflection, attach size)",
            ["budget"],
            registry=r,
        )
        self.bridge_refused = Counter(
            "fphint_bridge_refused", "Unix/vsock connections the bridge refused, by reason", ["reason"], registry=r
        )
        self.bridged = Gauge("fphint_bridged_connections", "Unix/vsock connections open through the bridge", registry=r)

    def serve(self, host: str, port: int) -> None:
        """Expose /metrics on a background thread."""
        start_http_server(port, addr=host, registry=self.registry)
