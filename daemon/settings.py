"""The one registry of settings.

Every setting is written once here: its INI section and key, environment
variables, type, default, validation and one line of help.  The INI parser,
environment overrides, command-line options, `huey-worker config`, the
annotated etc/huey-worker.ini and docs/configuration.md are all derived from
this list, so they cannot drift apart.
"""
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple


class InvalidValue(ValueError):
    """A value that does not fit its setting; the text says what was expected."""


# --- value types -----------------------------------------------------------
# Each type turns the text found in a file, the environment or the command
# line into a Python value, and back into text for `config` and the sample.

class Text:
    name = 'text'

    def parse(self, raw):
        return raw.strip()

    def format(self, value):
        return '' if value is None else str(value)


class Secret(Text):
    """Text that is never printed or logged."""
    name = 'secret'


class BearerToken(Secret):
    """A secret a client sends as `Authorization: Bearer TOKEN`: printable
    ASCII without spaces, or no client could ever send it (a newline or
    space in an environment variable is a typo, not a token)."""
    name = 'token'

    def parse(self, raw):
        value = raw.strip()
        bad = [c for c in value if not '!' <= c <= '~']
        if bad:
            raise InvalidValue(
                'a bearer token is printable ASCII without spaces; this one '
                'holds %s, which no client can send in an Authorization '
                'header' % ', '.join(sorted({repr(c) for c in bad})))
        return value


class Integer:
    def __init__(self, minimum=None, maximum=None):
        self.minimum, self.maximum = minimum, maximum
        self.name = 'whole number' + _range_words(minimum, maximum)

    def parse(self, raw):
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise InvalidValue('expected a %s' % self.name)
        _check_range(value, self.minimum, self.maximum, self.name)
        return value

    def format(self, value):
        return str(value)


class Number:
    def __init__(self, minimum=None, maximum=None):
        self.minimum, self.maximum = minimum, maximum
        self.name = 'number' + _range_words(minimum, maximum)

    def parse(self, raw):
        try:
            value = float(raw.strip())
        except ValueError:
            raise InvalidValue('expected a %s' % self.name)
        if math.isnan(value) or math.isinf(value):
            raise InvalidValue('expected a %s' % self.name)
        _check_range(value, self.minimum, self.maximum, self.name)
        return value

    def format(self, value):
        return ('%g' % value) if value is not None else ''


class Boolean:
    name = 'true or false'
    TRUE = {'1', 'yes', 'true', 'on'}
    FALSE = {'0', 'no', 'false', 'off'}

    def parse(self, raw):
        word = raw.strip().lower()
        if word in self.TRUE:
            return True
        if word in self.FALSE:
            return False
        raise InvalidValue('expected true or false (also yes/no, on/off, 1/0)')

    def format(self, value):
        return 'true' if value else 'false'


class Choice:
    def __init__(self, *choices, aliases=None):
        self.choices = choices
        self.aliases = aliases or {}
        self.name = 'one of ' + ', '.join(choices)

    def parse(self, raw):
        word = raw.strip().lower()
        word = self.aliases.get(word, word)
        if word not in self.choices:
            raise InvalidValue('expected %s' % self.name)
        return word

    def format(self, value):
        return value


class WordList:
    """Comma- or newline-separated words."""
    name = 'comma-separated list'

    def parse(self, raw):
        return tuple(w.strip() for w in re.split(r'[,\n]', raw) if w.strip())

    def format(self, value):
        return ', '.join(value)


class Count:
    """A whole number of at least one, or `auto`."""
    name = "'auto' or a whole number >= 1"

    def parse(self, raw):
        word = raw.strip().lower()
        if word == 'auto':
            return 'auto'
        try:
            value = int(word, 10)
        except ValueError:
            raise InvalidValue('expected %s' % self.name)
        if value < 1:
            raise InvalidValue('expected %s' % self.name)
        return value

    def format(self, value):
        return str(value)


class LogLevel(Choice):
    def __init__(self):
        super().__init__('debug', 'info', 'warning', 'error', 'critical',
                         aliases={'warn': 'warning'})


