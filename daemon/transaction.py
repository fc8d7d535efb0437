"""One MULTI/EXEC round trip for a redis-py pipeline, with less client work
than Pipeline.execute.

Every task costs the worker a transaction of 10 to 20 commands (the
journal's writes, the delivery count) and the ack with its outcome.
redis-py's Pipeline.execute spends several microseconds of Python per
command on bookkeeping the worker never needs (observability hooks,
HIMPORT preparation, per-reply dispatch), which made the transactions the
biggest cost of a no-op task (profile in docs/benchmarks.md).  Here the
pipeline is only the recorder: its commands are packed and sent in one
write with redis-py's own packer, and the replies read with its own
parser, with the same results and errors as Pipeline.execute (response
callbacks applied, the first error raised).  Anything unusual (WATCH, a
non-transactional pipeline) is left to redis-py.

Lua scripts called on the pipeline (Script(..., client=pipe)) go as EVAL
with their text rather than EVALSHA: redis-py would first ask SCRIPT
EXISTS, one more round trip per transaction, and an EVALSHA the server
has forgotten (a restart) would fail inside EXEC after the commands
before it had run.  EVAL finds the compiled script by its hash all the
same; the text costs a few hundred bytes on the wire.

A transaction of one command (a worker's ack is one script) goes without
MULTI and EXEC: one command is atomic alone.

With hiredis installed, commands are packed by hiredis.pack_command
directly, as redis-py itself does but without its per-command Python
wrapper; anything it does not take goes through redis-py's packer.

All this leans on redis-py internals (the pipeline's command stack and
error helpers, the connection's packer and hiredis reader), so setup.cfg
pins redis-py to the majors CI tests (REDIS_PY, tests/test_redis_py.py)
and this module refuses to load, with one line naming the installed
version and that range, when any of them is missing: a redis-py that
changed them fails at import, in CI or at a daemon's start, not deep
inside a worker.
"""
from redis.exceptions import (ConnectionError, ExecAbortError, ResponseError,
                              WatchError)

from .exitcodes import EX_CONFIG

try:   # hiredis packs in C; redis-py's wrapper around it costs more
    import hiredis
    from redis.connection import HiredisRespSerializer
except ImportError:
    hiredis = HiredisRespSerializer = None
try:   # what redis-py's hiredis reader answers while a reply is incomplete
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:
    _NOT_ENOUGH_DATA = None

# The range setup.cfg's install_requires allows; tests/test_redis_py.py
# checks the two agree and runs the Redis-heavy tests at both ends of it.
REDIS_PY = '>=5.3,<9'


class UnsupportedRedisPy(ImportError):
    """The installed redis-py lacks internals this module uses.  The CLI
    prints it as one line on stderr and exits with `exit_code`."""
    exit_code = EX_CONFIG   # an installation to fix: systemd must not loop


def missing_internals():
    """The redis-py internals this module needs that the installed
    redis-py lacks, as names ('Pipeline.raise_first_error', ...); empty
    when all are there.  Builds an unconnected client: no network."""
    import inspect

    import redis
    from redis.connection import Connection, ConnectionPool
    from redis.utils import HIREDIS_AVAILABLE

    missing = []
    # Nothing connects: the pool and connection are only constructed.
    pipe = redis.Redis(connection_pool=ConnectionPool()).pipeline()
    for name in ('command_stack', 'watching', 'transaction',
                 'explicit_transaction', 'connection', 'connection_pool',
                 'scripts', 'response_callbacks', 'raise_first_error',
                 'annotate_exception', 'reset', 'execute'):
        if not hasattr(pipe, name):
            missing.append('Pipeline.' + name)
    script = pipe.register_script('return 1')
    missing += ['Script.' + n for n in ('sha', 'script')
                if not hasattr(script, n)]
    # Taken with no command name: redis-py before 5.3 requires one.
    parameters = list(inspect.signature(
        ConnectionPool.get_connection).parameters.values())[1:]
    if any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                               p.POSITIONAL_OR_KEYWORD)
           for p in parameters):
        missing.append('ConnectionPool.get_connection() without arguments')
    conn = Connection()
    for name in ('pack_commands', 'send_packed_command', 'send_command',
                 'read_response', 'disconnect'):
        if not hasattr(conn, name):
            missing.append('Connection.' + name)
    if HIREDIS_AVAILABLE:   # the fast path redis-py's own hiredis use opens
        if _NOT_ENOUGH_DATA is None:
            missing.append('redis._parsers.hiredis.NOT_ENOUGH_DATA')
        if HiredisRespSerializer is None or not isinstance(
                getattr(conn, '_command_packer', None),
                HiredisRespSerializer):
            missing.append('Connection._command_packer '
                           '(HiredisRespSerializer)')
        parser = getattr(conn, '_parser', None)
        if not hasattr(parser, 'read_from_socket'):
            missing.append('Connection._parser.read_from_socket')
        else:
            # The reader exists once connected; on_connect only stores the
            # (absent) socket and builds it.
            try:
                parser.on_connect(conn)
                if getattr(parser, '_reader', None) is None:
                    missing.append('Connection._parser._reader')
                parser.on_disconnect()
            except Exception as exc:
                missing.append('Connection._parser.on_connect (%s)' % exc)
    return missing


