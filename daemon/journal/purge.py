"""Removing finished tasks by age (`huey-worker purge-results`): their
journal record and history, their entries in the journal's indexes, and
Huey's result (the expiring key, and for an adopted RedisHuey its entry in
the hash huey.results.NAME).  Never the queue, the schedule, in-flight
lists, dead letters or a task that has not ended: what this removes is
named by task id, one id's keys at a time.

Found through the journal's indexes, oldest first: the state index of
each chosen end state (scored by when the task entered it), then the
first layout's journal:recent and journal:results (until what they hold
has expired); only when a state index is at [journal] index_max (older
records fell out of it), a SCAN of the records.  Results outlive their
records ([journal] retention is shorter than [huey] result_timeout), so
when every end state is chosen, Huey's result keys without a record are
found by a SCAN too, their age read off their time to live.  Each batch
of ids is checked and removed by one Lua script, so a record is removed
only if it is, at that moment, in a chosen end state and finished before
the cutoff: a task a consumer picks up again meanwhile (the same id
re-enqueued) is left, whatever the reader saw a moment before.  Removed
results leave the journal's count of results held (its hour's)."""
import re
import time

from .layout import TERMINAL

BATCH = 500          # ids per script call: one round trip each
SCAN_COUNT = 1000    # SCAN's COUNT hint in the last pass

# KEYS: recent index, results index, Huey's results hash (the results
# index again when there is none), the results-held count, then record,
# history, Huey's result key
# and kept message (journal.writer: a failed, revoked or canceled task's,
# for a retry) of each id.  ARGV: cutoff (epoch seconds), dry run '1'/'0',
# orphans '1'/'0', hash '1'/'0', states (comma-separated), skip (0: none;
# 1: ids the recent index holds at or before the cutoff; 2: those and the
# ones the results index holds so), the prefix of the state indexes and of
# the name indexes ('' where the layout has none), then the ids.  A record
# goes when its state is one of the states and its end (finished, else its
# last change) is at or before the cutoff, with its entries in the indexes
# of its state and name; with orphans, an index entry whose record is
# gone (it expired) goes when its score is.  Returns {kept, skipped, state,
# count, ...}; '' counts entries without a record.
PURGE = r"""
local cutoff = tonumber(ARGV[1])
local dry, orphans, hash = ARGV[2] == '1', ARGV[3] == '1', ARGV[4] == '1'
local skip = tonumber(ARGV[6])
local state_index, name_index = ARGV[7], ARGV[8]
local wanted = {}
for s in string.gmatch(ARGV[5], '[^,]+') do wanted[s] = true end
local function older(index, id)
  local score = redis.call('ZSCORE', index, id)
  return score and tonumber(score) <= cutoff
end
local function unheld(at)
  local hour = tostring(math.floor(at / 3600))
  local n = tonumber(redis.call('HGET', KEYS[4], hour) or '0')
  if n > 0 then redis.call('HINCRBY', KEYS[4], hour, -1) end
end
local counts, kept, skipped = {}, 0, 0
for i = 1, #ARGV - 8 do
  local id = ARGV[8 + i]
  local rec, log = KEYS[4 * i + 1], KEYS[4 * i + 2]
  local res, msg = KEYS[4 * i + 3], KEYS[4 * i + 4]
  local gone, name, at = nil, false, nil
  if (skip >= 1 and older(KEYS[1], id)) or
      (skip >= 2 and older(KEYS[2], id)) then
    skipped = skipped + 1
  else
    local state = redis.call('HGET', rec, 'state')
    if state then
      if wanted[state] then
        at = tonumber(redis.call('HGET', rec, 'finished') or '') or
             tonumber(redis.call('HGET', rec, 'updated') or '')
        if at and at <= cutoff then
          gone, name = state, redis.call('HGET', rec, 'name')
        end
      end
    elseif orphans and redis.call('EXISTS', rec) == 0 then
      local score = redis.call('ZSCORE', KEYS[2], id) or
                    redis.call('ZSCORE', KEYS[1], id)
      if not score and state_index ~= '' then
        for s in pairs(wanted) do
          score = score or redis.call('ZSCORE', state_index .. s, id)
        end
      end
      if score and tonumber(score) <= cutoff then
        gone, at = '', tonumber(score)
      end
    end
    if gone then
      if not dry then
        if at and redis.call('EXISTS', res) == 1 then unheld(at) end
        redis.call('DEL', rec, log, res, msg)
        if hash then redis.call('HDEL', KEYS[3], id) end
        redis.call('ZREM', KEYS[1], id)
        redis.call('ZREM', KEYS[2], id)
        if state_index ~= '' then
          -- An end state's index is named after it; without a record,
          -- which end is not known.
          if gone ~= '' then
            redis.call('ZREM', state_index .. gone, id)
          else
            for s in pairs(wanted) do
              redis.call('ZREM', state_index .. s, id)
            end
          end
        end
        if name_index ~= '' and name then
          redis.call('ZREM', name_index .. name, id)
        end
      end
      counts[gone] = (counts[gone] or 0) + 1
    else
      kept = kept + 1
    end
  end
end
local out = {kept, skipped}
for state, n in pairs(counts) do
  out[#out + 1] = state
  out[#out + 1] = n
end
return out
"""

