"""What the actions share: who asked (Actor), what came of it for each
task (Outcome), the history event and last_action field they write, and
the times operators type (parse_time)."""
import datetime
import getpass
import json
import math
import os
import re
import socket
import time

from ..journal.layout import LOG_LENGTH, ttl_of  # noqa: F401  (re-exported)

# How many tasks one selection (by name, state or time window) acts on at
# most: each is one script call; the caller pages on for more.
SELECT_MAX = 10000


class ActionError(Exception):
    """An action refused as a whole (bad input, unknown queue or task
    name).  `status`: the HTTP status; `exit_code`: the CLI's exit code
    (docs/exit-codes.md)."""

    def __init__(self, message, status=400, exit_code=65):
        super().__init__(message)
        self.status, self.exit_code = status, exit_code


class Actor:
    """Who asked for an action and from where, as the history keeps it:
    `via` ('cli' or 'http'), `by` (the user name of a CLI user; 'token'
    for an HTTP client, which the bearer token is all that identifies),
    `origin` (the CLI's host name, or the HTTP client's address)."""

    def __init__(self, via, by, origin):
        self.via, self.by, self.origin = via, by, origin

    @classmethod
    def cli(cls):
        try:
            user = getpass.getuser()
        except (KeyError, OSError):   # no passwd entry (a container)
            user = 'uid %d' % os.getuid()
        return cls('cli', user, socket.gethostname())

    @classmethod
    def http(cls, client):
        """`client`: the peer's socket address (a (host, port, ...) tuple
        or a Unix socket's path)."""
        if isinstance(client, tuple) and client:
            origin = str(client[0])
        else:
            origin = str(client or 'unix socket')
        return cls('http', 'token', origin)

    def fields(self):
        return {'via': self.via, 'by': self.by, 'from': self.origin}

    def event(self, state, at, **extra):
        """The history event (JSON text) of an action by this actor."""
        event = {'state': state, 'at': at}
        event.update(self.fields())
        event.update((k, v) for k, v in extra.items() if v is not None)
        return json.dumps(event, sort_keys=True)

    def last_action(self, action, at, **extra):
        """The record's last_action field (JSON text)."""
        value = {'action': action, 'at': at}
        value.update(self.fields())
        value.update((k, v) for k, v in extra.items() if v is not None)
        return json.dumps(value, sort_keys=True)

    def __repr__(self):
        return '%s:%s@%s' % (self.via, self.by, self.origin)


class Outcome:
    """What one action did to one task: `done` True, or False with
    `reason` (a word: unknown, state, in-flight, no-message, ...) and
    `detail` (a sentence for people).  `state`: the task's state before
    the action (None when unknown)."""

    __slots__ = ('task_id', 'queue', 'done', 'state', 'reason', 'detail',
                 'already')

    def __init__(self, task_id, queue, done, state=None, reason=None,
                 detail=None, already=False):
        self.task_id, self.queue, self.done = task_id, queue, done
        self.state, self.reason, self.detail = state, reason, detail
        # Done before (idempotent repeat): nothing changed this time.
        self.already = already

    def as_dict(self):
        out = {'task_id': self.task_id, 'queue': self.queue,
               'done': self.done, 'state': self.state}
        if self.already:
            out['already'] = True
        if not self.done:
            out.update(reason=self.reason, detail=self.detail)
        return out

    def __repr__(self):
        return 'Outcome(%s)' % self.as_dict()


def summary(outcomes):
    """{'done': n, 'refused': n, 'unknown': n, 'tasks': [Outcome dicts]}."""
    outcomes = list(outcomes)
    return {'done': sum(1 for o in outcomes if o.done),
            'refused': sum(1 for o in outcomes
                           if not o.done and o.reason != 'unknown'),
            'unknown': sum(1 for o in outcomes if o.reason == 'unknown'),
            'tasks': [o.as_dict() for o in outcomes]}


def reply_of(reply):
    """A script's {code, word, state} reply with bytes decoded."""
    return [x.decode('utf-8', 'replace') if isinstance(x, bytes) else x
            for x in reply]


_AGO = re.compile(r'\A(\d+(?:\.\d+)?)\s*([smhdw])\Z')
_UNITS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400, 'w': 604800}


def parse_time(text, now=None):
    """Epoch seconds from what an operator types: epoch seconds
    (1718000000), an ISO 8601 date or time (2024-06-10, 2024-06-10T08:00,
    with or without an offset; without one it is local time), or a
    duration ago (90s, 30m, 2h, 7d, 1w).  ValueError names the text."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text):
            raise ValueError('expected a time, got %r' % (text,))
        return float(text)
    if not isinstance(text, str) or not text.strip():
        raise ValueError('expected a time: epoch seconds, an ISO 8601 date '
                         'or time, or a duration ago such as 2h; got %r'
                         % (text,))
    value = text.strip()
    match = _AGO.match(value)
    if match:
        now = time.time() if now is None else now
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):   # nan, inf: no moment in time
            raise ValueError('%r is not a time: give epoch seconds, an ISO '
                             '8601 date or time, or a duration ago' % text)
        return seconds
    try:
        moment = datetime.datetime.fromisoformat(value.replace('Z',
                                                               '+00:00'))
    except ValueError:
        raise ValueError('%r is not a time: give epoch seconds, an ISO 8601 '
                         'date or time (2024-06-10T08:00), or a duration '
                         'ago (90s, 30m, 2h, 7d)' % text)
    return moment.timestamp()   # naive: local time, as the CLI prints it
