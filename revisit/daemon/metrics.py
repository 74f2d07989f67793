"""The daemon's Prometheus metrics, in a registry of their own (never the global one).

Counters count what this process did since it started; gauges say where things
stand. Every name starts with ``revisit_``; README lists them.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Seconds: a learning chunk is ~10, an ingest run or an ONNX export tens to hundreds.
JOB_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """Every metric the daemon exports, registered in :attr:`registry`.

    Args:
        registry: Where to register; a new :class:`CollectorRegistry` by default,
            so that several daemons (or tests) in one process do not collide.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.leader = Gauge(
            "revisit_leader",
            "1 while this process leads (schedules jobs), 0 as standby",
            registry=r,
        )
        self.scenes = Counter("revisit_scenes_ingested", "Scenes ingested", ["source"], registry=r)
        self.chips = Counter("revisit_chips_ingested", "Chips ingested", ["source"], registry=r)
        self.quarantined = Counter(
            "revisit_quarantined", "Inputs quarantined, by reason", ["source", "reason"], registry=r
        )
        self.steps = Counter("revisit_learner_steps", "Learner steps taken", registry=r)
        self.step = Gauge("revisit_learner_step", "The learner's current step", registry=r)
        self.loss = Gauge("revisit_learner_loss", "Loss of the latest learner step", registry=r)
        self.steps_per_s = Gauge(
            "revisit_learner_steps_per_second", "Recent learner speed", registry=r
        )
        self.changed_fraction = Gauge(
            "revisit_changed_fraction",
            "Share of locations with an estimate that the mixture calls changed",
            registry=r,
        )
        self.measured = Gauge(
            "revisit_measured_locations", "Locations with a change estimate", registry=r
        )
        self.last_export = Gauge(
            "revisit_last_export_timestamp_seconds",
            "Unix time of the latest export, by artifact kind",
            ["kind"],
            registry=r,
        )
        self.job_duration = Histogram(
            "revisit_job_duration_seconds",
            "Duration of scheduled job runs",
            ["job"],
            buckets=JOB_DURATION_BUCKETS,
            registry=r,
        )
        self.job_runs = Counter(
            "revisit_job_runs", "Scheduled job runs, by outcome", ["job", "outcome"], registry=r
        )

    def ingested(
        self, *, source: str, scenes: int, chips: int, quarantined: Mapping[str, int]
    ) -> None:
        """Count what an ingest run added."""
        self.scenes.labels(source=source).inc(scenes)
        self.chips.labels(source=source).inc(chips)
        for reason, n in quarantined.items():
            self.quarantined.labels(source=source, reason=reason).inc(n)

    def job_ran(self, *, job: str, outcome: str, seconds: float) -> None:
        """Count a job run and observe its duration."""
        self.job_runs.labels(job=job, outcome=outcome).inc()
        self.job_duration.labels(job=job).observe(seconds)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
