"""The journal's record layout: states, limits, and how values are
encoded into the Redis hash (see daemon/journal/__init__.py for the keys)."""
import datetime
import inspect
import json
import traceback

from .. import progress

STATES = ('pending', 'scheduled', 'running', 'retrying', 'complete',
          'failed', 'revoked', 'expired', 'canceled', 'interrupted', 'lost')
TERMINAL = frozenset(('complete', 'failed', 'revoked', 'expired',
                      'canceled'))
# Outcomes after which the task ran its body (they have a duration).
EXECUTED = frozenset(('complete', 'failed', 'retrying'))
# The state index (Keys.journal_state) each state is listed in: one for
# every task waiting to run (whatever the kind of wait), one for those
# running, one per end state.  A task leaves the waiting index when a
# worker takes it and the running one at its outcome, so each index holds
# only tasks in its states (plus, at most, what a crash interrupted) and
# an old pending task is found without going through the finished ones.
WAITING = ('pending', 'scheduled', 'retrying', 'interrupted', 'lost')
INDEX_OF = dict.fromkeys(WAITING, 'waiting')
INDEX_OF.update((state, state) for state in STATES if state not in WAITING)
INDEX_GROUPS = tuple(sorted(set(INDEX_OF.values())))
# Ends a task may be retried from (daemon/actions/retry.py), and those
# whose message the journal keeps for it.
RETRYABLE = ('failed', 'lost', 'revoked', 'canceled')
KEEPS_MESSAGE = frozenset(('failed', 'revoked', 'canceled'))

# The record's field of a delivery's running, until the history holds
# it: run:<started> -> the worker's label (reads.unlogged_events).
RUN_PREFIX = 'run:'
LOG_LENGTH = 50
TRIM_EVERY = 50
ERROR_MAX_CHARS = 2000
TRACEBACK_MAX_CHARS = 4000
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
                    900.0, 3600.0, float('inf'))

# The record's fields that say since when a task is due: the latest of
# them (a delayed task waits from its eta, a retry from its retry time, a
# redelivery from its requeue).  Wait times and queue latency count from it.
DUE_FIELDS = ('enqueued', 'first_seen', 'eta', 'next_retry', 'requeued_at')

FLOAT_FIELDS = frozenset((
    'enqueued', 'started', 'finished', 'updated', 'eta', 'next_retry',
    'duration', 'expires', 'requeued_at', 'progress_at', 'revoke_requested',
    'cancel_requested', 'first_seen', 'retried_at'))
INT_FIELDS = frozenset(('pid', 'worker', 'attempt', 'retries_total',
                         'retries_left', 'requeues', 'retried'))
NUMBER_FIELDS = frozenset(('progress_current', 'progress_total'))
JSON_FIELDS = frozenset(('metadata', 'result', 'last_action'))


# --- small encoders ----------------------------------------------------------

def text(value):
    if isinstance(value, bool):
        return '1' if value else '0'
    if isinstance(value, float):
        return repr(value)
    return str(value)


_PACKABLE = frozenset((str, bytes, int, float))


def encode(value):
    """`value` as a Redis argument: str, bytes, int and float go as they
    are (floats as repr, like text()); anything else as text()."""
    return value if type(value) in _PACKABLE else text(value)


def field_pairs(fields):
    """HSET's field/value arguments for `fields`, leaving out None."""
    out = []
    for name, value in fields.items():
        if value is not None:
            out += (name, encode(value))
    return out


def epoch(value):
    """Huey's naive UTC datetimes (utc=True) as epoch seconds."""
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return value.timestamp()
    return float(value)


def _text_of(value, as_text=repr):
    """repr (or str) of an argument; one whose own raises is named by its
    type: the summary never fails the enqueue or the worker that writes
    it (the task itself may still pickle and run)."""
    try:
        return as_text(value)
    except Exception as exc:
        return '<%s: %s() raised %s>' % (type(value).__name__,
                                         as_text.__name__,
                                         type(exc).__name__)


def _clip(value, budget, depth=0):
    """A JSON-safe copy of `value` that stays near `budget` characters:
    long strings and containers are cut before anything is encoded, so a
    huge argument costs no more than a small one."""
    if depth > 6:
        return '...'
    if isinstance(value, (str, bytes)):
        if isinstance(value, bytes):
            value = value[:budget].decode('utf-8', 'replace')
        return value if len(value) <= budget else value[:budget] + '...'
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        out = {}
        for i, (key, item) in enumerate(value.items()):
            if i >= 50 or budget <= 0:
                out['...'] = '%d more' % (len(value) - i)
                break
            key = _text_of(key, str)
            out[key[:100]] = _clip(item, budget, depth + 1)
            budget -= len(key) + 8
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value) if not isinstance(value, (list, tuple)) else value
        out = []
        for i, item in enumerate(items):
            if i >= 100 or budget <= 0:
                out.append('... %d more' % (len(items) - i))
                break
            out.append(_clip(item, budget, depth + 1))
            budget -= 8
        return out
    text = _text_of(value)
    return text if len(text) <= budget else text[:budget] + '...'


