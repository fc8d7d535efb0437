"""Tasks the journal has no record of, found waiting in the queue.

A producer of the suite records each task as it enqueues it; a plain Huey
producer (a web app with its own `RedisHuey('huey', url=...)`) writes no
record, and the worker makes one only when it takes the task.  A reader
asking for such a task meanwhile (`GET /tasks/ID`, `huey-worker task ID`,
`huey-worker wait ID`) would get "unknown" while the task waits; instead,
on a journal miss, the reader looks for the id among the queued messages
and, when it is there, records the task pending, so its next read is a
plain one.

The look is bounded and cheap:

* only the SCAN_MAX newest queue entries (the list's first SCAN_MAX
  positions, where Huey's LPUSH puts a new message; workers take from the
  other end), and only the first HEAD_BYTES of each, cut in Redis by a Lua
  script (QUEUE_HEADS) called for one chunk at a time: FIRST_CHUNK entries,
  then as many as hold about CALL_BYTES (the script copies whole messages
  before cutting them, so big messages make small chunks and Redis is
  never held long), at most MAX_CHUNK;
* nothing is unpickled: the id and task name are read off the bytes, by a
  pattern for Huey's usual pickle (protocol 4 or 5) or else by walking the
  pickle's opcodes (delivery.peek_message, which also inflates compressed
  messages);
* what was read is kept per queue in this process: ids found stay known
  (a later miss for one is answered without Redis), and a later look reads
  only what was pushed since the last one, stopping at the entry that was
  newest then (one script call of FIRST_CHUNK entries when nothing was
  pushed).  The whole index is read afresh when older than REFRESH_AFTER
  seconds, which forgets the messages taken since.

Messages in the suite's priority set are not looked at: only the suite's
producers put them there, and they record each task as they enqueue it.
An adopted PriorityRedisHuey's own sorted set, where its plain producers
put theirs, is (whole, up to SCAN_MAX: it is ordered by priority).

An id found is a claim of a queued message, like any message's; the
record says only what the message says (id and task name: a Huey message
carries no enqueue time), and the worker that takes the task completes it
(writer.Journal.on_started).  A read in the instant between a worker
taking the message and its first transaction (well under a millisecond)
still finds neither.
"""
import json
import re
import threading
import time

from redis.exceptions import ResponseError

from .. import delivery
from .layout import field_pairs, text, ttl_of
from .reads import decode_record, read_task, shape
from .scripts import GUARDED_SEEN, QUEUE_HEADS, script_for

SCAN_MAX = 10000
HEAD_BYTES = 512
# Entries read per script call: few first (an unchanged queue answers
# after one), then sized to about CALL_BYTES of messages.
FIRST_CHUNK = 8
MAX_CHUNK = 1000
CALL_BYTES = 512 * 1024
REFRESH_AFTER = 60.0
ID_MAX_CHARS = 200

# Huey's Message, pickled with protocol 4 or 5 (Python 3.8+'s highest):
# the frame, the global huey.registry.Message, then the id and the task
# name as short strings.
_USUAL = re.compile(
    rb'\x80[\x04\x05]\x95.{8}\x8c\x0dhuey\.registry\x94\x8c\x07Message'
    rb'\x94\x93\x94\(\x8c(.)', re.S)


def message_claims(head):
    """(task id, task name or None) read off the beginning of a queued
    message, or None.  Never unpickles."""
    match = _USUAL.match(head)
    if match is not None:
        end = match.end()
        size = head[end - 1]
        raw_id = head[end:end + size]
        after = end + size
        name = None
        if head[after:after + 2] == b'\x94\x8c' and len(head) > after + 2:
            raw_name = head[after + 3:after + 3 + head[after + 2]]
            if len(raw_name) == head[after + 2]:
                name = _plain(raw_name)
        task_id = _plain(raw_id) if len(raw_id) == size else None
        if task_id is not None:
            return task_id, name
    peeked = delivery.peek_message(head)
    if peeked.task_id is None:
        return None
    return peeked.task_id, peeked.task_name


def _plain(raw):
    try:
        value = raw.decode('utf-8')
    except UnicodeDecodeError:
        return None
    return value if 0 < len(value) <= ID_MAX_CHARS and \
        value.isprintable() else None


