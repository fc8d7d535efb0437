"""A task module of a test's own, as a user's would be, and the consumer
that loads it: for tests that run real consumer processes on tasks no
other test has."""
import contextlib
import importlib
import sys
import uuid


@contextlib.contextmanager
def task_module(app, tmp_path, source, prefix='mytasks'):
    """Write `source` as `<prefix>_<8 hex digits>.py` under tmp_path/code
    and import it here, so its tasks register with `app` (the producer's)
    under a module name no other test uses.  Yields the module with two
    more attributes: `name` (its import name) and `env` (the variables
    that make a consumer load it and nothing else: HUEY_MODULES,
    HUEY_WORKER_TASKS_PYTHON_PATH, HUEY_WORKER_TASKS_BUILTIN=false).  On
    exit its tasks leave `app`'s registry and the module sys.modules."""
    name = '%s_%s' % (prefix, uuid.uuid4().hex[:8])
    code = tmp_path / 'code'
    code.mkdir(exist_ok=True)
    (code / (name + '.py')).write_text(source)
    sys.path.insert(0, str(code))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(code))
    module.name = name
    module.env = {'HUEY_MODULES': name,
                  'HUEY_WORKER_TASKS_PYTHON_PATH': str(code),
                  'HUEY_WORKER_TASKS_BUILTIN': 'false'}
    try:
        yield module
    finally:
        for value in list(vars(module).values()):
            task_class = getattr(value, 'task_class', None)
            if task_class is not None:
                app._registry.unregister(task_class)
        sys.modules.pop(name, None)


def consumer_env(base_env, tasks, **extra):
    """`base_env` with the task module's variables (`tasks.env`), then
    `extra` (VARIABLE=value, values turned to str) over both."""
    env = dict(base_env, **tasks.env)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def ready_consumer(start_daemon, env, args=(), name='consumer'):
    """`huey-worker consumer [args]` with `env`, started through the
    start_daemon fixture; returned once it logged 'consumer ready'."""
    consumer = start_daemon(['consumer'] + list(args), env, name)
    consumer.wait_for_output('consumer ready')
    return consumer