# KEYS: the results-held count, then each id's record and Huey's result
# key.  ARGV: cutoff, dry run '1'/'0', now, seconds results live ([huey]
# result_timeout).  A result whose task has no record (it expired first,
# or the journal was off) goes when it was stored (read off its time to
# live) at or before the cutoff.  Returns {removed, kept}.
PURGE_RESULTS = r"""
local cutoff, dry = tonumber(ARGV[1]), ARGV[2] == '1'
local now, life = tonumber(ARGV[3]), tonumber(ARGV[4])
local removed, kept = 0, 0
for i = 1, (#KEYS - 1) / 2 do
  local rec, res = KEYS[2 * i], KEYS[2 * i + 1]
  local ttl = redis.call('PTTL', res)
  local at = ttl > 0 and now - life + ttl / 1000 or nil
  if redis.call('EXISTS', rec) == 0 and at and at <= cutoff then
    if not dry then
      local hour = tostring(math.floor(at / 3600))
      local n = tonumber(redis.call('HGET', KEYS[1], hour) or '0')
      if n > 0 then redis.call('HINCRBY', KEYS[1], hour, -1) end
      redis.call('DEL', res)
    end
    removed = removed + 1
  else
    kept = kept + 1
  end
end
return {removed, kept}
"""

_NUMBER = r'\d+(?:\.\d+)?'
_PART = re.compile('(%s)([smhdw])' % _NUMBER)
_UNITS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400, 'w': 7 * 86400}


def parse_duration(text):
    """Seconds (float) from '7d', '12h', '30m', '3600' (seconds), '1d12h',
    '1.5h' (units s m h d w).  ValueError naming what is wrong."""
    raw = (text or '').strip().lower()
    if re.fullmatch(_NUMBER, raw):
        return float(raw)
    if raw and re.fullmatch('(?:%s[smhdw])+' % _NUMBER, raw):
        return sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(raw))
    raise ValueError('%r is not a duration: a number of seconds, or numbers '
                     'with units s, m, h, d, w (7d, 12h, 30m, 1d12h)'
                     % (text,))