class QueueIndex:
    """The ids of one queue's waiting messages, as last read."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ids = {}        # task id -> task name (or None)
        self.newest = None   # the first entry (its head) at the last look
        self.built = float('-inf')

    def find(self, storage, task_id):
        """The task name (or '' when the message does not say) of a
        queued message with this id, or None."""
        with self.lock:
            now = time.monotonic()
            if now - self.built > REFRESH_AFTER or \
                    len(self.ids) > 2 * SCAN_MAX:
                self.ids, self.newest = {}, None
            if task_id not in self.ids:
                self._look(storage, now)
            found = self.ids.get(task_id, False)
            return None if found is False else (found or '')

    def _look(self, storage, now):
        script = script_for(storage, QUEUE_HEADS)
        found, first, reached = _scan(script, storage.queue_key, found={},
                                      stop_at=self.newest)
        native = getattr(storage, 'native_key', None)
        if native is not None:
            # An adopted PriorityRedisHuey's own set, where its producers
            # put their tasks: ordered by priority, not by age, so read
            # whole (up to SCAN_MAX) each time.
            _scan(script, native, found=found)
        if reached:
            self.ids.update(found)
        else:
            # Read afresh: what was taken since is forgotten.
            self.ids, self.built = found, now
        self.newest = first


def _scan(script, key, found, stop_at=None):
    """Claims of the messages at `key` (a list from its newest end, or a
    sorted set from its first member) added to `found`, up to SCAN_MAX
    entries or the entry `stop_at`.  Returns (found, the first entry's
    head, whether stop_at was reached)."""
    first, reached = None, False
    start, chunk = 0, FIRST_CHUNK
    while start < SCAN_MAX and not reached:
        stop = min(start + chunk, SCAN_MAX) - 1
        try:
            size, heads = script(keys=[key], args=[start, stop, HEAD_BYTES])
        except ResponseError:
            size, heads = 0, []   # scripts refused (a Redis without Lua)
        if heads:
            chunk = max(FIRST_CHUNK, min(
                MAX_CHUNK, 16 * chunk,
                CALL_BYTES * len(heads) // max(1, size)))
        for head in heads:
            if first is None:
                first = head
            if stop_at is not None and head == stop_at:
                reached = True   # seen at the last look, and all after
                break
            claim = message_claims(head)
            if claim is not None:
                found.setdefault(*claim)
        if len(heads) <= stop - start:
            break   # the end of the queue
        start = stop + 1
    return found, first, reached


_indexes = {}
_indexes_lock = threading.Lock()


def _index_for(storage):
    key = (id(storage.pool), storage.queue_key)
    index = _indexes.get(key)
    if index is None:
        with _indexes_lock:
            if len(_indexes) >= 64:
                _indexes.clear()   # pools of configurations reloaded since
            index = _indexes.setdefault(key, QueueIndex())
    return index


def find_queued(storage, task_id):
    """The task name ('' when unknown) of a message with this id waiting
    in `storage`'s queue (among the SCAN_MAX newest), else None."""
    return _index_for(storage).find(storage, task_id)


def seen_queued(app, storage, task_id):
    """The shaped record of `task_id` when the journal has none but the
    task waits in the queue: recorded pending (first_seen_in 'queue'), so
    the next read finds it; with the journal off, shown but not recorded.
    None when it is not in the queue either."""
    name = find_queued(storage, task_id)
    if name is None:
        return None
    now = time.time()
    fields = {'id': task_id, 'name': name or None, 'queue': storage.name,
              'state': 'pending', 'first_seen': now, 'first_seen_in': 'queue'}
    event = {'state': 'pending', 'at': now, 'seen_in': 'queue'}
    cfg = app.config
    if cfg is not None and cfg.journal.enabled:
        keys = storage.keys
        # The state and name indexes too, so `find --state pending` and
        # name listings show it.
        indexes = [keys.journal_state('waiting')] + (
            [keys.journal_name(name)] if name else [])
        script_for(storage, GUARDED_SEEN)(
            keys=[keys.task(task_id), keys.task_log(task_id),
                  keys.journal_recent] + indexes,
            args=[text(now), ttl_of(storage), task_id,
                  json.dumps(event)] + field_pairs(fields))
        # Whoever wrote the record (this reader, or a worker that took the
        # task meanwhile), it is read as any other.
        record = read_task(app, storage, task_id)
        if record is not None:
            return record
    record = decode_record({k: text(v) for k, v in fields.items()
                            if v is not None})
    return shape(record, [event])
