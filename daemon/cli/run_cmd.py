"""`huey-worker run`: the whole suite in the foreground for development
(`make run`): a private Redis and every daemon, stopped together by Ctrl-C."""
import os
import signal
import subprocess
import sys
import tempfile
import time

import click

from ..devredis import EmbeddedRedis, RedisNotFound
from ..exitcodes import EX_UNAVAILABLE

# The daemons `run` starts, as huey-worker subcommands.
DAEMONS = (
    ('consumer', ['consumer']),
    ('scheduler', ['scheduler']),
    ('status-server', ['status-server']),
)


@click.command('run')
@click.option('-c', '--config', 'config_path', default=None, metavar='PATH',
              help='Config file for the daemons (default: none, so the '
                   'built-in defaults and the environment apply).')
@click.option('--redis-url', default=None,
              help='Use this Redis instead of starting a private one.')
@click.option('--state-dir', default=None, metavar='DIR',
              help='Where the private Redis and the daemons keep files '
                   '(default: a new temporary directory).')
def command(config_path, redis_url, state_dir):
    """Run the whole suite in the foreground against a private Redis."""
    state_dir = state_dir or tempfile.mkdtemp(prefix='huey-worker-run-')
    os.makedirs(state_dir, exist_ok=True)
    env = dict(os.environ)
    if not config_path:
        config_path = os.path.join(state_dir, 'huey-worker.ini')
        if not os.path.exists(config_path):
            with open(config_path, 'w') as fh:
                fh.write('# huey-worker run: built-in defaults and the '
                         'environment apply;\n# add settings here (see '
                         'etc/huey-worker.ini).\n')
    env['HUEY_WORKER_CONFIG'] = config_path
    server = None
    if not redis_url:
        try:
            server = EmbeddedRedis(os.path.join(state_dir, 'redis'))
        except RedisNotFound as exc:
            click.echo('huey-worker: %s' % exc, err=True)
            raise SystemExit(EX_UNAVAILABLE)
        os.makedirs(server.directory, exist_ok=True)
        server.start()
        redis_url = server.url
        click.echo('private Redis at %s (pid %d, dir %s)' % (
            redis_url, server.process.pid, server.directory))
    env['HUEY_REDIS_URL'] = redis_url
    env.setdefault('HUEY_WORKER_PDF_INPUT_ROOT', os.path.join(state_dir, 'input'))
    env.setdefault('HUEY_WORKER_PDF_OUTPUT_ROOT',
                   os.path.join(state_dir, 'output', 'pdf'))
    env.setdefault('HUEY_WORKER_COLLECT_OUTPUT_ROOT',
                   os.path.join(state_dir, 'output', 'collect'))

    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal)
                for s in (signal.SIGINT, signal.SIGTERM)}
    children = []
    try:
        for name, args in DAEMONS:
            child = subprocess.Popen(
                [sys.executable, '-m', 'huey_worker'] + args, env=env,
                # Own process group: Ctrl-C reaches us once, and we stop the
                # daemons in order rather than all at the same instant.
                start_new_session=True)
            children.append((name, child))
            click.echo('started %s (pid %d)' % (name, child.pid))
        if any(name == 'status-server' for name, _ in DAEMONS):
            click.echo('status endpoint: http://127.0.0.1:%s/health' % env.get(
                'HUEY_WORKER_STATUS_PORT', '8470'))
        click.echo('Ctrl-C stops everything.')
        while not stopping:
            for name, child in children:
                if child.poll() is not None:
                    click.echo('%s exited with %s; stopping' % (
                        name, child.returncode), err=True)
                    stopping.append(None)
                    break
            time.sleep(0.2)
    finally:
        for name, child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for name, child in reversed(children):
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo('stopped')