def _check_redis_py():
    import redis
    try:
        missing = missing_internals()
    except Exception as exc:   # a redis-py changed past what the check knows
        missing = ['what the check looks at (%s: %s)' % (
            type(exc).__name__, exc)]
    if missing:
        raise UnsupportedRedisPy(
            'redis-py %s is not supported (huey-worker needs redis%s): it '
            'lacks %s; pip install "redis%s"' % (
                getattr(redis, '__version__', '?'), REDIS_PY,
                ', '.join(missing), REDIS_PY))


_check_redis_py()

_ACKS = (bytes, str)   # +OK and +QUEUED, raw or decoded
_MULTI = ('MULTI',)
_EXEC = ('EXEC',)


def execute(pipe, conn=None, then=None, wanted=None):
    """Run `pipe`'s commands in one MULTI/EXEC; their replies, as
    pipe.execute() returns them.  The pipeline is reset afterwards.
    `conn`: a connection the caller keeps (else one from the pool).
    `then`: a command (argument tuple) sent right after EXEC in the same
    write, on `conn`; its reply is left for the caller to read().
    `wanted`: how many of the last replies the caller looks at; only those
    go through redis-py's response callbacks (the others stay raw).  Any
    error is raised all the same."""
    stack = pipe.command_stack
    if then is not None and conn is None:
        raise ValueError('a follow-up command needs a kept connection')
    if not stack or pipe.watching or not pipe.transaction \
            or pipe.explicit_transaction or pipe.connection is not None:
        replies = pipe.execute() if stack else []
        if then is not None:
            send(conn, *then)
        return replies
    pool = pipe.connection_pool if conn is None else None
    if pool is not None:
        conn = pool.get_connection()
    try:
        replies, errors = _exchange(pipe, conn, stack, then)
    except BaseException:
        # Replies may be left unread on the socket: never reuse it as it
        # is (a kept connection reconnects on its next command).
        conn.disconnect()
        raise
    finally:
        if pool is not None:
            pool.release(conn)
        pipe.reset()
    try:
        return _results(pipe, stack, replies, errors, wanted)
    except BaseException:
        if then is not None:
            conn.disconnect()   # the follow-up's reply is still on its way
        raise


def _results(pipe, stack, replies, errors, wanted=None):
    if replies is None:
        raise WatchError('Watched variable changed.')
    for index, error in errors:
        replies.insert(index, error)
    if len(replies) != len(stack):
        raise ResponseError('Wrong number of response items from pipeline '
                            'execution')
    # Looked at by type first: a task's transactions have 10 to 30 replies
    # and an error among them is rare.
    if errors or any(issubclass(kind, ResponseError)
                     for kind in set(map(type, replies))):
        pipe.raise_first_error(stack, replies)
    callbacks = pipe.response_callbacks
    skip = 0 if wanted is None else max(0, len(stack) - wanted)
    out = replies[:skip]
    for reply, (args, options) in zip(replies[skip:], stack[skip:]):
        # The callbacks' dict keeps upper-case names, as redis-py's
        # command methods send them: skip its case-folding lookup.
        name = args[0]
        callback = dict.get(callbacks, name)
        if callback is None and not name.isupper():
            callback = callbacks.get(name)
        if callback is not None:
            options.pop('keys', None)
            reply = callback(reply, **options)
        out.append(reply)
    return out


