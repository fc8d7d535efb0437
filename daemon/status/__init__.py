"""The HTTP status endpoint (`huey-worker status-server`): server.py runs
the daemon, httpserver.py speaks HTTP, routes.py answers, metrics.py
renders Prometheus metrics.  docs/status-endpoint.md documents it."""