class RedisUrl(Text):
    name = 'redis://, rediss:// or unix:// URL'
    SCHEMES = ('redis://', 'rediss://', 'unix://')

    def parse(self, raw):
        value = raw.strip()
        if value and not value.startswith(self.SCHEMES):
            raise InvalidValue('expected a URL starting with redis://, '
                               'rediss:// or unix://')
        return value


class HostPortList(WordList):
    name = 'comma-separated list of host:port'

    def parse(self, raw):
        pairs = []
        words = super().parse(raw)
        if raw.strip() and not words:
            # Only separators (REDIS_SENTINELS=","): left empty, the daemons
            # would quietly use [redis] host and port instead.
            raise InvalidValue('expected host:port, ..., got %r' % raw)
        for word in words:
            host, sep, port = word.rpartition(':')
            if not sep or not host or not port.isdigit() \
                    or not 0 < int(port) < 65536:
                raise InvalidValue('expected host:port, got %r' % word)
            pairs.append(word)
        return tuple(pairs)


class NetworkList(WordList):
    """Comma-separated networks in CIDR form (a bare address: just it)."""
    name = 'comma-separated list of networks (CIDR)'

    def parse(self, raw):
        import ipaddress
        out = []
        for word in super().parse(raw):
            try:
                out.append(str(ipaddress.ip_network(word, strict=True)))
            except ValueError as exc:
                hint = ''
                if 'host bits set' in str(exc):
                    hint = '; did you mean %s?' % ipaddress.ip_network(
                        word, strict=False)
                raise InvalidValue('expected networks in CIDR form such as '
                                   '10.0.0.0/8, 192.168.1.0/24 or fd00::/8, '
                                   'got %r%s' % (word, hint))
        return tuple(out)


class JsonValue:
    def __init__(self, kind):
        self.kind = kind
        self.name = 'JSON ' + {list: 'list', dict: 'object'}[kind]

    def parse(self, raw):
        text = raw.strip() or ('[]' if self.kind is list else '{}')
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise InvalidValue('expected a %s (%s)' % (self.name, exc))
        if not isinstance(value, self.kind):
            raise InvalidValue('expected a %s' % self.name)
        return value

    def format(self, value):
        return json.dumps(value)


class AppPath(Text):
    """A Huey instance to import: module:attribute (module.attribute, as
    huey_consumer takes it, is accepted too)."""
    name = 'module:attribute (e.g. pipelines.tasks:huey)'
    _WORD = r'[A-Za-z_][A-Za-z0-9_]*'
    _RE = re.compile(r'^%s(\.%s)*(:%s(\.%s)*)?$' % ((_WORD,) * 4))

    def parse(self, raw):
        value = raw.strip()
        if value and (not self._RE.match(value)
                      or (':' not in value and '.' not in value)):
            raise InvalidValue('expected module:attribute, e.g. '
                               'pipelines.tasks:huey')
        return value


class Crontab(Text):
    """Five crontab fields: minute hour day month day-of-week."""
    name = "crontab 'minute hour day month day_of_week'"

    def parse(self, raw):
        fields = raw.split()
        if len(fields) != 5:
            raise InvalidValue('expected five crontab fields '
                               '(minute hour day month day_of_week), got %d'
                               % len(fields))
        from huey import crontab
        try:
            # strict: a misspelt field is an error, not silently ignored.
            crontab(*fields, strict=True)
        except ValueError as exc:
            raise InvalidValue('expected a valid crontab (%s)' % exc)
        return ' '.join(fields)


def _range_words(minimum, maximum):
    if minimum is not None and maximum is not None:
        return ' from %s to %s' % (minimum, maximum)
    if minimum is not None:
        return ' >= %s' % minimum
    if maximum is not None:
        return ' <= %s' % maximum
    return ''


def _check_range(value, minimum, maximum, name):
    if (minimum is not None and value < minimum) or \
            (maximum is not None and value > maximum):
        raise InvalidValue('expected a %s' % name)


