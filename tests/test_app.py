"""The shared Huey app as producers use it: configured from file and
environment, immediate mode, signed messages."""
import signal

from huey_worker import app as app_module
from huey_worker import config


def test_immediate_mode_runs_tasks_in_the_producer(monkeypatch, tmp_path):
    """The seeds' always_eager rollback: no Redis, no consumer needed."""
    path = tmp_path / 'hw.ini'
    path.write_text('[redis]\nport = 1\n')  # nothing listens there
    cfg = config.load(str(path), environ={'HUEY_IMMEDIATE': 'true'})
    app = app_module.SuiteHuey().configure(cfg)

    @app.task()
    def multiply(a, b):
        return a * b
    assert multiply(6, 7).get() == 42


def test_producer_configures_itself_from_the_environment(monkeypatch,
                                                         redis_url, tmp_path):
    path = tmp_path / 'producer.ini'
    path.write_text('[huey]\nqueue = pdf-tasks\n')
    monkeypatch.setenv('HUEY_WORKER_CONFIG', str(path))
    monkeypatch.setenv('HUEY_REDIS_URL', redis_url)
    app = app_module.SuiteHuey()   # not configured: first use configures

    @app.task()
    def noop():
        pass
    noop()
    assert app.name == 'pdf-tasks'
    # Huey's key for the queue, as plain Huey producers would use it.
    assert app.storage.conn.llen('huey.redis.pdftasks') == 1


def test_signed_messages_run_when_keys_match(producer, base_env,
                                             start_daemon):
    cfg = config.load(environ={'HUEY_REDIS_URL': base_env['HUEY_REDIS_URL'],
                               'HUEY_SECRET_KEY': 'shared-secret'})
    unsigned = producer.config
    producer.configure(cfg)
    try:
        _run_signed(producer, base_env, start_daemon)
    finally:
        producer.configure(unsigned)  # the shared app: leave it as found


def _run_signed(producer, base_env, start_daemon):
    import sample_tasks
    daemon = start_daemon(['consumer', '--workers', '1'],
                          dict(base_env, HUEY_SECRET_KEY='shared-secret'))
    daemon.wait_for_output('consumer ready')
    raw_before = producer.storage.conn.llen(producer.storage.queue_key)
    result = sample_tasks.add(5, 5)
    assert result.get(blocking=True, timeout=20) == 10
    assert raw_before == 0
    assert 'secret_key is not set' not in daemon.output()
    assert producer.storage.conn.llen(producer.keys.dead) == 0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