# One encoder made once: json.dumps with arguments builds one per call.
_summary_json = json.JSONEncoder(default=_text_of, sort_keys=True).encode
NO_ARGS = _summary_json({'args': [], 'kwargs': {}})


def args_summary(task, limit):
    """(summary text or None, sensitive flag)."""
    hidden = progress.sensitivity(task)
    if hidden is True:
        return None, True
    if limit <= 0:
        return None, False
    kwargs = dict(task.kwargs or {})
    kwargs.pop('task', None)   # a context task's own instance
    args = list(task.args or ())
    for name in hidden or ():
        if name in kwargs:
            kwargs[name] = '********'
    if hidden and args:
        # A hidden name passed by position: its place in the signature.
        names = _positional_names(type(task))
        for index in range(len(args)):
            if names is None or (index < len(names) and names[index] in
                                 hidden):
                args[index] = '********'
    if not args and not kwargs:
        # The common call with no arguments: its text is always this one.
        return (NO_ARGS if len(NO_ARGS) <= limit else
                NO_ARGS[:limit] + '...'), bool(hidden)
    try:
        summary = {'args': _clip(args, limit),
                   'kwargs': _clip(kwargs, limit)}
    except Exception as exc:
        # An argument that fails even to be walked (a long list whose
        # own len() raises): the record says so, the enqueue goes on.
        summary = {'args': ['<not shown: %s>' % type(exc).__name__],
                   'kwargs': {}}
    text = _summary_json(summary)
    if len(text) > limit:
        text = text[:limit] + '...'
    return text, bool(hidden)


_POSITIONAL = {}


def _positional_names(task_class):
    """The names of the task function's positional parameters, in order,
    or None when they cannot be known (then every positional argument of
    a task with hidden names is masked).  Huey keeps the function only in
    the closure of the class's execute(); read once per class."""
    if task_class not in _POSITIONAL:
        names = None
        try:
            func = inspect.getclosurevars(task_class.execute).nonlocals[
                'func']
            names = [p.name for p in inspect.signature(func).parameters
                     .values() if p.kind in (p.POSITIONAL_ONLY,
                                             p.POSITIONAL_OR_KEYWORD)]
        except (AttributeError, KeyError, TypeError, ValueError):
            pass
        _POSITIONAL[task_class] = names
    return _POSITIONAL[task_class]


def result_json(value, limit):
    """(JSON text, None) or (None, why it is not kept in the journal)."""
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError) as exc:
        return None, 'not representable as JSON (%s)' % exc
    if len(text) > limit:
        return None, ('%d bytes as JSON, more than [journal] '
                      'result_max_bytes (%d)' % (len(text), limit))
    return text, None


def error_fields(exc, with_traceback=False):
    """The record's error fields for `exc`; with `with_traceback`, its
    traceback too (the last TRACEBACK_MAX_CHARS characters: where it was
    raised), for a task that failed for good."""
    message = str(exc)
    fields = {'error_type': type(exc).__name__,
              'error_message': message[:ERROR_MAX_CHARS]}
    if with_traceback and exc.__traceback__ is not None:
        text = ''.join(traceback.format_exception(type(exc), exc,
                                                  exc.__traceback__))
        fields['error_traceback'] = text[-TRACEBACK_MAX_CHARS:]
    return fields


# --- the writer ----------------------------------------------------------------


def result_ttl_of(storage):
    """Seconds Huey keeps a result: [huey] result_timeout."""
    return int(getattr(storage, '_expire_time', 604800))


def ttl_of(storage):
    """Seconds journal records (their history, index entries and kept
    message) live after their last change: [journal] retention, at most
    [huey] result_timeout (0: result_timeout).  The writer notes the
    retention on the storage (Journal._active); other callers (actions,
    the status endpoint) find it in the current app's configuration."""
    expire = result_ttl_of(storage)
    retention = getattr(storage, 'journal_retention', None)
    if retention is None:
        retention = _configured_retention()
    return min(retention, expire) if retention else expire


def _configured_retention():
    from .. import app as app_module
    cfg = getattr(app_module.current(), 'config', None)
    section = getattr(cfg, 'journal', None)
    return getattr(section, 'retention', 0) or 0