# --- the registry ----------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    type: Any
    default: Any
    help: str
    env: Tuple[str, ...] = ()     # extra names users already have (seeds' .env)
    cli: Optional[str] = None      # a dedicated command-line flag, if any
    sample: Optional[str] = None   # the value written in the shipped config
    required: bool = False

    @property
    def name(self):
        return '%s.%s' % (self.section, self.key)

    @property
    def canonical_env(self):
        return ('HUEY_WORKER_%s_%s' % (self.section, self.key)).upper()

    @property
    def env_names(self):
        """Environment names in order of precedence: the first set one wins."""
        return (self.canonical_env,) + self.env

    @property
    def secret(self):
        return isinstance(self.type, Secret)


@dataclass(frozen=True)
class SectionFamily:
    """Sections named `prefix:NAME`, each holding the same keys."""
    prefix: str
    help: str
    settings: Tuple[Setting, ...] = field(default_factory=tuple)
    example_name: str = 'example'

    def setting(self, key):
        for s in self.settings:
            if s.key == key:
                return s
        return None


SECTION_HELP = {
    'redis': 'Where the queue lives.  url wins over host/port/db when set.',
    'huey': 'The Huey application: queue name, results, message signing.',
    'tasks': 'Which task modules are loaded, and the defaults of the '
             'built-in tasks.',
    'consumer': 'The consumer daemon: workers and their lifecycle.',
    'delivery': 'Crash-safe delivery: heartbeats, recovery, dead letters.',
    'logging': 'Where the daemons log.',
    'journal': 'The task journal read by the status endpoint and the CLI.',
    'status': 'The HTTP status endpoint (huey-worker status-server).',
    'scheduler': 'The scheduler daemon: periodic and delayed tasks, one '
                 'leader across hosts.',
    'pdf': 'The built-in pdf.extract task.',
    'collect': 'The built-in collect.urls and collect.pages tasks.',
}

