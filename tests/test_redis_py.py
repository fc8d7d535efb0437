"""redis-py versions: daemon/transaction.py reads redis-py internals (the
pipeline's command stack and error helpers, the connection's packer and
hiredis reader), so setup.cfg allows only the majors tested here, and the
tests of the parts that send transactions and Lua scripts -- the worker's
hot path, delivery and recovery, the journal, priorities, a plain
producer -- run again in venvs of their own: the lowest allowed redis-py
with the lowest allowed hiredis, the highest allowed of both, and the
highest redis-py without hiredis (its pure-Python parser and packer).
A redis-py release that changes those internals fails here, not in a
customer's worker.

The venvs are kept in $HUEY_WORKER_TEST_CACHE/redis-py, one per set of
requirements and Python; the highest-version venvs are upgraded at each
run, so a new redis-py release is tested the day it is out.  The package
itself is not installed there: a .pth puts a link to this checkout's
daemon/ (as huey_worker) on the path, re-pointed at each run under a lock.
"""
import configparser
import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from deploy_support import CACHE, ROOT
from huey_worker import transaction
from huey_worker.devredis import find_redis_server

TESTS = ['tests/test_worker_fastpath.py', 'tests/test_delivery.py',
         'tests/test_journal.py', 'tests/test_priority.py',
         'tests/test_plain_producer.py']
TEST_TOOLS = ['pytest>=7', 'pytest-timeout>=2.1']


def install_requires():
    """setup.cfg's install_requires: {name: Requirement}."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, 'setup.cfg'))
    lines = [line.split('#')[0].strip() for line in
             cfg['options']['install_requires'].splitlines()]
    return {req.name: req for req in map(Requirement, filter(None, lines))}


def lowest(req):
    """'redis>=5.3,<9' -> 'redis==5.3'."""
    (floor,) = [s.version for s in req.specifier if s.operator == '>=']
    return '%s==%s' % (req.name, floor)


def variants():
    reqs = install_requires()
    others = [str(r) for n, r in reqs.items() if n not in ('redis', 'hiredis')]
    redis_req, hiredis_req = reqs['redis'], reqs['hiredis']
    return {
        'lowest': others + [lowest(redis_req), lowest(hiredis_req)],
        'highest': others + [str(redis_req), str(hiredis_req)],
        'no-hiredis': others + [str(redis_req)],
    }


def venv_for(name, requirements, upgrade=()):
    """A cached venv with `requirements` and the test tools, this
    checkout's daemon/ importable as huey_worker; its python's path.
    `upgrade`: requirements re-resolved against the index at each call.
    The caller holds the venv's lock (venv_lock)."""
    key = hashlib.sha256(json.dumps(
        [sys.version, sorted(requirements), TEST_TOOLS]).encode()
    ).hexdigest()[:12]
    path = os.path.join(CACHE, 'redis-py', '%s-%s' % (name, key))
    python = os.path.join(path, 'bin', 'python')
    # pip of this venv installs into the new one (pip --python): the new
    # venv needs no ensurepip, which Debian ships apart (python3-venv).
    pip = [sys.executable, '-m', 'pip', '--python', python, 'install', '-q',
           '--disable-pip-version-check']
    done = os.path.join(path, '.installed')
    if not os.path.exists(done):
        subprocess.run([sys.executable, '-m', 'venv', '--clear',
                        '--without-pip', path], check=True)
        subprocess.run(pip + list(requirements) + TEST_TOOLS, check=True)
        open(done, 'w').close()
    elif upgrade:
        subprocess.run(pip + ['--upgrade'] + list(upgrade), check=True)
    site = subprocess.run(
        [python, '-c',
         'import sysconfig; print(sysconfig.get_path("purelib"))'],
        check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    source = os.path.join(path, 'checkout')
    os.makedirs(source, exist_ok=True)
    link = os.path.join(source, 'huey_worker')
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.join(ROOT, 'daemon'), link)
    with open(os.path.join(site, 'huey_worker_checkout.pth'), 'w') as pth:
        pth.write(source + '\n')
    return python


def venv_lock(name):
    os.makedirs(os.path.join(CACHE, 'redis-py'), exist_ok=True)
    return open(os.path.join(CACHE, 'redis-py', name + '.lock'), 'w')


def versions(python):
    """{'redis': '5.3.0', 'hiredis': '3.2.0' or None, 'hiredis_used': bool}
    as the venv's python sees them."""
    probe = ('import json, redis, redis.utils\n'
             'try:\n    import hiredis; h = hiredis.__version__\n'
             'except ImportError:\n    h = None\n'
             'print(json.dumps({"redis": redis.__version__, "hiredis": h,\n'
             '    "hiredis_used": redis.utils.HIREDIS_AVAILABLE}))\n')
    return json.loads(subprocess.run([python, '-I', '-c', probe], check=True,
                                     stdout=subprocess.PIPE, text=True).stdout)


def nested_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HUEY_', 'REDIS_', 'PYTEST_', 'PYTHONPATH'))}
    env['HUEY_WORKER_REDIS_SERVER'] = find_redis_server()
    env['HUEY_WORKER_TEST_CACHE'] = CACHE
    return env


# -- the pin ------------------------------------------------------------------

