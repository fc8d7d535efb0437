"""The Huey application every daemon and producer shares.

Users' task modules do `from huey_worker import huey` and decorate with
`@huey.task()`.  The instance exists at import time so tasks can register;
its queue, serializer and Redis connection come from the configuration on
first use (the daemons configure it explicitly after parsing their command
line; a producer such as a web app gets the file and environment settings).
"""
import importlib
import logging
import os
import sys
import threading

from huey import Huey
from huey.registry import Registry
from huey.serializer import Serializer, SignedSerializer
from huey.storage import MemoryStorage

from . import config as config_module
from . import journal
from . import locks
from . import redisconn
from .config import ConfigError
from .storage import SuiteStorage

log = logging.getLogger('huey_worker.app')

# Filled as built-in task modules are added to the package.
BUILTIN_TASK_MODULES = ('huey_worker.tasks.pdf', 'huey_worker.tasks.collect')


# Until 0.1 the package imported as `daemon`, so messages queued or scheduled
# before an upgrade name the built-in tasks daemon.tasks.*.
LEGACY_PREFIXES = (('daemon.tasks.', 'huey_worker.tasks.'),)


class SuiteRegistry(Registry):
    """Huey's registry, which also finds a built-in task by the name an
    older release gave it."""

    def string_to_task(self, task_str):
        if task_str not in self._registry:
            for old, new in LEGACY_PREFIXES:
                if task_str.startswith(old):
                    renamed = new + task_str[len(old):]
                    if renamed in self._registry:
                        return self._registry[renamed]
        return super().string_to_task(task_str)


class TaskExit(Exception):
    """A task body raised SystemExit (sys.exit()), KeyboardInterrupt or
    another BaseException that is no Exception: the task fails with this,
    which names what it did, instead of the exception ending the worker
    (a thread worker would end without a traceback and the task run again
    as "lost")."""


# BaseExceptions a task body may raise that are not its doing: a greenlet
# killed (gevent), a generator closed.
_NOT_THE_TASKS = ('GreenletExit', 'GeneratorExit')


def _from_interrupt_signal(exc):
    """Whether a KeyboardInterrupt is the worker's own interrupt: raised in
    a thread worker by the stopping consumer (WorkerInterrupt), or by the
    process worker's SIGTERM handler (its frame is the innermost of the
    traceback), which puts the task back in the queue."""
    from .worker import Worker, WorkerInterrupt
    if isinstance(exc, WorkerInterrupt):
        return True
    handler = getattr(getattr(Worker, '_on_interrupt', None), '__code__',
                      None)
    if handler is None:
        return True   # no handler to tell by: an interrupt, as before
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is handler


def _task_body(body):
    def run():
        try:
            return body()
        except Exception:
            raise
        except BaseException as exc:
            if type(exc).__name__ in _NOT_THE_TASKS or (
                    isinstance(exc, KeyboardInterrupt) and
                    _from_interrupt_signal(exc)):
                raise
            from .adopt import what_it_did
            raise TaskExit('%s raised by the task (it %s); the task fails, '
                           'the worker goes on' % (
                               _exception_text(exc), what_it_did(exc))
                           ) from exc
    return run


def _exception_text(exc):
    if isinstance(exc, SystemExit):
        return 'SystemExit(%s)' % ('' if exc.code is None else
                                   repr(exc.code))
    return type(exc).__name__


_ENQUEUE_FOLLOWS = {}


def _own_enqueue(function):
    """`function` if it is Huey's own Huey.enqueue (its code in Huey's
    module, not a wrapper put in its place), else None."""
    code = getattr(function, '__code__', None)
    return function if code is not None and code.co_filename == \
        Huey.__init__.__code__.co_filename else None


# Huey's enqueue as this module found it; None when something had put a
# wrapper in its place already.
_HUEY_OWN_ENQUEUE = _own_enqueue(vars(Huey)['enqueue'])


def _huey_enqueue_follows(cls):
    """Whether Huey's own enqueue, unwrapped, is what SuiteApp.enqueue's
    super() calls on `cls` (journal.enqueue_recorded does its work then):
    an adopted app's class with an enqueue of its own keeps it, and so
    does a wrapper put in place of Huey.enqueue (a tracing library's:
    Sentry's Huey integration adds its headers there), before or after
    this module was imported."""
    follows = _ENQUEUE_FOLLOWS.get(cls)
    if follows is None:
        mro = cls.__mro__
        follows = False
        for klass in mro[mro.index(SuiteApp) + 1:]:
            if 'enqueue' in vars(klass):
                follows = klass is Huey
                break
        _ENQUEUE_FOLLOWS[cls] = follows
    return follows and _HUEY_OWN_ENQUEUE is not None and \
        vars(Huey)['enqueue'] is _HUEY_OWN_ENQUEUE


class SuiteApp:
    """What the suite adds to a Huey instance, the shared one and an
    adopted one alike (mixed in before Huey's class):

    * locks taken by a task a suite worker runs carry their owner, so a
      dead worker's locks are released when its task goes back to the
      queue (daemon/locks.py);
    * the journal's record of an enqueue is sent only with the enqueue
      itself: an enqueue that fails (an argument that cannot be pickled,
      Redis down) leaves no record and nothing staged behind;
    * a task body that calls sys.exit() fails with a clear error instead
      of ending its worker."""

    def put_if_empty(self, key, data, ttl=None):
        taken = locks.acquire(self, key, ttl)
        if taken is locks.NOT_MINE:
            return super().put_if_empty(key, data, ttl)
        return taken

    def delete(self, key):
        deleted = locks.release(self, key)
        if deleted is locks.NOT_MINE:
            return super().delete(key)
        return deleted

    def enqueue(self, task):
        if _huey_enqueue_follows(type(self)):
            done = journal.enqueue_recorded(self, task)
            if done is not journal.NOT_TAKEN:
                return done
        with journal.enqueueing(self, task):
            return super().enqueue(task)

    def deserialize_task(self, data):
        task = super().deserialize_task(data)
        task.execute = _task_body(task.execute)
        return task


