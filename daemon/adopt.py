"""Running the user's own Huey instance ([huey] app = module:attribute).

A project that already has `huey = RedisHuey('pdf-tasks', url=...)` in
pipelines/tasks.py names it in the config (or `--app pipelines.tasks:huey`)
and the consumer, scheduler, status endpoint and CLI run that very
instance, with everything the suite adds:

1. load: python_path first, then import the module (the current directory
   too when it is not found otherwise, as huey_consumer does) and take the
   attribute; anything that fails is a ConfigError naming [huey] app.
2. validate: only a Redis list queue can be made crash-safe (the atomic
   move into an in-flight list, the journal and dead letters live beside
   it); SqliteHuey, FileHuey, MemoryHuey and anything else are refused
   with the reason.  A PriorityRedisHuey keeps its sorted set, which the
   workers read through a script (storage.NativePriorityQueue).
3. derive: the app's name, result expiry (RedisExpireStorage), store_none,
   immediate and Redis connection become the configuration's [huey] queue,
   result_timeout, store_none, immediate and [redis] values wherever the
   configuration left them at their defaults (a value set in a file, the
   environment or on the command line wins), with the source
   'app MODULE:ATTR' for `huey-worker config`-style messages.
4. adopt: the instance gets the suite's storage (SuiteStorage, on the
   derived Redis, with the suite's timeouts) so crash-safe dequeue, staging
   and the journal work; the journal hooks; the suite's registry; the
   built-in tasks when [tasks] builtin is on; and keeps its own
   serializer (signing, compression) unless [huey] secret_key or
   compression is set.  Its class gains what the daemons call on the
   shared app (configure, keys, task_names), and huey_worker.app.current()
   returns it from then on.

Producers change nothing: they keep enqueueing through their own instance,
into the same Redis keys.  With a plain RedisHuey (results in one hash,
huey.results.NAME) each result is written both there, for the producer's
result.get(), and under the expiring key the journal and `huey-worker
task` read.
"""
import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import ssl
import sys
import threading
from urllib.parse import quote

import redis
from huey.api import Huey
from huey.registry import Registry
from huey.serializer import Serializer, SignedSerializer
from huey.storage import (BlackHoleStorage, FileStorage, MemoryStorage,
                          RedisExpireStorage, RedisPriorityQueue,
                          RedisStorage, SqliteStorage)

from . import app as app_module
from . import hooks, journal, redisconn
from .config import NAMES_A_REDIS, ConfigError, Source
from .storage import (NativePriorityQueue, NativePriorityStorage,
                      SuiteStorage)

log = logging.getLogger('huey_worker.adopt')


# --- 1. load ----------------------------------------------------------------

def split_spec(spec):
    """('pipelines.tasks', 'huey') from pipelines.tasks:huey or, as
    huey_consumer takes it, pipelines.tasks.huey."""
    if ':' in spec:
        module, _, attr = spec.partition(':')
    else:
        module, _, attr = spec.rpartition('.')
    return module, attr


def _error(cfg, problem):
    return ConfigError(problem, 'huey', 'app', cfg.huey.app,
                       origin=str(cfg.source('huey.app')))


def _import(name):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # huey_consumer finds a project in the current directory too.
        here = os.getcwd()
        top = name.split('.')[0]
        if exc.name not in (top, name) or here in sys.path or \
                '' in sys.path:
            raise
        sys.path.append(here)
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            sys.path.remove(here)
            raise


