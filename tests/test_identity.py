"""A consumer identity is one consumer's: a second consumer started under
an identity a live one beats under refuses to start (78) instead of taking
that one's tasks in flight for a dead predecessor's; a consumer whose
predecessor died, or that reloads itself, starts as before.  Real
processes, a real Redis, real signals."""
import signal

from ops_helpers import wait_for_state, wait_until

import sample_tasks


def env_of(base_env):
    return dict(base_env, HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.3',
                HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT='5')


def test_a_second_consumer_under_a_live_identity_refuses(
        producer, base_env, start_daemon):
    env = env_of(base_env)
    first = start_daemon(['consumer', '--workers', '1'], env, 'first')
    first.wait_for_output('consumer ready')
    second = start_daemon(['consumer', '--workers', '1'], env, 'second')
    assert second.wait(30) == 78
    out = second.output()
    assert 'is in use by a live consumer (pid %d' % first.pid in out, out
    assert '[consumer] instance' in out
    # The first one never saw its lists taken: it runs tasks as before.
    done = sample_tasks.add(1, 2)
    assert wait_for_state(producer, done.id, 'complete')
    assert 'put back in the queue' not in first.output()
    # Its own reload (a re-exec under the same pid) is no second consumer.
    first.signal(signal.SIGHUP)
    wait_until(lambda: first.output().count('consumer ready') == 2,
               timeout=60, what='the reloaded image ready')
    again = sample_tasks.add(2, 3)
    assert wait_for_state(producer, again.id, 'complete')
    # Killed, its successor starts at once and takes its tasks back.
    first.signal(signal.SIGKILL)
    first.wait()
    third = start_daemon(['consumer', '--workers', '1'], env, 'third')
    third.wait_for_output('consumer ready')
    last = sample_tasks.add(3, 4)
    assert wait_for_state(producer, last.id, 'complete')
    third.signal(signal.SIGTERM)
    assert third.wait() == 0
