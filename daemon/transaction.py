"""One MULTI/EXEC round trip for a redis-py pipeline, with less client work
than Pipeline.execute.

Every task costs the worker two transactions of 5 to 30 commands (the
journal's writes, Huey's outcome, the ack).  redis-py's Pipeline.execute
spends several microseconds of Python per command on bookkeeping the
worker never needs (observability hooks, HIMPORT preparation, per-reply
dispatch), which made the transactions the biggest cost of a no-op task
(profile in docs/benchmarks.md).  Here the pipeline is only the recorder:
its commands are packed and sent in one write with redis-py's own packer,
and the replies read with its own parser, with the same results and
errors as Pipeline.execute (response callbacks applied, the first error
raised).  Anything unusual (WATCH, a non-transactional pipeline) is left
to redis-py.

Lua scripts called on the pipeline (Script(..., client=pipe)) go as EVAL
with their text rather than EVALSHA: redis-py would first ask SCRIPT
EXISTS, one more round trip per transaction, and an EVALSHA the server
has forgotten (a restart) would fail inside EXEC after the commands
before it had run.  EVAL finds the compiled script by its hash all the
same; the text costs a few hundred bytes on the wire.

With hiredis installed, commands are packed by hiredis.pack_command
directly, as redis-py itself does but without its per-command Python
wrapper; anything it does not take goes through redis-py's packer.
"""
from redis.exceptions import ExecAbortError, ResponseError, WatchError

try:   # hiredis packs in C; redis-py's wrapper around it costs more
    import hiredis
    from redis.connection import HiredisRespSerializer
except ImportError:
    hiredis = HiredisRespSerializer = None

_MULTI = ('MULTI',)
_EXEC = ('EXEC',)


def execute(pipe, conn=None):
    """Run `pipe`'s commands in one MULTI/EXEC; their replies, as
    pipe.execute() returns them.  The pipeline is reset afterwards.
    `conn`: a connection the caller keeps (else one from the pool)."""
    stack = pipe.command_stack
    if not stack:
        return []
    if pipe.watching or not pipe.transaction or pipe.explicit_transaction \
            or pipe.connection is not None:
        return pipe.execute()
    pool = pipe.connection_pool if conn is None else None
    if pool is not None:
        conn = pool.get_connection()
    try:
        replies, errors = _exchange(pipe, conn, stack)
    except BaseException:
        # Replies may be left unread on the socket: never reuse it as it
        # is (a kept connection reconnects on its next command).
        conn.disconnect()
        raise
    finally:
        if pool is not None:
            pool.release(conn)
        pipe.reset()
    if replies is None:
        raise WatchError('Watched variable changed.')
    for index, error in errors:
        replies.insert(index, error)
    if len(replies) != len(stack):
        raise ResponseError('Wrong number of response items from pipeline '
                            'execution')
    pipe.raise_first_error(stack, replies)
    callbacks = pipe.response_callbacks
    out = []
    for reply, (args, options) in zip(replies, stack):
        callback = callbacks.get(args[0])
        if callback is not None:
            options.pop('keys', None)
            reply = callback(reply, **options)
        out.append(reply)
    return out


def _commands(pipe, stack):
    if not pipe.scripts:
        return [args for args, _ in stack]
    texts = {script.sha: script.script for script in pipe.scripts}
    out = []
    for args, _ in stack:
        if args[0] == 'EVALSHA' and args[1] in texts:
            args = ('EVAL', texts[args[1]]) + tuple(args[2:])
        out.append(args)
    return out


def _pack(conn, commands):
    if hiredis is not None and isinstance(
            getattr(conn, '_command_packer', None), HiredisRespSerializer):
        try:
            return [b''.join([hiredis.pack_command(
                tuple(args[0].split()) + tuple(args[1:])
                if ' ' in args[0] else args) for args in commands])]
        except (TypeError, AttributeError):
            pass   # e.g. a bytearray argument: redis-py converts it
    return conn.pack_commands(commands)


def _exchange(pipe, conn, stack):
    conn.send_packed_command(_pack(
        conn, [_MULTI] + _commands(pipe, stack) + [_EXEC]))
    errors = []
    # Every reply is read even after an error, so the connection stays in
    # step; an error here means Redis refused a command before EXEC.
    try:
        conn.read_response()
    except ResponseError as exc:
        errors.append((0, exc))
    for index, (args, _) in enumerate(stack):
        try:
            conn.read_response()
        except ResponseError as exc:
            pipe.annotate_exception(exc, index + 1, args)
            errors.append((index, exc))
    try:
        replies = conn.read_response()
    except ExecAbortError:
        if errors:
            raise errors[0][1]
        raise
    return replies, errors


def command(conn, *args):
    """One command on a connection the caller keeps; its raw reply."""
    try:
        conn.send_command(*args)
        return conn.read_response()
    except BaseException:
        conn.disconnect()
        raise