def as_sent(pipe, stack):
    """The argument tuples of `stack` (a pipeline's command_stack) as
    execute() sends them: scripts as EVAL with their text."""
    if not pipe.scripts:
        return [args for args, _ in stack]
    texts = {script.sha: script.script for script in pipe.scripts}
    out = []
    for args, _ in stack:
        if args[0] == 'EVALSHA' and args[1] in texts:
            args = ('EVAL', texts[args[1]]) + tuple(args[2:])
        out.append(args)
    return out


def pack(conn, commands):
    """`commands` (argument tuples) packed for one send_packed_command."""
    if hiredis is not None and isinstance(
            getattr(conn, '_command_packer', None), HiredisRespSerializer):
        try:
            return [b''.join([hiredis.pack_command(
                tuple(args[0].split()) + tuple(args[1:])
                if ' ' in args[0] else args) for args in commands])]
        except (TypeError, AttributeError):
            pass   # e.g. a bytearray argument: redis-py converts it
    return conn.pack_commands(commands)


def _exchange(pipe, conn, stack, then=None):
    if len(stack) == 1:
        # One command is atomic alone (a worker's ack is one script): no
        # MULTI and EXEC around it, for Redis to run and us to read.
        conn.send_packed_command(pack(
            conn, as_sent(pipe, stack) + ([then] if then is not None
                                          else [])))
        try:
            return [conn.read_response()], []
        except ResponseError as exc:   # raised as redis-py's execute would
            return [exc], []
    conn.send_packed_command(pack(
        conn, [_MULTI] + as_sent(pipe, stack) + [_EXEC] +
        ([then] if then is not None else [])))
    # Every reply is read even after an error, so the connection stays in
    # step; an error here means Redis refused a command before EXEC.
    errors = []
    for index, error in _queued_errors(conn, 1 + len(stack)):
        if index == 0:
            errors.append((0, error))
        else:
            pipe.annotate_exception(error, index, stack[index - 1][0])
            errors.append((index - 1, error))
    try:
        replies = conn.read_response()
    except ExecAbortError:
        if errors:
            raise errors[0][1]
        raise
    return replies, errors


def _queued_errors(conn, count):
    """Read `count` acknowledgements of queued commands (+OK or +QUEUED);
    the (position, error) of those Redis refused.  With hiredis the reader
    is asked directly, in one loop: redis-py's per-reply wrapper (timeouts,
    push messages, health-check bookkeeping) cost more than the reply
    itself, and a transaction of the worker has 10 to 30 of them."""
    parser = getattr(conn, '_parser', None)
    reader = getattr(parser, '_reader', None)
    if _NOT_ENOUGH_DATA is None or reader is None or \
            not hasattr(parser, 'read_from_socket'):
        return _queued_errors_slow(conn, count)
    errors = []
    index = 0
    gets = reader.gets
    try:
        while index < count:
            reply = gets()
            if type(reply) not in _ACKS:
                if reply is _NOT_ENOUGH_DATA:
                    parser.read_from_socket()
                    continue
                if isinstance(reply, ConnectionError):
                    raise reply
                if isinstance(reply, ResponseError):
                    errors.append((index, reply))
            index += 1
    except OSError as exc:   # redis-py's own wrapper would convert it
        raise ConnectionError('Error while reading from Redis: %s' % (
            exc,)) from exc
    return errors


def _queued_errors_slow(conn, count):
    errors = []
    for index in range(count):
        try:
            conn.read_response()
        except ResponseError as exc:
            errors.append((index, exc))
    return errors


def command(conn, *args):
    """One command on a connection the caller keeps; its raw reply."""
    send(conn, *args)
    return read(conn)


def send(conn, *args):
    try:
        # Packed here: redis-py's send_command packs each argument
        # through a Python generator first, microseconds a producer's
        # every enqueue would wait on.
        conn.send_packed_command(pack(conn, [args]))
    except BaseException:
        conn.disconnect()
        raise


def read(conn):
    """The next reply waiting on a kept connection."""
    try:
        return conn.read_response()
    except BaseException:
        conn.disconnect()
        raise
