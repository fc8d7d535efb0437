"""The benchmark's tasks on a plain Huey app, for huey's own consumer:
`huey_consumer plain_tasks.huey`.  Same queue, serializer and result
expiry as the suite's app; Redis from $BENCH_REDIS_URL."""
import os
import time

from huey import RedisExpireHuey

huey = RedisExpireHuey('huey', url=os.environ.get('BENCH_REDIS_URL',
                                                  'redis://127.0.0.1:1/0'),
                       results=True, utc=True, expire_time=int(
                           os.environ.get('BENCH_RESULT_TIMEOUT', 604800)))


@huey.task()
def noop():
    return 1


STAMPS = 'bench:stamps'


@huey.task()
def stamp():
    huey.storage.conn.rpush(STAMPS, repr(time.time()))


@huey.task()
def hold(seconds):
    time.sleep(seconds)
    return 1
