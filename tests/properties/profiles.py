"""The shared Hypothesis profiles of the property tests: a few hundred examples per property in the
default run, >= 10,000 in the ``slow`` variants.  No deadline: the machine is shared, and a slow
example is a performance question (bench/), not a correctness one."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

DEFAULT_EXAMPLES = 300
SLOW_EXAMPLES = 10_000

settings.register_profile("ca-default", max_examples=DEFAULT_EXAMPLES, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                          derandomize=False, print_blob=True)
settings.register_profile("ca-slow", parent=settings.get_profile("ca-default"), max_examples=SLOW_EXAMPLES)

DEFAULT = settings(settings.get_profile("ca-default"))
SLOW = settings(settings.get_profile("ca-slow"))
# 10,000 config files took 220 s on a shared 2-core machine: past the suite's 300 s default.
SLOW_TIMEOUT = 1800
