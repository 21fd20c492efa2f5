import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import HealthCheck, settings

# "ci": fixed examples so a run is reproducible; "soak": benchmarks/soak.py.
settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "soak", max_examples=int(os.environ.get("SOAK_EXAMPLES", "20000")), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
