"""What the daemons owe systemd and the operator around start, reload and
stop, as real processes: WATCHDOG=1 keeps arriving (on a datagram socket
bound by the test, with a short WATCHDOG_USEC) while the consumer drains a
long task on SIGHUP or SIGTERM, or while a daemon waits for Redis; the stop
timeout is extended by shutdown_timeout; a config error at start is written
to the log file, not only to stderr.  test_systemd_e2e.py shows the same
under a real systemd."""
import signal
import socket
import threading
import time

import pytest

from ops_helpers import wait_until

WATCHDOG_SEC = 1.5


class TimedNotifySocket:
    """NOTIFY_SOCKET, as systemd would read it, with each message's arrival
    time (for the gaps between WATCHDOG=1)."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages = []          # (monotonic time, text)
        self._done = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._done:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, needle, since=0.0):
        return [t for t, text in list(self.messages)
                if needle in text and t >= since]

    def wait_for(self, needle, since=0.0, timeout=30):
        return wait_until(lambda: self.times(needle, since), timeout,
                          what='%r on NOTIFY_SOCKET' % needle)[0]

    def close(self):
        self._done = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    sock = TimedNotifySocket(tmp_path / 'notify.sock')
    yield sock
    sock.close()


def watchdog_env(base_env, notify, **extra):
    env = dict(base_env, NOTIFY_SOCKET=notify.path,
               WATCHDOG_USEC=str(int(WATCHDOG_SEC * 1e6)))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def longest_silence(notify, start, end):
    """The longest time without WATCHDOG=1 between `start` and `end`."""
    marks = [start] + [t for t in notify.times('WATCHDOG=1', start)
                       if t <= end] + [end]
    return max(b - a for a, b in zip(marks, marks[1:]))


@pytest.mark.parametrize('signum', [signal.SIGHUP, signal.SIGTERM],
                         ids=['SIGHUP', 'SIGTERM'])
def test_watchdog_is_fed_while_the_consumer_drains_a_long_task(
        producer, base_env, start_daemon, notify, tmp_path, signum):
    import sample_tasks
    daemon = start_daemon(['consumer', '--workers', '1'],
                          watchdog_env(base_env, notify))
    notify.wait_for('READY=1')
    marker = tmp_path / 'done'
    # Longer than WatchdogSec: before, the drain fed nothing for 4 s.
    result = sample_tasks.touch_after(4, str(marker))
    daemon.wait_for_output('start sample_tasks.touch_after')
    signalled = time.monotonic()
    daemon.signal(signum)
    if signum == signal.SIGHUP:
        notify.wait_for('RELOADING=1', signalled)
        ready = notify.wait_for('READY=1', signalled, timeout=30)
        # The new image fed it too, and the PID is the same.
        end = notify.wait_for('WATCHDOG=1', ready)
        assert daemon.proc.poll() is None
        assert marker.exists()
        assert sample_tasks.add(1, 2).get(blocking=True, timeout=20) == 3
    else:
        assert daemon.wait(30) == 0
        end = time.monotonic()
        assert marker.exists()
        # systemd's stop timeout gives way to shutdown_timeout (30 s) plus
        # the margin to interrupt workers and requeue.
        assert notify.times('EXTEND_TIMEOUT_USEC=45000000', signalled)
    assert result.get(blocking=True, timeout=5) == str(marker)
    silence = longest_silence(notify, signalled, end)
    fed = len(notify.times('WATCHDOG=1', signalled))
    assert silence < WATCHDOG_SEC, (silence, notify.messages)
    print('%s with a 4 s task: %d WATCHDOG=1 during %.1fs, longest silence '
          '%.2fs (WatchdogSec %.1fs)' % (signal.Signals(signum).name, fed,
                                        end - signalled, silence,
                                        WATCHDOG_SEC))
    if signum == signal.SIGHUP:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


@pytest.mark.parametrize('command', ['consumer', 'scheduler'])
def test_watchdog_is_fed_while_waiting_for_redis(base_env, start_daemon,
                                                 notify, command):
    # After a reload's re-execution systemd's watchdog runs while the new
    # image waits for Redis: a Redis restarting then must not get the
    # daemon killed.  Nothing listens on a port just released.
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    env = watchdog_env(base_env, notify,
                       HUEY_REDIS_URL='redis://127.0.0.1:%d/0' % port)
    daemon = start_daemon([command], env)
    waiting = notify.wait_for('STATUS=', timeout=30)
    time.sleep(3 * WATCHDOG_SEC)
    assert not notify.times('READY=1')
    silence = longest_silence(notify, waiting, time.monotonic())
    assert silence < WATCHDOG_SEC, notify.messages
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0


def config_error_lines(path):
    with open(path) as fh:
        return [line for line in fh if 'config error' in line]


def test_config_error_at_start_goes_to_the_log_file_too(base_env,
                                                        start_daemon,
                                                        tmp_path):
    config = base_env['HUEY_WORKER_CONFIG']
    conf_d = tmp_path / 'conf.d'
    conf_d.mkdir()
    logged = tmp_path / 'from-config.log'
    # The file's own [logging] file, though a drop-in breaks the config.
    with open(config, 'w') as fh:
        fh.write('[logging]\nfile = %s\n' % logged)
    (conf_d / '99-broken.ini').write_text('[consumer]\nworkers = many\n')
    daemon = start_daemon(['consumer'], base_env)
    assert daemon.wait() == 78
    lines = config_error_lines(logged)
    assert len(lines) == 1 and "ERROR" in lines[0] and \
        "[consumer] workers = 'many' (file: %s, line 2)" % (
            conf_d / '99-broken.ini') in lines[0], lines
    assert "workers = 'many'" in daemon.output()   # stderr: the journal

    # The unit's own: HUEY_LOG_FILE (huey-worker@NAME) and --log-file
    # (scheduler, status endpoint) win over the file, as when it loads.
    by_env = tmp_path / 'by-env.log'
    daemon = start_daemon(['consumer'], dict(base_env,
                                             HUEY_LOG_FILE=str(by_env)))
    assert daemon.wait() == 78
    assert len(config_error_lines(by_env)) == 1
    by_flag = tmp_path / 'by-flag.log'
    daemon = start_daemon(['scheduler', '--log-file', str(by_flag)],
                          base_env)
    assert daemon.wait() == 78
    assert len(config_error_lines(by_flag)) == 1
    assert len(config_error_lines(logged)) == 1   # not there


@pytest.mark.parametrize('command,env,extra,expected', [
    ('consumer', {'HUEY_IMMEDIATE': 'true'}, [], '[huey] immediate'),
    ('scheduler', {'HUEY_IMMEDIATE': 'true'}, [], '[huey] immediate'),
    ('status-server', {}, ['--set', 'status.bind=no-such-host.invalid'],
     '[status] bind'),
], ids=['consumer-immediate', 'scheduler-immediate', 'status-bind'])
def test_config_error_found_after_logging_starts_goes_to_the_log_file(
        base_env, start_daemon, tmp_path, command, env, extra, expected):
    log_file = tmp_path / 'daemon.log'
    daemon = start_daemon([command, '--log-file', str(log_file)] + extra,
                          dict(base_env, **env))
    assert daemon.wait() == 78
    lines = config_error_lines(log_file)
    assert len(lines) == 1 and expected in lines[0], log_file.read_text()
    assert expected in daemon.output()

