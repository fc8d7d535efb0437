"""What the built-in task tests share: a Config of their own (as the
consumer would load it), a progress recorder, and waiting for outcomes."""
import time

from huey_worker import config


def make_cfg(tmp_path, **overrides):
    """A Config from an empty file plus `section__key=value` overrides,
    with the task roots in tmp_path and no waiting between retries."""
    ini = tmp_path / 'tasks-test.ini'
    ini.touch()
    values = {
        'pdf.input_root': str(tmp_path / 'input'),
        'pdf.output_root': str(tmp_path / 'output' / 'pdf'),
        'collect.output_root': str(tmp_path / 'output' / 'collect'),
        'collect.rate_limit': '0',
        'collect.retry_delay': '0.01',
        'collect.connect_timeout': '2',
        'collect.read_timeout': '5',
    }
    values.update({k.replace('__', '.'): str(v) for k, v in overrides.items()})
    return config.load(str(ini), environ={}, overrides=values)


class Progress:
    """Records report_progress calls: (current, total, message, metadata)."""

    def __init__(self):
        self.calls = []

    def __call__(self, current, total=None, message=None, **metadata):
        self.calls.append((current, total, message, metadata))

    @property
    def currents(self):
        return [c[0] for c in self.calls]


def wait_for(predicate, timeout=30, what='condition'):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError('timed out waiting for %s' % what)


def journal_record(app, task_id):
    from huey_worker import journal
    return journal.read_task(app, app.storage, task_id)


def wait_terminal(app, task_id, timeout=60):
    return wait_for(lambda: _terminal(app, task_id), timeout,
                    'task %s to finish' % task_id)


def _terminal(app, task_id):
    record = journal_record(app, task_id)
    if record and record['terminal']:
        return record
    return None
