"""The import name: the source folder daemon/ installs as the package
huey_worker (setup.cfg's package_dir), which never collides with
python-daemon's `daemon`."""
import configparser
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_cfg_lists_every_subpackage_of_the_source_folder():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, 'setup.cfg'))
    listed = set(cfg['options']['packages'].split())
    found = set()
    source = os.path.join(ROOT, 'daemon')
    for directory, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if d != '__pycache__']
        if '__init__.py' in files:
            relative = os.path.relpath(directory, source)
            found.add('huey_worker' if relative == '.' else
                      'huey_worker.' + relative.replace(os.sep, '.'))
    assert listed == found
    assert cfg['options']['package_dir'].split() == [
        'huey_worker', '=', 'daemon']


def test_python_daemon_and_the_suite_import_side_by_side(tmp_path, redis_url):
    # A producer in a venv that also has python-daemon (the library that
    # owns the import name `daemon`) enqueues through the suite's app.
    script = tmp_path / 'producer.py'
    script.write_text(
        'import daemon, daemon.pidfile\n'
        'from huey_worker import huey\n'
        'import huey_worker.app\n'
        'assert hasattr(daemon, "DaemonContext"), daemon.__file__\n'
        'assert huey is huey_worker.app.huey\n'
        '@huey.task()\n'
        'def noop():\n'
        '    return 1\n'
        'result = noop()\n'
        'print(daemon.__file__)\n'
        'print(huey.pending_count())\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HUEY_', 'REDIS_', 'PYTHONPATH'))}
    (tmp_path / 'empty.ini').touch()
    env.update(HUEY_REDIS_URL=redis_url,
               HUEY_WORKER_CONFIG=str(tmp_path / 'empty.ini'))
    out = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path),
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    daemon_file, pending = out.stdout.split()
    assert daemon_file.endswith(os.path.join('site-packages', 'daemon', '__init__.py'))
    assert pending == '1'


def test_messages_named_by_the_old_import_name_still_run():
    from huey_worker.app import SuiteHuey
    app = SuiteHuey()

    def probe(x):
        return x * 2
    # As a built-in task module would register it under the new name.
    probe.__module__ = 'huey_worker.tasks.probe_module'
    task = app.task()(probe).s(21)
    message = app._registry.create_message(task)
    old = message._replace(name='daemon.tasks.probe_module.probe')
    assert app._registry.create_task(old).execute() == 42
