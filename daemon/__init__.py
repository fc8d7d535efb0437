"""huey-worker: run Huey task queues on plain VMs.

Producers and task modules write `from huey_worker import huey`: the shared
app is imported on first use of the name, so `import huey_worker` (the CLI,
`python -m huey_worker`) stays light.
"""
__version__ = '0.1.0'

__all__ = ['huey', '__version__', 'check_cancelled', 'report_progress',
           'TaskCanceled']


def __getattr__(name):
    if name == 'huey':
        from .app import huey
        return huey
    if name == 'check_cancelled':
        from .progress import check_cancelled
        return check_cancelled
    if name == 'report_progress':
        from .progress import report_progress
        return report_progress
    if name == 'TaskCanceled':
        from .worker import TaskCanceled
        return TaskCanceled
    raise AttributeError('module %r has no attribute %r' % (__name__, name))
