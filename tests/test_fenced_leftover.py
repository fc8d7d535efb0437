"""A worker whose ack is fenced (its message left its in-flight list) puts
back whatever else that list still holds.  After a failover the list on
the new primary can hold a message whose ack the old primary took and then
lost (a primary demoted alive keeps taking writes until Sentinel
reconfigures it): the worker moved on, and that message stayed in flight
under a live consumer, run by nobody, for as long as the consumer lived.
Here the state is made by hand on one Redis, as the failover leaves it: the
running task's message is taken out of the list (a peer's recovery) and
another task's message put in its place.  The queue is paused over the
ack, so that it goes without the next queue read (whose failure would have
set off the same check anyway).  About 10 s."""
import subprocess
import sys

import redis

from ops_helpers import wait_until

TAKE = """
local left = redis.call('RPOP', KEYS[1])
if not left then return false end
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('LPUSH', KEYS[2], left)
redis.call('LPUSH', KEYS[1], ARGV[1])   -- as a peer's recovery
return 1
"""


def cli(env, *args):
    subprocess.run([sys.executable, '-m', 'huey_worker'] + list(args),
                   env=env, check=True, capture_output=True)


def test_a_fenced_ack_puts_back_what_the_list_still_holds(
        base_env, start_daemon, redis_url):
    client = redis.Redis.from_url(redis_url)
    client.delete('test:runs')
    env = dict(base_env, HUEY_MODULES='sample_tasks,delivery_tasks',
               HUEY_CONSUMER_ID='fenced-leftover')
    consumer = start_daemon(['consumer', '--workers', '1'], env)
    consumer.wait_for_output('consumer ready')
    try:
        cli(env, 'submit', 'delivery_tasks.slow_counted', '3', 'running')
        wait_until(lambda: client.hget('test:runs', 'running'),
                   what='the first task running')
        cli(env, 'submit', 'delivery_tasks.slow_counted', '0', 'left')
        [inflight] = client.keys('hw:huey:inflight:fenced-leftover:*')
        [running] = client.lrange(inflight, 0, -1)
        cli(env, 'pause')
        assert client.eval(TAKE, 2, 'huey.redis.huey', inflight, running)
        consumer.wait_for_output('is fenced, not written')
        cli(env, 'resume')
        wait_until(lambda: client.hget('test:runs', 'left'), timeout=30,
                   what='the message left in the list run')
    finally:
        cli(env, 'resume')