S = Setting
SETTINGS = (
    # [redis]
    S('redis', 'url', RedisUrl(), '',
      'Redis URL (redis://, rediss:// for TLS, unix:///path.sock); when set '
      'it wins over host, port, db and password.',
      env=('HUEY_REDIS_URL', 'REDIS_URL'), cli='--redis-url'),
    S('redis', 'host', Text(), '127.0.0.1', 'Redis host.', env=('REDIS_HOST',)),
    S('redis', 'port', Integer(1, 65535), 6379, 'Redis port.',
      env=('REDIS_PORT',)),
    S('redis', 'db', Integer(0, 65535), 0, 'Redis database number.',
      env=('REDIS_DB',)),
    S('redis', 'username', Text(), '', 'Redis ACL user name (Redis 6+).',
      env=('REDIS_USERNAME',)),
    S('redis', 'password', Secret(), '', 'Redis password.',
      env=('REDIS_PASSWORD',)),
    S('redis', 'sentinels', HostPortList(), (),
      'Sentinel addresses (host:port, ...); when set the master is found '
      'through them.', env=('REDIS_SENTINELS',)),
    S('redis', 'sentinel_master', Text(), 'mymaster',
      'Name of the master the sentinels watch.', env=('REDIS_SENTINEL_MASTER',)),
    S('redis', 'sentinel_password', Secret(), '',
      'Password of the sentinels themselves, if they have one.',
      env=('REDIS_SENTINEL_PASSWORD',)),
    S('redis', 'tls_ca_file', Text(), '',
      'CA bundle that signs the server certificate (rediss:// only).'),
    S('redis', 'tls_cert_file', Text(), '',
      'Client certificate for mutual TLS (rediss:// only).'),
    S('redis', 'tls_key_file', Text(), '',
      'Key of the client certificate (rediss:// only).'),
    S('redis', 'tls_verify', Boolean(), True,
      'Verify the server certificate and host name (rediss:// only).'),
    S('redis', 'connect_timeout', Number(0.1, 300), 5.0,
      'Seconds to wait for a connection to Redis.'),
    S('redis', 'socket_timeout', Number(1, 3600), 30.0,
      'Seconds a Redis reply may take; always longer than the blocking '
      'queue read, so a quiet queue never looks like a failure.'),
    S('redis', 'retry_max_delay', Number(0.1, 600), 10.0,
      'Longest pause between reconnection attempts (backoff doubles up to it).'),
    S('redis', 'durable_writes', Number(0, 60), 0.0,
      'Seconds to wait (WAIT 1) for a replica to confirm each enqueue and '
      'each ack before it counts as done, so a failover does not lose it.  '
      'An enqueue no replica confirms in time is not acknowledged (raises '
      'NotReplicated, code NOREPLICAS); a worker\'s ack only warns (a '
      'failover that drops it runs the task again).  0: off (replication '
      'stays asynchronous).  See docs/operations.md (Sentinel).'),
    S('redis', 'allow_eviction', Boolean(), False,
      'Let the daemons start on a Redis whose maxmemory-policy is not '
      'noeviction.  Such a Redis deletes keys when full: queued tasks '
      '(allkeys-*), or heartbeats, leases and results (volatile-*), so by '
      'default the consumer, scheduler and status-server refuse it (exit '
      '78).  See docs/operations.md.'),
    S('redis', 'memory_warning_ratio', Number(0.1, 1.0), 0.9,
      'Share of Redis\'s maxmemory in use above which GET /health says '
      'degraded (Redis refuses writes, new tasks included, when full).'),

    # [huey]
    S('huey', 'queue', Text(), 'huey',
      'Queue name; producers and consumers must agree on it.',
      env=('HUEY_QUEUE_NAME',), cli='--queue'),
    S('huey', 'app', AppPath(), '',
      'An existing Huey instance to run (RedisHuey, RedisExpireHuey, '
      'PriorityRedisHuey, or one built with a Redis URL or pool), as '
      'module:attribute; its name, '
      'serializer, result expiry and Redis connection are used unless set '
      'here explicitly.  Empty: the suite\'s shared app.  '
      'See docs/adoption.md.', cli='--app'),
    S('huey', 'immediate', Boolean(), False,
      'Run tasks synchronously in the producer (the seeds\' always_eager '
      'rollback); daemons refuse to start with it.',
      env=('HUEY_IMMEDIATE',)),
    S('huey', 'result_timeout', Integer(1, 10 * 365 * 86400), 604800,
      'Seconds task results (and the journal) are kept.',
      env=('HUEY_RESULT_TIMEOUT',)),
    S('huey', 'store_none', Boolean(), False,
      'Store a result even when a task returns None.'),
    S('huey', 'secret_key', Secret(), '',
      'Signs every task message; messages with a bad signature are set '
      'aside, never run.  Same value on producers and consumers.',
      env=('HUEY_SECRET_KEY',)),
    S('huey', 'compression', Boolean(), False,
      'Compress task messages and results with zlib.'),

    # [tasks]
    S('tasks', 'modules', WordList(), (),
      'Python modules holding your Huey tasks (importable from the '
      'environment or python_path).', env=('HUEY_MODULES',), cli='--module'),
    S('tasks', 'python_path', WordList(), (),
      'Directories added to sys.path before the modules are imported.'),
    S('tasks', 'builtin', Boolean(), True,
      'Load the built-in pdf.* and collect.* tasks.'),
    S('tasks', 'timeout', Integer(0, 365 * 86400), 86400,
      'Default task time limit in seconds (0: none).',
      env=('HUEY_TASK_TIMEOUT',)),
    S('tasks', 'retries', Integer(0, 1000), 3,
      'Retries of the built-in tasks after a failure.', env=('HUEY_RETRIES',)),
    S('tasks', 'retry_delay', Number(0, 86400), 60.0,
      'Seconds before the first retry of a built-in task.',
      env=('HUEY_RETRY_DELAY',)),
    S('tasks', 'retry_backoff', Number(1, 100), 2.0,
      'Factor applied to the retry delay after each retry.'),

    # [consumer]
    S('consumer', 'worker_type', Choice('thread', 'process', 'greenlet',
                                        aliases={'gevent': 'greenlet'}),
      'thread',
      'thread for I/O-bound tasks, process for CPU-bound ones, greenlet '
      '(needs gevent).', env=('HUEY_WORKER_TYPE',), cli='--worker-type'),
    S('consumer', 'workers', Count(), 'auto',
      "Number of workers, or auto: usable CPUs in process mode, usable CPUs "
      "x threads_per_cpu in thread and greenlet mode.",
      env=('HUEY_WORKERS', 'HUEY_WORKER_COUNT'), cli='--workers'),
    S('consumer', 'threads_per_cpu', Integer(1, 256), 4,
      'Threads per usable CPU when workers = auto (I/O-bound tasks wait '
      'more than they compute).'),
    S('consumer', 'shutdown_timeout', Number(0, 86400), 30.0,
      'Seconds running tasks get to finish on stop or reload; tasks still '
      'running then are put back in the queue.'),
    S('consumer', 'max_tasks', Integer(0, 10 ** 9), 0,
      'Recycle a worker after this many tasks (0: never).'),
    S('consumer', 'stuck_timeout', Number(5, 86400), 60.0,
      'Seconds a worker may go without a sign of life outside a task '
      'before the watchdog stops being fed.'),
    S('consumer', 'timeout_grace', Number(1, 86400), 10.0,
      'Thread workers: seconds a task over its time limit may go on '
      'after TaskTimeout was raised in its thread (it goes off at the '
      'next Python line, not inside a C call) before the task is '
      'abandoned: it fails with TaskTimeout and a new thread takes its '
      'worker slot.'),
    S('consumer', 'read_timeout', Number(0.1, 60), 1.0,
      'Seconds one blocking queue read waits before checking for stop.'),
    S('consumer', 'max_result_bytes', Integer(0, 1 << 40), 64 << 20,
      'Largest task result (serialized bytes) a worker stores; a task '
      'returning more fails with ResultTooLarge.  Keep it under Redis\'s '
      'proto-max-bulk-len (512 MB by default); 0: no limit.'),
    S('consumer', 'identity', Text(), '',
      'Stable consumer identity (default: host name:instance, unique per queue); a '
      'restarted consumer with the same identity requeues its tasks at once.',
      env=('HUEY_CONSUMER_ID',)),
    S('consumer', 'instance', Text(), 'main',
      'Instance name, for several consumers on one host '
      '(huey-worker@NAME.service sets it).', env=('HUEY_WORKER_INSTANCE',)),
    S('consumer', 'flush_locks', Boolean(), False,
      'Delete every task lock the app declares (lock_task) at start, '
      'whoever holds it, as huey_consumer --flush-locks does; the locks '
      'of dead workers are released without it (docs/delivery.md).',
      cli='--flush-locks'),
    S('consumer', 'extra_locks', WordList(), (),
      'More lock names to delete at start (locks taken inside task '
      'bodies, which the app declares only when they run); naming any '
      'flushes the app\'s locks too, as huey_consumer --extra-locks does '
      'without --flush-locks.', cli='--extra-locks'),

    # [delivery]
    S('delivery', 'heartbeat_interval', Number(0.2, 60), 2.0,
      'Seconds between consumer heartbeats in Redis.'),
    S('delivery', 'recovery_timeout', Number(1, 3600), 15.0,
      'Seconds without heartbeat after which a consumer counts as dead and '
      'its in-flight tasks are requeued by a living one.'),
    S('delivery', 'max_deliveries', Integer(1, 1000), 5,
      'Deliveries of one task message after which it is a poison message '
      'and goes to the dead-letter list.'),

    # [logging]
    S('logging', 'level', LogLevel(), 'info', 'Log level.',
      env=('HUEY_LOG_LEVEL', 'LOG_LEVEL'), cli='--log-level'),
    S('logging', 'file', Text(), '',
      'Also log to this file (reopened on SIGUSR1 and after rotation); '
      'empty: stderr only.', env=('HUEY_LOG_FILE',), cli='--log-file',
      sample='/var/log/huey-worker.log'),
    S('logging', 'task_events', Choice('end', 'both', 'none', aliases={
        **dict.fromkeys(Boolean.TRUE, 'both'),
        **dict.fromkeys(Boolean.FALSE, 'none')}), 'end',
      'Per-task log lines at INFO: end = one line when a task ends (name, '
      'id, outcome, duration); both = also one when it starts; none.  '
      'What each line costs: docs/benchmarks.md.'),
    S('logging', 'format', Choice('text', 'json'), 'text',
      'text: one line per record, for people; json: one JSON object per '
      'line with stable keys (time, level, logger, process, message, and '
      'task, task_id, outcome, duration, attempt on task lines), for log '
      'shippers (docs/operations.md).', env=('HUEY_LOG_FORMAT',),
      cli='--log-format'),

    # [journal]
    S('journal', 'enabled', Boolean(), True,
      'Record every task\'s life (state, progress, result) for the status '
      'endpoint and the CLI.'),
    S('journal', 'args_max_bytes', Integer(0, 1 << 20), 1024,
      'Largest args summary kept per task (longer ones are cut).'),
    S('journal', 'result_max_bytes', Integer(0, 16 << 20), 64 << 10,
      'Largest result (as JSON) copied into the journal; a larger one is '
      'left in Huey\'s result store only.'),
    S('journal', 'progress_interval', Number(0, 3600), 0.5,
      'Seconds between progress writes to Redis; report_progress() calls in '
      'between only update memory (the last one is always written).'),
    S('journal', 'index_max', Integer(100, 10 ** 8), 100000,
      'Most tasks kept in each state index of the journal (records '
      'themselves expire after [journal] retention).'),
    S('journal', 'retention', Integer(0, 10 * 365 * 86400), 86400,
      'Seconds a task\'s journal record (history, indexes, kept message) '
      'lives after its last change; 0: as long as [huey] result_timeout, '
      'which also caps it.  Huey\'s result stays for result_timeout: a '
      'task whose record expired still answers from it (state and '
      'result).  See docs/journal.md.'),

    # [status]
    S('status', 'bind', Text(), '127.0.0.1',
      'Address the status endpoint listens on.  Beyond loopback (0.0.0.0, '
      'a LAN address) it needs a token, which then guards every route but '
      'GET /health/live; without one it refuses to start.',
      env=('HUEY_STATUS_BIND',)),
    S('status', 'port', Integer(0, 65535), 8470,
      'Port of the status endpoint.', env=('HUEY_STATUS_PORT',),
      cli='--port'),
    S('status', 'token', BearerToken(), '',
      'Bearer token; when set, the routes that write (POST /tasks and '
      'the operator actions: retry, revoke, restore, cancel, purge, '
      'dead-letter requeue and purge, pause, resume) are enabled and '
      'require it (and so do reads, when bind is beyond loopback).',
      env=('HUEY_STATUS_TOKEN',)),
    S('status', 'max_body_bytes', Integer(0, 64 << 20), 1 << 20,
      'Largest request body accepted.'),
    S('status', 'request_timeout', Number(0.1, 600), 10.0,
      'Seconds a client has to send its request.'),
    S('status', 'head_timeout', Number(0.1, 600), 5.0,
      'Seconds a client has to send its request line and headers, from its '
      'first byte (or from connecting, when it sends nothing); '
      'request_timeout when that is lower.'),
    S('status', 'max_connections_per_client', Integer(1, 100000), 64,
      'Connections one client address may hold open (of 256); over it, its '
      'slowest or longest idle one is closed, or the newcomer refused.  '
      'Raise it for a reverse proxy on the same host.'),
    S('status', 'queues', WordList(), (),
      'Other queue names to report besides [huey] queue (several apps '
      'sharing one Redis).'),

    # [scheduler]
    S('scheduler', 'lease_timeout', Number(1, 600), 15.0,
      'Seconds the leader lease lasts; a standby takes over within it when '
      'the leader dies.'),
    S('scheduler', 'interval', Number(0.05, 60), 1.0,
      'Seconds between scans for due delayed and retrying tasks.'),
    S('scheduler', 'catchup_window', Integer(0, 7 * 86400), 0,
      'Seconds back that periodic slots missed while no scheduler led are '
      'still enqueued, once each (0: only slots missed by a leader handover '
      'or restart, up to lease_timeout + 10 s, are enqueued late).'),

    # [pdf]
    S('pdf', 'input_root', Text(), '/var/lib/huey-worker/input',
      'pdf.extract only reads files below this directory.'),
    S('pdf', 'output_root', Text(), '/var/lib/huey-worker/output/pdf',
      'Where extraction results are written.'),
    S('pdf', 'max_pages', Integer(1, 10 ** 6), 5000,
      'Largest page count accepted.'),
    S('pdf', 'max_bytes', Integer(1, 1 << 40), 200 << 20,
      'Largest PDF accepted (bytes).'),
    S('pdf', 'blocks', Boolean(), False,
      'Also write text blocks with bounding boxes (a task argument wins).'),
    S('pdf', 'images', Boolean(), False,
      'Also save embedded images as files (a task argument wins).'),

    # [collect]
    S('collect', 'output_root', Text(), '/var/lib/huey-worker/output/collect',
      'Where collected items are written.'),
    S('collect', 'per_host_concurrency', Integer(1, 256), 2,
      'Requests in flight at once to one host.'),
    S('collect', 'rate_limit', Number(0, 10000), 5.0,
      'Requests per second to one host (0: unlimited).'),
    S('collect', 'connect_timeout', Number(0.1, 600), 10.0,
      'Seconds to connect.'),
    S('collect', 'read_timeout', Number(0.1, 3600), 60.0,
      'Seconds to wait for data.'),
    S('collect', 'retries', Integer(0, 100), 3,
      'Retries of one request on connection errors, 5xx and 429.'),
    S('collect', 'retry_delay', Number(0, 3600), 1.0,
      'Longest wait (seconds) before the first retry of a request, doubled '
      'after each; the wait is drawn at random below it (full jitter; a '
      'Retry-After header from the server wins).'),
    S('collect', 'retry_max_delay', Number(0, 86400), 120.0,
      'Cap on the wait before retrying a request; a Retry-After asking for '
      'more fails the item (the task itself is retried later).'),
    S('collect', 'max_body_bytes', Integer(1, 1 << 40), 50 << 20,
      'Largest response body saved.'),
    S('collect', 'content_types', WordList(),
      ('application/json', 'text/html', 'text/plain', 'image/*',
       'application/pdf'),
      'Content types saved (type/* allowed).'),
    S('collect', 'max_redirects', Integer(0, 100), 5, 'Redirects followed.'),
    S('collect', 'user_agent', Text(), 'huey-worker-collect/1',
      'User-Agent header sent.'),
    S('collect', 'allow_networks', NetworkList(), (),
      'Networks that collect.* and pdf.extract URLs (and their redirects) '
      'may reach although they are loopback, private, link-local, '
      'unique-local, multicast, reserved or unspecified, which are refused '
      'by default; e.g. 10.0.0.0/8, 192.168.1.0/24 (docs/tasks.md).'),
)

PERIODIC = SectionFamily(
    prefix='periodic',
    help='A periodic task declared in the config: [periodic:NAME], one '
         'section per schedule.  Enqueued by the scheduler leader only.',
    example_name='nightly-report',
    settings=(
        S('periodic:*', 'task', Text(), '', 'Registered task name to enqueue.',
          required=True, sample='myapp.tasks.nightly_report'),
        S('periodic:*', 'schedule', Crontab(), '',
          'minute hour day month day_of_week, as in crontab.', required=True,
          sample='0 2 * * *'),
        S('periodic:*', 'args', JsonValue(list), [],
          'Positional arguments (JSON list).'),
        S('periodic:*', 'kwargs', JsonValue(dict), {},
          'Keyword arguments (JSON object).'),
        S('periodic:*', 'enabled', Boolean(), True,
          'Set false to pause this schedule without deleting it.'),
    ))

SECTION_FAMILIES = (PERIODIC,)

BY_NAME = {s.name: s for s in SETTINGS}
SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS))


def lookup(section, key):
    return BY_NAME.get('%s.%s' % (section, key))


def family_of(section):
    prefix, sep, name = section.partition(':')
    if sep and name:
        for family in SECTION_FAMILIES:
            if family.prefix == prefix:
                return family
    return None
