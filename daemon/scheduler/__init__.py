"""The scheduler daemon (`huey-worker scheduler`): periodic and delayed
tasks, exactly one leader across hosts.  docs/scheduler.md tells the
guarantees; the modules: clock (wall and boot clocks, the test clock),
lease (leader election), periodic (slots and their dedupe), delayed (due
tasks into the queue), info (what the leader publishes), service (the
daemon's main loop)."""
from .info import read_status  # noqa: F401  for the status endpoint and CLI