def test_setup_cfg_allows_the_range_transaction_checks():
    reqs = install_requires()
    assert reqs['redis'].specifier == SpecifierSet(transaction.REDIS_PY)
    # An upper bound on both: a new major is tested before it is allowed.
    for name in ('redis', 'hiredis'):
        assert any(s.operator == '<' for s in reqs[name].specifier), name


def test_a_redis_py_without_the_internals_stops_the_cli_in_one_line(tmp_path):
    # As a redis-py release that dropped Pipeline.raise_first_error would:
    # the command stops before connecting anywhere, with the fix in one
    # line, instead of a worker failing on its first Redis error.
    (tmp_path / 'empty.ini').touch()
    env = nested_env()
    env.update(HUEY_WORKER_CONFIG=str(tmp_path / 'empty.ini'),
               HUEY_REDIS_URL='redis://127.0.0.1:9/0')
    code = ('import redis.client\n'
            'del redis.client.Pipeline.raise_first_error\n'
            'import sys\n'
            'sys.argv = ["huey-worker", "consumer"]\n'
            'from huey_worker.cli import main\n'
            'main()\n')
    out = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path),
                         env=env, capture_output=True, text=True, timeout=60)
    import redis
    assert out.returncode == 78, out.stderr
    assert out.stdout == ''
    assert out.stderr == (
        'huey-worker: redis-py %s is not supported (huey-worker needs '
        'redis%s): it lacks Pipeline.raise_first_error; pip install '
        '"redis%s"\n' % (redis.__version__, transaction.REDIS_PY,
                         transaction.REDIS_PY))


def test_the_installed_redis_py_has_every_internal():
    assert transaction.missing_internals() == []


# -- the matrix ---------------------------------------------------------------

def check_versions(variant, found):
    """The venv holds what `variant` means."""
    reqs = install_requires()
    assert found['redis'] in reqs['redis'].specifier, found
    if variant == 'lowest':
        for name in ('redis', 'hiredis'):
            assert Version(found[name]) == Version(
                lowest(reqs[name]).split('==')[1]), found
    if variant == 'no-hiredis':
        assert found['hiredis'] is None, found
    else:   # redis-py must really use it, else the fast path is not tested
        assert found['hiredis_used'], found


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_redis_heavy_tests_pass_at_both_ends_and_without_hiredis(
        tmp_path):
    # The three runs go side by side: they mostly wait on Redis and on
    # the daemons they start (about a minute of CPU in five of wall time
    # one after the other), each with its own private Redis.
    reqs = install_requires()
    runs = {}
    with contextlib.ExitStack() as stack:
        for variant, requirements in variants().items():
            lock = stack.enter_context(venv_lock(variant))
            fcntl.flock(lock, fcntl.LOCK_EX)   # two runs share one venv
            upgrade = [] if variant == 'lowest' else [
                str(reqs[n]) for n in ('redis', 'hiredis')
                if str(reqs[n]) in requirements]
            python = venv_for(variant, requirements, upgrade)
            found = versions(python)
            check_versions(variant, found)
            log = stack.enter_context(open(tmp_path / (variant + '.log'),
                                           'w+'))
            proc = subprocess.Popen(
                [python, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                 '--basetemp', str(tmp_path / variant)] + TESTS, cwd=ROOT,
                env=nested_env(), stdout=log, stderr=subprocess.STDOUT)
            stack.callback(proc.kill)   # a no-op once it has ended
            runs[variant] = found, log, proc
        failures = []
        for variant, (found, log, proc) in runs.items():
            proc.wait(timeout=1400)
            log.seek(0)
            out = log.read()
            summary = (out.strip().splitlines() or [''])[-1]
            print('%s: redis-py %s, hiredis %s: %s' % (
                variant, found['redis'], found['hiredis'], summary))
            if proc.returncode != 0 or ' passed' not in summary \
                    or 'skipped' in summary:
                failures.append('%s (exit %s):\n%s' % (
                    variant, proc.returncode, out[-5000:]))
    assert not failures, '\n\n'.join(failures)


@pytest.mark.slow
def test_a_redis_py_below_the_range_is_refused_at_start(tmp_path):
    # 5.2 is the last redis-py whose ConnectionPool.get_connection() wants
    # a command name: the reason the range starts at 5.3.
    others = [str(r) for n, r in install_requires().items() if n != 'redis']
    with venv_lock('below') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        python = venv_for('below', others + ['redis==5.2.1'])
        (tmp_path / 'empty.ini').touch()
        env = nested_env()
        env.update(HUEY_WORKER_CONFIG=str(tmp_path / 'empty.ini'),
                   HUEY_REDIS_URL='redis://127.0.0.1:9/0')
        out = subprocess.run([python, '-m', 'huey_worker', 'consumer'],
                             cwd=str(tmp_path), env=env, capture_output=True,
                             text=True, timeout=60)
    assert out.returncode == 78, out.stderr
    assert out.stderr == (
        'huey-worker: redis-py 5.2.1 is not supported (huey-worker needs '
        'redis%s): it lacks ConnectionPool.get_connection() without '
        'arguments; pip install "redis%s"\n' % (transaction.REDIS_PY,
                                                 transaction.REDIS_PY))
