"""``revisit run`` (DESIGN §6): the scheduler and its jobs, the leader lock, health and metrics.

- :mod:`revisit.daemon.service`: the lifecycle, from database up to clean shutdown;
- :mod:`revisit.daemon.leader`: one leader per database (an advisory lock);
- :mod:`revisit.daemon.scheduler`: APScheduler 3, its job store and executor;
- :mod:`revisit.daemon.jobs`: the jobs and the context they run in;
- :mod:`revisit.daemon.health`: ``/healthz``, ``/readyz``, ``/metrics``;
- :mod:`revisit.daemon.metrics`: the Prometheus metrics.
"""
