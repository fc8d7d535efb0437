"""Nothing without an end (issue 16): after a varied run (complete, failed,
retried, revoked, delayed, locked, dead-lettered, periodic, priority and
plain-producer tasks, a consumer and a scheduler), every key in Redis
either expires within the retention or is on the allow-list below, with
the reason it may live.  docs/journal.md ("Keys that live") holds the
same list."""
import re
import textwrap
import time

import pytest
from huey import RedisExpireHuey

import sample_tasks
from ops_helpers import wait_for_state, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# (pattern, reason): keys that may have no time to live.
ALLOWED = [
    (r'huey\.redis\.huey', 'the queue: bounded by its consumers'),
    (r'huey\.schedule\.huey', 'the schedule: each entry leaves when due'),
    (r'hw:huey:priority', 'the priority part of the queue'),
    (r'hw:huey:priority:seq', 'one counter per queue (FIFO within a '
                              'priority)'),
    (r'hw:huey:inflight:.+', 'in-flight lists: emptied by acks, put back '
                             'by recovery'),
    (r'hw:huey:inflight-lists:.+', 'a consumer\'s in-flight lists: '
                                   'swept with them by recovery'),
    (r'hw:huey:inflight-orphans', 'in-flight lists of gone consumers, '
                                  'removed once swept'),
    (r'hw:huey:consumers', 'identity -> last beat: gone consumers '
                           'are pruned by recovery'),
    (r'hw:huey:deliveries', 'task id -> deliveries of messages in flight '
                            '(HDEL with each ack)'),
    (r'hw:huey:dead', 'the dead letters: capped by [delivery] '
                      'dead_letter_max'),
    (r'hw:huey:stats', 'cumulative counters, a fixed set'),
    (r'hw:huey:metrics:(outcomes|durations|waits)', 'per task name and '
                                                    'state: bounded by the '
                                                    'task names'),
    (r'hw:huey:journal:state:.+', 'state indexes: cut to the records\' '
                                  'window with each TRIM_EVERY-th outcome, '
                                  'then set to expire'),
    (r'hw:huey:journal:name:.+', 'name indexes: as the state indexes'),
    (r'hw:huey:scheduler:info', 'what the scheduler did last: one value'),
    (r'hw:huey:layout', 'an adopted PriorityRedisHuey\'s queue: one value'),
    (r'hw:huey:paused', 'a paused queue: until resumed'),
    (r'hw:huey:events', 'pause and resume events: capped at 100'),
    (r'hw:huey:locks:.*', 'task lock owners: removed with the lock'),
    (r'huey\.lock\..+', 'a task lock (Huey\'s): deleted when its task ends, '
                        'released when its worker dies'),
]


def _allowed(key):
    return next((reason for pattern, reason in ALLOWED
                 if re.fullmatch(pattern, key)), None)


MODULE = textwrap.dedent('''
    from huey import crontab
    from huey_worker import huey

    @huey.periodic_task(crontab(minute='*'))
    def tick():
        return 'tick'

    @huey.task()
    @huey.lock_task('lifetime-unit')
    def locked():
        return 'locked'
''')


def test_every_key_ends_or_has_a_reason(producer, base_env, start_daemon,
                                        tmp_path, redis_url):
    (tmp_path / 'lifetime_tasks.py').write_text(MODULE)
    env = dict(base_env, PYTHONPATH=base_env['PYTHONPATH'] + ':' +
               str(tmp_path), HUEY_MODULES='sample_tasks,lifetime_tasks',
               HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.3')
    import importlib
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        lifetime_tasks = importlib.import_module('lifetime_tasks')
    finally:
        sys.path.remove(str(tmp_path))
    storage, conn = producer.storage, producer.storage.conn

    revoked = sample_tasks.add(1, 1)
    producer.revoke_by_id(revoked.id)             # revoked for good
    once = sample_tasks.add(2, 2)
    producer.revoke_by_id(once.id, revoke_once=True)
    marker = tmp_path / 'fail-once'
    tasks = {
        'complete': sample_tasks.add(1, 2),
        'failed': sample_tasks.boom(),
        'retried': sample_tasks.fail_once(str(marker)),
        'priority': sample_tasks.add(3, 4, priority=5),
        'locked': lifetime_tasks.locked(),
        'delayed': sample_tasks.add.schedule((5, 5), delay=1),
    }
    # A plain Huey producer's task, and a message no one can decode.
    plain = RedisExpireHuey('huey', url=redis_url, results=True, utc=True)

    def add(a, b):
        return a + b
    add.__module__, add.__qualname__ = 'sample_tasks', 'add'
    plain_add = plain.task()(add)   # named sample_tasks.add, as the suite's
    plain_result = plain_add(6, 6)
    conn.lpush(storage.queue_key, b'not a huey message')

    start_daemon(['scheduler'], env, 'scheduler')
    consumer = start_daemon(['consumer', '--workers', '2'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    for name, result in tasks.items():
        wait_for_state(producer, result.id,
                       'failed' if name == 'failed' else 'complete',
                       timeout=30)
    wait_for_state(producer, revoked.id, 'revoked')
    wait_for_state(producer, once.id, 'revoked')
    wait_for_state(producer, plain_result.id, 'complete')
    wait_until(lambda: conn.llen(producer.keys.dead) == 1,
               what='the undecodable message set aside')
    # Periodic: the scheduler enqueues it at the top of the next minute.
    wait_until(lambda: conn.hget(producer.keys.metrics_outcomes,
                                 'lifetime_tasks.tick\tcomplete'),
               timeout=70, what='the periodic task run')
    time.sleep(0.5)

    retention = producer.config.journal.retention or \
        producer.config.huey.result_timeout
    result_timeout = producer.config.huey.result_timeout
    unexplained = []
    for raw in conn.scan_iter(count=1000):
        key = raw.decode()
        ttl = conn.ttl(raw)
        if ttl == -2:
            continue   # expired meanwhile
        if ttl >= 0:
            # Journal keys end within the journal's retention; Huey's
            # results and the results count within result_timeout (and
            # an hour, for the count's last hour).
            journal = re.match(r'hw:huey:(task|task-log|message|journal):',
                               key) and 'results-held' not in key
            limit = retention if journal else result_timeout + 2 * 86400
            assert ttl <= limit, (key, ttl, limit)
            continue
        if _allowed(key) is None:
            unexplained.append(key)
    assert not unexplained, unexplained
    # The revoke mark of one task id ends like a result.
    mark = storage.result_key('r:%s' % revoked.id)
    assert 0 < conn.ttl(mark) <= result_timeout


def test_the_allow_list_is_in_the_docs():
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), 'docs', 'journal.md')
    with open(path) as fh:
        text = fh.read()
    for pattern, _ in ALLOWED:
        shown = re.sub(r'(?<!\\)\.[+*]', '*', pattern).replace(
            '\\.', '.').replace('(outcomes|durations|waits)', '*')
        assert '`%s`' % shown in text, shown