class SuiteHuey(SuiteApp, Huey):
    storage_class = SuiteStorage

    def __init__(self):
        self._storage = None
        self._configure_lock = threading.RLock()
        self.config = None
        super().__init__(name='huey', results=True, utc=True)
        self._registry = SuiteRegistry()

    @property
    def storage(self):
        if self._storage is None:
            with self._configure_lock:
                if self._storage is None:
                    self._configure_on_first_use()
        return self._storage

    def _configure_on_first_use(self):
        """A producer's first enqueue: the file and environment settings.
        With [huey] app set, that app is adopted first, which points this
        app at its queue, serializer and Redis: a web app enqueueing
        through `huey_worker.huey` must fill the queue the consumers of the
        adopted app read."""
        cfg = config_module.load()
        if cfg.huey.app:
            from . import adopt
            adopt.adopt(cfg, with_tasks=False)
        if self._storage is None:
            self.configure(cfg)

    @storage.setter
    def storage(self, value):
        self._storage = value

    def create_storage(self):
        if self.config is None:
            return None
        if self._immediate:
            return MemoryStorage(self.name)
        return SuiteStorage(self.name,
                            expire_time=self.config.huey.result_timeout,
                            connection_pool=redisconn.connection_pool(
                                self.config))

    def configure(self, cfg):
        """Apply a loaded Config: queue, serializer, results, Redis."""
        with self._configure_lock:
            self.config = cfg
            self.name = cfg.huey.queue
            self.store_none = cfg.huey.store_none
            if cfg.huey.secret_key:
                self.serializer = SignedSerializer(
                    cfg.huey.secret_key, salt='huey-worker',
                    compression=cfg.huey.compression, use_zlib=True)
            else:
                self.serializer = Serializer(compression=cfg.huey.compression,
                                             use_zlib=True)
            self._immediate = cfg.huey.immediate
            if isinstance(self._storage, SuiteStorage):
                self._storage.disconnect()
            elif hasattr(self._storage, 'pool'):
                self._storage.pool.disconnect()
            self._storage = self.create_storage()
        return self

    @property
    def keys(self):
        return self.storage.keys

    def task_names(self):
        return sorted(self._registry._registry)


huey = SuiteHuey()
journal.install(huey)  # records every task's life; [journal] enabled
locks.install()        # a dead worker's task locks are released


def load_task_modules(cfg, app=huey):
    """Import the built-in and configured task modules; a module that fails
    to import is a configuration error naming it."""
    for directory in cfg.tasks.python_path:
        if directory not in sys.path:
            sys.path.insert(0, directory)
    names = list(BUILTIN_TASK_MODULES) if cfg.tasks.builtin else []
    names += [m for m in cfg.tasks.modules if m not in names]
    from .adopt import reportable, running_user_code, what_it_did
    for name in names:
        # A module that calls sys.exit() or raises KeyboardInterrupt or
        # SystemExit is reported too (a real Ctrl-C still stops).
        with running_user_code() as received:
            try:
                module = importlib.import_module(name)
            except BaseException as exc:
                if not reportable(exc, received):
                    raise
                raise ConfigError(
                    'cannot import task module %r: %s' % (
                        name, what_it_did(exc)),
                    'tasks', 'modules', ', '.join(cfg.tasks.modules),
                    origin=str(cfg.source('tasks.modules'))) from None
        others = foreign_apps(module, app)
        if others:
            attribute, other = others[0]
            # Registering them on this app would run them, but without the
            # instance's own name, serializer and Redis: adopting it whole
            # is the one way (docs/adoption.md).
            raise ConfigError(
                'task module %r declares its tasks on a %s of its own '
                '(%s.%s), which this suite does not run: name it with '
                '[huey] app = %s:%s (docs/adoption.md)' % (
                    name, type(other).__name__, name, attribute, name,
                    attribute),
                'tasks', 'modules', ', '.join(cfg.tasks.modules),
                origin=str(cfg.source('tasks.modules')))
    return app.task_names()


def foreign_apps(module, app=huey):
    """[(attribute, instance)] of the Huey instances other than `app` and
    the shared one that `module` holds with tasks registered on them (a web
    app's `huey = RedisHuey(...)`): their tasks are not this suite's to run
    unless that instance is the one [huey] app names."""
    from huey.api import Huey as PlainHuey, TaskWrapper
    found = []
    # The instances themselves first, so the attribute named is the app's
    # own (huey), not one of its tasks.
    values = sorted(vars(module).items(),
                    key=lambda item: (isinstance(item[1], TaskWrapper), item))
    for attribute, value in values:
        other = value.huey if isinstance(value, TaskWrapper) else value
        if isinstance(other, PlainHuey) and other is not app and \
                other is not huey and other._registry._registry and \
                all(other is not seen for _, seen in found):
            found.append((attribute, other))
    return found


def configure(cfg, app=huey):
    """Configure the shared app and import its task modules; with [huey]
    app set, the user's own Huey instance instead (huey_worker.adopt),
    which current() then returns."""
    if cfg.huey.app:
        from . import adopt
        return adopt.configure(cfg, app)
    app.configure(cfg)
    load_task_modules(cfg, app)
    return app


_current = None


def current():
    """The app the daemons and the CLI run: the one [huey] app names once
    adopted, else the shared `huey`.  Daemon code asks here instead of
    importing `huey`."""
    return huey if _current is None else _current


def set_current(app):
    global _current
    _current = app


def hostname():
    return os.uname().nodename