class Purge:
    """Removing the finished tasks of one queue (one storage) that ended
    before `cutoff` (epoch seconds), in the `states` (some of TERMINAL).
    run() returns the counts; with `dry_run` nothing is removed and the
    counts say what would be."""

    def __init__(self, storage, cutoff, states=TERMINAL, dry_run=False,
                 index_max=None, batch=BATCH):
        unknown = set(states) - TERMINAL
        if unknown or not states:
            raise ValueError('states must be some of %s, not %s' % (
                ', '.join(sorted(TERMINAL)), ', '.join(sorted(unknown))
                or 'none'))
        self.storage, self.cutoff = storage, float(cutoff)
        self.states = frozenset(states)
        self.dry_run, self.index_max = dry_run, index_max
        self.batch = max(1, int(batch))
        # Entries without a record are results whose state is unknown
        # (Huey's error or a value): removed only when every end state is.
        self.orphans = self.states == TERMINAL
        self.hash = getattr(storage, 'results_hash', None)
        self.script = storage.conn.register_script(PURGE)
        self.removed = {}
        self.kept = self.round_trips = 0
        # A dry run removes nothing, so a task found again by a later pass
        # (an id in several indexes) must not be counted twice.
        self._counted = set()

    def run(self):
        """{'removed': {state: n, '': entries without a record (results
        whose record expired first included)}, 'kept': older entries of
        the state indexes left (not ended, or another state), 'scanned':
        whether the records were SCANned too, 'round_trips': script
        calls}.  Raises redis-py's errors (a batch removed before stays
        removed: running it again goes on)."""
        keys = self.storage.keys
        conn = self.storage.conn
        indexes = [keys.journal_state(state) for state in sorted(self.states)]
        # Read before the passes remove anything: at the cap, records
        # older than the index's oldest entry may exist outside it.
        at_cap = self.index_max is not None and any(
            conn.zcard(index) >= self.index_max
            for index in indexes + [keys.journal_recent])
        for index in indexes:
            self._index_pass(index, skip=0, count_kept=True)
        # The first layout's indexes, until their entries have expired.
        self._index_pass(keys.journal_recent, skip=0)
        self._index_pass(keys.journal_results, skip=1)
        if at_cap:
            self._scan_pass()
        if self.orphans:
            self._results_pass()
        # Older tasks left because they have not ended, or ended otherwise.
        from .layout import INDEX_GROUPS
        pipe = conn.pipeline(transaction=False)
        for group in INDEX_GROUPS:
            if group not in self.states:
                pipe.zcount(keys.journal_state(group), '-inf', self.cutoff)
        self.kept += sum(pipe.execute())
        return {'removed': dict(self.removed), 'kept': self.kept,
                'scanned': at_cap, 'round_trips': self.round_trips}

    def _index_pass(self, index, skip, count_kept=False):
        offset = 0
        conn = self.storage.conn
        while True:
            ids = conn.zrangebyscore(index, '-inf', self.cutoff,
                                     start=offset, num=self.batch)
            if not ids:
                return
            ids, counted = self._fresh(ids)
            kept, skipped, removed = self._batch(ids, skip) if ids else \
                (0, 0, 0)
            if count_kept:
                self.kept += kept
            # What stays in the index is passed over next time; what went
            # no longer shifts the window (in a dry run it stays too).
            offset += counted + kept + skipped + (
                removed if self.dry_run else 0)

    def _scan_pass(self):
        prefix = self.storage.keys.task('')
        ids = []
        for key in self.storage.conn.scan_iter(match=_glob_escape(prefix) +
                                               '*', count=SCAN_COUNT):
            ids.append(key[len(prefix):] if isinstance(key, str) else
                       key[len(prefix.encode()):])
            if len(ids) >= self.batch:
                ids = self._fresh(ids)[0]
                if ids:
                    self._batch(ids, skip=2)
                ids = []
        ids = self._fresh(ids)[0]
        if ids:
            self._batch(ids, skip=2)

    def _fresh(self, ids):
        """(the ids a dry run has not looked at yet, how many it had);
        every id, outside a dry run."""
        ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
        if not self.dry_run:
            return ids, 0
        fresh = [i for i in ids if i not in self._counted]
        self._counted.update(fresh)
        return fresh, len(ids) - len(fresh)

    def _results_pass(self):
        """Huey's expiring result keys whose task has no record (it
        expired first: [journal] retention is the shorter), by a SCAN:
        removed when stored at or before the cutoff."""
        storage = self.storage
        if self.hash:
            return   # an adopted RedisHuey's results hash: no age to read
        prefix = storage.result_key('')
        prefix = prefix.decode() if isinstance(prefix, bytes) else prefix
        script = storage.conn.register_script(PURGE_RESULTS)
        life = getattr(storage, '_expire_time', None)
        if not life:
            return
        batch = []

        def send():
            argv_keys = [storage.keys.journal_held]
            for task_id in batch:
                argv_keys += [storage.keys.task(task_id),
                              storage.result_key(task_id)]
            removed, _ = script(keys=argv_keys, args=[
                repr(self.cutoff), '1' if self.dry_run else '0',
                repr(time.time()), life])
            self.round_trips += 1
            if removed:
                self.removed[''] = self.removed.get('', 0) + int(removed)
            batch.clear()
        for key in storage.conn.scan_iter(match=_glob_escape(prefix) + '*',
                                          count=SCAN_COUNT):
            task_id = key.decode('utf-8', 'replace') if isinstance(
                key, bytes) else key
            task_id = task_id[len(prefix):]
            if task_id.startswith(('r:', 'rt:')) or ':' in task_id:
                continue   # Huey's revoke marks and other keys of its own
            if self.dry_run and task_id in self._counted:
                continue
            batch.append(task_id)
            if len(batch) >= self.batch:
                send()
        if batch:
            send()

    def _batch(self, ids, skip):
        """One script call for `ids`: (kept, skipped, removed)."""
        storage, keys = self.storage, self.storage.keys
        ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
        argv_keys = [keys.journal_recent, keys.journal_results,
                     self.hash or keys.journal_results, keys.journal_held]
        for task_id in ids:
            argv_keys += [keys.task(task_id), keys.task_log(task_id),
                          storage.result_key(task_id), keys.message(task_id)]
        reply = self.script(keys=argv_keys, args=[
            repr(self.cutoff), '1' if self.dry_run else '0',
            '1' if self.orphans else '0', '1' if self.hash else '0',
            ','.join(sorted(self.states)), skip,
            keys.journal_state_prefix, keys.journal_name_prefix] + ids)
        self.round_trips += 1
        kept, skipped, pairs = int(reply[0]), int(reply[1]), reply[2:]
        removed = 0
        for state, count in zip(pairs[::2], pairs[1::2]):
            state = state.decode() if isinstance(state, bytes) else state
            self.removed[state] = self.removed.get(state, 0) + int(count)
            removed += int(count)
        return kept, skipped, removed


def _glob_escape(text):
    """`text` as a literal in a SCAN MATCH pattern (a queue name may hold
    * ? [ ] or \\)."""
    return re.sub(r'([*?\[\]\\])', r'\\\1', text)