@contextlib.contextmanager
def running_user_code():
    """Around importing the user's modules: they may call sys.exit() or
    raise KeyboardInterrupt or SystemExit themselves, which is reported as
    a configuration error (what_it_did), while a real Ctrl-C meanwhile
    still ends the command as Ctrl-C does.  Yields a list that holds the
    signal number once SIGINT arrived."""
    received = []

    def on_sigint(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    swapped = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if swapped:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield received
    finally:
        if swapped:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def reportable(exc, received):
    """Whether an exception out of the user's code is to be reported as a
    configuration error: anything but a KeyboardInterrupt from a real
    Ctrl-C (and GeneratorExit, which is no error)."""
    if isinstance(exc, GeneratorExit):
        return False
    return not (isinstance(exc, KeyboardInterrupt) and received)


def what_it_did(exc):
    """'called sys.exit(3)', 'raised KeyboardInterrupt', 'ValueError: x'."""
    if isinstance(exc, SystemExit):
        return 'called sys.exit(%s)' % ('' if exc.code is None
                                        else repr(exc.code))
    if isinstance(exc, BaseException) and not isinstance(exc, Exception):
        text = ' '.join(str(exc).split())
        return 'raised %s%s' % (type(exc).__name__,
                                (': %s' % text) if text else '')
    return '%s: %s' % (type(exc).__name__, exc)


def load(cfg):
    """The Huey instance [huey] app names, imported and validated (not
    changed)."""
    for directory in cfg.tasks.python_path:
        if directory not in sys.path:
            sys.path.insert(0, directory)
    module_name, attr = split_spec(cfg.huey.app)
    with running_user_code() as received:
        try:
            obj = _import(module_name)
        except BaseException as exc:
            if not reportable(exc, received):
                raise
            raise _error(cfg, 'cannot import module %r: %s (the module and '
                              'everything it imports must be importable '
                              'here: same virtualenv, [tasks] python_path or '
                              'the working directory)' % (
                                  module_name, what_it_did(exc))) from None
        for part in attr.split('.'):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise _error(cfg, 'module %r has no attribute %r' % (
                    module_name, attr)) from None
            except BaseException as exc:
                if not reportable(exc, received):
                    raise
                did = what_it_did(exc)
                if isinstance(exc, Exception):
                    did = 'raised ' + did
                raise _error(cfg, 'cannot import module %r: getting its '
                                  'attribute %r %s' % (module_name, part,
                                                       did)) from None
    if not isinstance(obj, Huey):
        raise _error(cfg, '%s is a %s, not a Huey instance' % (
            attr, type(obj).__name__))
    check_storage(cfg, obj)
    return obj


# --- 2. validate ------------------------------------------------------------

def storage_class_of(app):
    """The storage the app queues in: the class it was built with, even
    when immediate mode swapped in memory for the time being."""
    original = getattr(app, '_hw_original', None)
    if original is not None:
        return original['storage_class']
    if app.immediate and app.immediate_use_memory:
        return app.storage_class or RedisStorage
    return type(app.storage)


_ATOMIC = 'no atomic move of a message into an in-flight list'


def refusal(app, storage_class):
    """Why the suite cannot make this storage crash-safe, or None."""
    kind = type(app).__name__
    name = storage_class.__name__
    if issubclass(storage_class, RedisStorage):
        return None
    why = 'it is not Redis-based'
    if issubclass(storage_class, SqliteStorage) or 'sqlite' in name.lower():
        why = ('%s keeps its queue in a local file that consumers on other '
               'hosts cannot share and has %s' % (kind, _ATOMIC))
    elif issubclass(storage_class, FileStorage):
        why = ('%s keeps its queue in files in a local directory that '
               'consumers on other hosts cannot share and has %s'
               % (kind, _ATOMIC))
    elif issubclass(storage_class, MemoryStorage):
        why = ('%s keeps its queue in the memory of one process: producers '
               'and consumers in other processes never see it and a crash '
               'loses it' % kind)
    elif issubclass(storage_class, BlackHoleStorage):
        why = '%s discards every message' % kind
    else:
        why = ('%s stores with %s, which is not Redis-based: no in-flight '
               'lists, journal or dead letters beside its queue'
               % (kind, name))
    return 'crash-safe delivery needs Redis: ' + why


def check_storage(cfg, app):
    problem = refusal(app, storage_class_of(app))
    if problem:
        raise _error(cfg, problem)


# --- 3. derive --------------------------------------------------------------

def _explicit(cfg, name):
    """Set in a file, the environment or on the command line (a running
    `make run` lending its Redis is no choice of the user's)."""
    return cfg.source(name).kind not in ('default', 'run')


def _original(app):
    """What the app was built with, kept across reconfigurations."""
    original = getattr(app, '_hw_original', None)
    if original is None:
        immediate = app.immediate
        storage_class = storage_class_of(app)
        storage = None if immediate and app.immediate_use_memory \
            else app.storage
        original = {
            'name': app.name, 'serializer': app.serializer,
            'store_none': app.store_none, 'immediate': immediate,
            'storage_class': storage_class,
            'pool': _pool_of(app, storage),
            'expire_time': getattr(storage, '_expire_time', None)
            if storage is not None else
            app.storage_kwargs.get('expire_time'),
            'notify_result': bool(getattr(storage, 'notify_result', False)
                                  if storage is not None else
                                  app.storage_kwargs.get('notify_result')),
            'hash_results': not issubclass(storage_class,
                                           RedisExpireStorage),
            'native_priority': issubclass(storage_class,
                                          RedisPriorityQueue)}
    return original


def _pool_of(app, storage):
    pool = getattr(storage, 'pool', None)
    if pool is not None:
        return pool
    kwargs = {k: v for k, v in app.storage_kwargs.items()
              if k not in ('expire_time', 'notify_result',
                           'notify_result_ttl', 'blocking', 'read_timeout',
                           'client_name', 'clean_name')}
    if kwargs.get('connection_pool') is not None:
        return kwargs['connection_pool']
    if kwargs.get('url'):
        return redis.ConnectionPool.from_url(kwargs['url'])
    kwargs.pop('url', None)
    kwargs.pop('connection_pool', None)
    return redis.ConnectionPool(**{k: v for k, v in kwargs.items()
                                   if v is not None})


def redis_values(pool):
    """[redis] values naming the server `pool` connects to."""
    from redis.sentinel import SentinelConnectionPool
    if isinstance(pool, SentinelConnectionPool):
        return None
    ck = pool.connection_kwargs
    cls = pool.connection_class
    db = int(ck.get('db') or 0)
    values = {'redis.username': ck.get('username') or '',
              'redis.password': ck.get('password') or ''}
    if issubclass(cls, redis.UnixDomainSocketConnection):
        values['redis.url'] = 'unix://%s?db=%d' % (quote(ck['path']), db)
        return values
    host = ck.get('host') or 'localhost'
    if ':' in host:
        host = '[%s]' % host
    scheme = 'redis'
    if issubclass(cls, redis.SSLConnection):
        scheme = 'rediss'
        reqs = ck.get('ssl_cert_reqs', 'required')
        values['redis.tls_verify'] = reqs not in ('none', ssl.CERT_NONE)
        for key, name in (('ssl_ca_certs', 'tls_ca_file'),
                          ('ssl_certfile', 'tls_cert_file'),
                          ('ssl_keyfile', 'tls_key_file')):
            if ck.get(key):
                values['redis.' + name] = ck[key]
    values['redis.url'] = '%s://%s:%d/%d' % (scheme, host,
                                             int(ck.get('port') or 6379), db)
    return values


def derive(cfg, app):
    """The configuration the adopted app runs with: cfg, with the app's
    own values where cfg has only defaults.  Returns (config, notes)."""
    original = _original(app)
    values, sources = dict(cfg.values), dict(cfg.sources)
    source = Source('app', 'app %s' % cfg.huey.app)
    notes = []

    def take(name, value, src=source):
        if not _explicit(cfg, name):
            values[name], sources[name] = value, src
        elif values[name] != value:
            notes.append('%s %r (%s) wins over the app\'s %r' % (
                name, values[name], cfg.source(name), value))

    take('huey.queue', original['name'])
    if original['expire_time']:
        take('huey.result_timeout', int(original['expire_time']))
    take('huey.store_none', bool(original['store_none']))
    if original['immediate'] and not _explicit(cfg, 'huey.immediate'):
        # Producers built from this module run their tasks themselves.
        values['huey.immediate'] = True
        sources['huey.immediate'] = Source(
            'app', 'app %s (built with immediate=True)' % cfg.huey.app)
    elif original['immediate'] and not values['huey.immediate']:
        notes.append('the app was built with immediate=True (producers '
                     'importing it run their tasks themselves); [huey] '
                     'immediate = false (%s) runs it against Redis here'
                     % cfg.source('huey.immediate'))
    if not any(_explicit(cfg, name) for name in NAMES_A_REDIS):
        found = redis_values(original['pool'])
        if found is None:
            raise _error(cfg, 'its Redis is reached through Sentinel; name '
                              'the sentinels in [redis] sentinels and '
                              'sentinel_master')
        for name in ('redis.url', 'redis.host', 'redis.port', 'redis.db',
                     'redis.username', 'redis.password', 'redis.sentinels',
                     'redis.tls_ca_file', 'redis.tls_cert_file',
                     'redis.tls_key_file', 'redis.tls_verify'):
            if name in found and not _explicit(cfg, name):
                values[name], sources[name] = found[name], source
    elif redis_values(original['pool']) is not None:
        notes.append('the [redis] settings (%s) win over the app\'s own '
                     'connection' % ', '.join(sorted(set(
                         str(cfg.source(n)) for n in NAMES_A_REDIS
                         if _explicit(cfg, n)))))
    replacing = [n for n in ('huey.secret_key', 'huey.compression')
                 if _explicit(cfg, n)]
    if replacing:
        # _apply then swaps the app's serializer for the suite's: the
        # app's producers must sign and compress the same way.
        notes.append('%s replace the app\'s own serializer (%s): its '
                     'producers must use SignedSerializer(..., salt='
                     '\'huey-worker\') with the same key and compression'
                     % (', '.join('[%s] %s (%s)' % (tuple(n.split('.')) + (
                         cfg.source(n),)) for n in replacing),
                        type(original['serializer']).__name__))
    derived = dataclasses.replace(cfg, values=values, sources=sources,
                                  warnings=list(cfg.warnings))
    return derived, notes


# --- 4. adopt ---------------------------------------------------------------

class AdoptedStorage(SuiteStorage):
    """The suite's storage for an app whose own storage keeps results in
    one hash (plain RedisStorage): each result goes there too, where the
    producer's result.get() looks (it never expires there, as with Huey
    itself; the producer's get() removes it)."""

    def __init__(self, name='huey', expire_time=604800, **kwargs):
        super().__init__(name, expire_time=expire_time, **kwargs)
        self.results_hash = 'huey.results.%s' % self.name

    def put_data(self, key, value, is_result=False):
        super().put_data(key, value, is_result)
        if is_result:
            self._write('HSET', self.results_hash, key, value)


class NativePriorityAdoptedStorage(NativePriorityQueue, AdoptedStorage):
    """AdoptedStorage on a PriorityRedisHuey's own sorted set."""


# (results in Huey's hash, queue in Huey's priority set) -> storage class
_STORAGES = {(False, False): SuiteStorage,
             (True, False): AdoptedStorage,
             (False, True): NativePriorityStorage,
             (True, True): NativePriorityAdoptedStorage}


class AdoptedApp(app_module.SuiteApp):
    """Mixed into the adopted instance's class: what the daemons call on
    the shared app, and what the suite adds to its Huey (SuiteApp: task
    locks with owners, the journal's enqueue record, sys.exit() in a
    task)."""

    hw_adopted = None      # the [huey] app value
    config = None

    @property
    def keys(self):
        return self.storage.keys

    def task_names(self):
        return sorted(self._registry._registry)

    def configure(self, cfg):
        """Apply a (raw) Config again, e.g. on SIGHUP: returns self."""
        _apply(self, derive(cfg, self)[0])
        return self


def _suite_serializer(cfg):
    if cfg.huey.secret_key:
        return SignedSerializer(cfg.huey.secret_key, salt='huey-worker',
                                compression=cfg.huey.compression,
                                use_zlib=True)
    return Serializer(compression=cfg.huey.compression, use_zlib=True)


def _apply(app, cfg):
    """Point the adopted instance at cfg (already derived)."""
    original = app._hw_original
    old = app.__dict__.get('storage')
    app.config = cfg
    app.name = cfg.huey.queue
    app.store_none = cfg.huey.store_none
    if _explicit(cfg, 'huey.secret_key') or _explicit(cfg,
                                                      'huey.compression'):
        app.serializer = _suite_serializer(cfg)
    else:
        app.serializer = original['serializer']
    app._immediate = cfg.huey.immediate
    if cfg.huey.immediate:
        app.storage = MemoryStorage(app.name)
    else:
        kind = _STORAGES[original['hash_results'],
                         original['native_priority']]
        app.storage = kind(app.name, expire_time=cfg.huey.result_timeout,
                           connection_pool=redisconn.connection_pool(cfg),
                           notify_result=original['notify_result'])
        # Huey built with utc=False stamps naive local etas: scored so.
        app.storage.utc = bool(app.utc)
    if old is not None and old is not app.storage and \
            isinstance(old, SuiteStorage):
        old.disconnect()


def _take_over(app, spec):
    """Give the instance the suite's class, registry and journal (once)."""
    if isinstance(app, AdoptedApp):
        return
    cls = type(app)
    app.__class__ = type(cls.__name__, (AdoptedApp, cls),
                         {'__module__': cls.__module__,
                          '__qualname__': cls.__qualname__})
    app.hw_adopted = spec
    if type(app._registry) is Registry:
        app._registry.__class__ = app_module.SuiteRegistry
    journal.install(app)
    _retire_shared_journal(app)


def _retire_shared_journal(app):
    """The shared app's journal reacts to every delivery (the hooks are
    module-wide); with another app in charge, only that app's journal may,
    or each task would be recorded twice."""
    shared = app_module.huey
    if shared is app:
        return
    retired = journal.install(shared)
    for hook_list, method in (
            (hooks.on_dequeued, retired.on_dequeued),
            (hooks.on_started, retired.on_started),
            (hooks.on_outcome, retired.on_outcome),
            (hooks.on_requeued, retired.on_requeued),
            (hooks.on_dead_letter, retired.on_dead_letter)):
        while method in hook_list:
            hook_list.remove(method)


def _register_shared_tasks(app):
    """Tasks declared on the shared app (the built-in ones when [tasks]
    builtin is on, a task module written against `huey_worker.huey`) run
    here too, under the same names."""
    shared = app_module.huey
    if shared is app:
        return
    mine = app._registry._registry
    for name, task_class in list(shared._registry._registry.items()):
        if name not in mine:
            app._registry.register(task_class)


def adopt(cfg, with_tasks=True):
    """Load, validate, derive and take over the app [huey] app names;
    import the task modules when asked.  Returns the app, whose .config is
    the derived configuration; current() returns it from now on."""
    app = load(cfg)
    original = _original(app)
    derived, notes = derive(cfg, app)
    _take_over(app, cfg.huey.app)
    app._hw_original = original
    _apply(app, derived)
    for note in notes:
        log.info('[huey] app %s: %s', cfg.huey.app, note)
    if derived.huey.queue != original['name']:
        log.warning('[huey] queue %r (%s) differs from the name of %s (%r): '
                    'producers enqueueing through that app fill a queue this '
                    'suite does not read', derived.huey.queue,
                    derived.source('huey.queue'), cfg.huey.app,
                    original['name'])
    if with_tasks:
        app_module.load_task_modules(derived, app)
        _register_shared_tasks(app)
    _configure_shared(derived, app)
    app_module.set_current(app)
    return app


def _configure_shared(cfg, app):
    """The shared app produces into the adopted app's queue, the same way
    (a task body enqueueing through `huey_worker.huey`)."""
    shared = app_module.huey
    if shared is app or cfg.huey.immediate:
        return
    shared.configure(cfg)
    shared.serializer = app.serializer


def configure(cfg, app=None):
    """huey_worker.app.configure() with [huey] app set: adopt it, or apply
    cfg again to the app adopted already (SIGHUP)."""
    if isinstance(app, AdoptedApp) and app.hw_adopted == cfg.huey.app:
        app.configure(cfg)
        app_module.load_task_modules(app.config, app)
        _register_shared_tasks(app)
        _configure_shared(app.config, app)
        return app
    return adopt(cfg)


def describe(app):
    """'pipelines.tasks:huey (RedisHuey)' for log lines, or None."""
    if not isinstance(app, AdoptedApp):
        return None
    return '%s (%s)' % (app.hw_adopted, type(app).__name__)


def signs(app):
    """Whether the app's messages are signed (its own SignedSerializer)."""
    return isinstance(getattr(app, 'serializer', None), SignedSerializer)
