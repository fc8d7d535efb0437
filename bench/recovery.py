"""Time from kill -9 of a consumer to its running task back in the queue.

A consumer takes a long task; once the journal shows it running there,
the whole consumer (its process group) gets SIGKILL.  Then either

* on restart: the same consumer (same identity) is started again at once;
  it puts what its previous run left in flight back in the queue before
  its workers start; or
* without restart: another consumer, already running, notices the dead
  one's heartbeat is older than [delivery] recovery_timeout and moves its
  tasks back.

The moment the task is back is the journal's requeued_at, written by
whoever moved it in the same step.  For the plain huey_consumer the same
kill loses the task: the benchmark checks the queue and the task's result
for a while after a restart and reports it lost if neither appears.
"""
import time

from harness import wait_redis_idle, wait_until


def _running_on(app, task_id, identity):
    record = app.storage.conn.hgetall(app.storage.keys.task(task_id))
    return record.get(b'state') == b'running' and \
        record.get(b'consumer') == identity.encode()


def _requeued_at(app, task_id):
    value = app.storage.conn.hget(app.storage.keys.task(task_id),
                                  'requeued_at')
    return float(value) if value is not None else None


def _dead(consumer):
    if consumer.alive():
        return False
    raise RuntimeError('the consumer exited (%s); its log: %s\n%s' % (
        consumer.proc.returncode, consumer.log_path, consumer.output()[-2000:]))


def suite_once(client, app, hold, make_consumer, restart):
    """Seconds from SIGKILL to the task back in the queue."""
    wait_redis_idle(client)
    client.flushdb()   # our private server, started by this benchmark
    victim = make_consumer('bench-victim').start()
    rescuer = None
    try:
        task_id = hold(60).id
        wait_until(lambda: _running_on(app, task_id, 'bench-victim') or
                   _dead(victim), 60, 'task running on the victim',
                   interval=0.01)
        if not restart:
            rescuer = make_consumer('bench-rescuer').start(notify=True)
            rescuer.wait_ready()
        killed = time.time()
        victim.kill()
        if restart:
            victim = make_consumer('bench-victim').start()
        back = wait_until(lambda: _requeued_at(app, task_id), 120,
                          'task back in the queue', interval=0.005)
        return back - killed
    finally:
        victim.stop()
        if rescuer is not None:
            rescuer.stop()


def plain_once(client, plain_app, hold, make_consumer, watch=3.0):
    """None when the task never comes back (watched `watch` seconds after
    the restart), else seconds to it being queued or run again."""
    wait_redis_idle(client)
    client.flushdb()
    consumer = make_consumer().start()
    try:
        result = hold(60)
        storage = plain_app.storage
        wait_until(lambda: storage.conn.llen(storage.queue_key) == 0 and
                   not storage.conn.exists(storage.result_key(result.id)),
                   60, 'task taken by the plain consumer', interval=0.01)
        time.sleep(0.2)   # taken: its body is running now
        killed = time.time()
        consumer.kill()
        consumer = make_consumer().start()
        deadline = time.time() + watch
        while time.time() < deadline:
            if storage.conn.llen(storage.queue_key):
                return time.time() - killed
            time.sleep(0.01)
        return None
    finally:
        consumer.stop()
