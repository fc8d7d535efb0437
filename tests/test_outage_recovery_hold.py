"""After a Redis outage longer than [delivery] recovery_timeout no live
consumer could beat, so every heartbeat ran out: the first consumer back
must not take the others for dead and put back the tasks they are
running (they would run twice).  It holds recovery for one
recovery_timeout, as after a jump of Redis's clock; a consumer that
really died is recovered that much later (seen in a Sentinel failover
under load: 16 runs twice)."""
import os
import signal
import time

from ops_helpers import wait_for_state, wait_until
from task_module_helpers import consumer_env, ready_consumer, task_module

TASKS = '''
import os, time
from huey_worker import huey

@huey.task()
def held(gate, log):
    with open(log, 'a') as fh:
        fh.write('%d\\n' % os.getpid())
    while not os.path.exists(gate):
        time.sleep(0.02)
    return 'released'
'''


def runs(log):
    try:
        with open(log) as fh:
            return fh.read().split()
    except FileNotFoundError:
        return []


def test_an_outage_longer_than_recovery_timeout_runs_nothing_twice(
        producer, base_env, start_daemon, redis_server, tmp_path):
    gate, log = str(tmp_path / 'gate'), str(tmp_path / 'runs')
    with task_module(producer, tmp_path, TASKS, 'outagetasks') as tasks:
        env = consumer_env(base_env, tasks,
                           HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL=0.5,
                           HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT=2,
                           HUEY_WORKER_REDIS_RETRY_MAX_DELAY=0.5,
                           # A frozen Redis is noticed within seconds.
                           HUEY_WORKER_REDIS_SOCKET_TIMEOUT=2.5)
        # One task running on each consumer: whichever beats first after
        # the outage would take the other for dead.
        first = ready_consumer(start_daemon, dict(env, HUEY_CONSUMER_ID='a'),
                               ['--workers', '1'], name='a')
        results = [tasks.held(gate, log)]
        wait_until(lambda: len(runs(log)) == 1, what='a task running')
        second = ready_consumer(start_daemon,
                                dict(env, HUEY_CONSUMER_ID='b'),
                                ['--workers', '1'], name='b')
        results.append(tasks.held(gate, log))
        wait_until(lambda: len(runs(log)) == 2, what='both tasks running')
        assert len(set(runs(log))) == 2   # one per consumer
        # Redis frozen three times as long as recovery_timeout: the
        # consumers notice (socket_timeout), and every heartbeat key runs
        # out by Redis's clock meanwhile.
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            time.sleep(6)
            # `b` comes back a second after `a` (as consumers do after a
            # failover, each when Sentinel names the new primary to it).
            os.kill(second.pid, signal.SIGSTOP)
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        time.sleep(1.0)
        os.kill(second.pid, signal.SIGCONT)
        thawed = time.time()
        conn, keys = producer.storage.conn, producer.storage.keys
        # Both beat again; then room for one to, wrongly, recover the
        # other's task (a recovery_timeout and more).
        wait_until(lambda: all((conn.zscore(keys.consumers, name) or 0) >
                               thawed for name in ('a', 'b')),
                   timeout=20, what='both consumers beating again')
        time.sleep(4)
        # Nothing put back to run again: the queue is empty, nobody was
        # presumed dead.
        assert conn.llen(producer.storage.queue_key) == 0
        for consumer in (first, second):
            assert 'presumed dead' not in consumer.output(), \
                consumer.output()[-3000:]
        assert 'Redis answers again' in first.output()
        assert len(runs(log)) == 2, runs(log)
        open(gate, 'w').close()
        for result in results:
            record = wait_for_state(producer, result.id, 'complete')
            assert record['attempt'] == 1 and record['requeues'] == 0
        assert len(runs(log)) == 2
