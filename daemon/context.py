"""The task a worker is running, as the worker knows it.

The worker sets this before the task body runs and clears it after; it is
per thread (thread and greenlet workers) and per process (process workers).
Tasks use the public API in huey_worker.journal (current_delivery,
report_progress), which reads this.
"""
import threading

_local = threading.local()


def set_current(task, deliveries, worker_info):
    _local.task, _local.deliveries, _local.worker = task, deliveries, worker_info


def clear_current():
    _local.task = _local.deliveries = _local.worker = None


def current_task():
    """The Huey Task being run by this worker, or None outside a task."""
    return getattr(_local, 'task', None)


def delivery_count():
    """How many times this message has been handed to a worker without an
    outcome being recorded, this time included: 1 normally, more after a
    worker or consumer died while running it.  A task that must not act
    twice checks it (or its own idempotency key) before side effects."""
    return getattr(_local, 'deliveries', None) or 1


def current_worker():
    """dict(host, pid, consumer, worker) of the worker running the task."""
    return getattr(_local, 'worker', None)
