"""Realistic mode: an event-driven simulation of real devices driving the same BaseServer and
BaseClient objects as the prototype runner.

Virtual time comes from a cost model (FLOPs / device throughput, bytes / bandwidth + latency)
configured in a sys.yaml (devices, networks, availability, ranks); see docs/realistic-mode.md.

Its config section (``realistic:``) lives in :mod:`atoll.config`; this file imports nothing heavy.
"""

from __future__ import annotations


def start_realistic_run(run, progress):
    """Run a resolved run (``mode: realistic``) and return ``(run_dir, summary)``."""
    from atoll.sim.realistic.runner import start_realistic_run as start

    return start(run, progress)
