"""The status endpoint's routes: Request -> Response.  Everything here reads
through huey_worker.journal and huey_worker.overview, the same functions the CLI
uses; docs/status-endpoint.md describes each route."""
import functools
import hmac
import json
import logging
import re
import time
from urllib.parse import parse_qsl

import redis

from .. import actions, deadletters, journal, overview, tasknames
from ..storage import priority_text
from .httpserver import Response
from .console import INDEX_ROUTES as CONSOLE_ROUTES, Console
from .metrics import render_metrics

log = logging.getLogger('huey_worker.status')

TASK_ID = r'(?P<id>[A-Za-z0-9_.:@+-]{1,200})'
REDIS_ERRORS = (redis.exceptions.RedisError, OSError)
SUBMIT_KEYS = frozenset(('task', 'name', 'args', 'kwargs', 'delay', 'id',
                         'priority'))
# Deeper JSON would reach Python's recursion limit in the parser, pickle or
# the journal's summary of the arguments: a 500 for bad input.
MAX_JSON_DEPTH = 100


class BadRequest(Exception):
    def __init__(self, status, detail, **extra):
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


class Routes:
    """Resolves a request in the server's loop: answers at once what needs
    no Redis (liveness, the index, unknown routes, refused methods and
    tokens), and returns the rest as work for a handler thread.

    `exposed`: the server listens beyond loopback; then every route but
    GET /health/live needs the token (the server refuses to start there
    without one), as the write routes always do."""

    def __init__(self, app, exposed=False):
        self.app = app
        self.exposed = exposed
        # (methods, pattern, handler, needs the token, answered at once)
        self.table = [
            (('GET',), r'/', self.index, False, True),
            (('GET',), r'/health', self.health, False, False),
            (('GET',), r'/health/live', self.live, False, True),
            (('GET',), r'/queue', self.queue, False, False),
            (('GET',), r'/workers', self.workers, False, False),
            (('GET',), r'/metrics', self.metrics, False, False),
            (('GET',), r'/tasks', self.list_tasks, False, False),
            (('GET',), r'/task-names', self.task_names, False, False),
            (('POST',), r'/tasks', self.submit, True, False),
            (('GET',), r'/tasks/' + TASK_ID, self.task, False, False),
            (('POST',), r'/tasks/' + TASK_ID + r'/revoke', self.revoke, True,
             False),
            # Operator actions (daemon/actions/): one task, or a selection.
            (('POST',), r'/tasks/' + TASK_ID + r'/retry', self.retry_task,
             True, False),
            (('POST',), r'/tasks/' + TASK_ID + r'/restore',
             self.restore_task, True, False),
            (('POST',), r'/tasks/retry', self.retry_many, True, False),
            (('POST',), r'/tasks/revoke', self.revoke_many, True, False),
            (('POST',), r'/tasks/restore', self.restore_many, True, False),
            (('POST',), r'/queue/purge', self.purge_queue, True, False),
            (('POST',), r'/tasks/' + TASK_ID + r'/cancel', self.cancel_task,
             True, False),
            (('POST',), r'/queue/pause', self.pause_queue, True, False),
            (('POST',), r'/queue/resume', self.resume_queue, True, False),
            (('GET',), r'/api/collect/task/' + TASK_ID, self.seed_task,
             False, False),
            (('GET',), r'/dead-letters', self.dead_letters, False, False),
            (('POST',), r'/dead-letters/requeue', self.requeue_dead, True,
             False),
            (('POST',), r'/dead-letters/purge', self.purge_dead, True, False),
        ]
        # The web console (daemon/status/console/): its page, assets and
        # the two JSON routes it adds.
        self.console = Console(self)
        self.table += self.console.table()
        self.table = [(frozenset(m), re.compile(p + r'\Z'), h, t, i)
                      for m, p, h, t, i in self.table]

    @property
    def token(self):
        return self.app.config.get('status.token')

    # -- dispatch -------------------------------------------------------------

    def __call__(self, request):
        """A Response, or a callable returning one (see HttpServer)."""
        method = request.method.upper()
        token = self.token
        allowed, found = set(), None
        for methods, pattern, handler, needs_token, at_once in self.table:
            if needs_token and not token:
                continue   # these routes exist only with a token configured
            match = pattern.match(request.path)
            if match is None:
                continue
            allowed.update(methods)
            if method in methods or (method == 'HEAD' and 'GET' in methods):
                found = (handler, match, needs_token, at_once)
        if found is None:
            if allowed:
                allow = sorted(allowed | ({'HEAD'} if 'GET' in allowed
                                          else set()))
                return Response.error(405, '%s is not allowed on %s' % (
                    method, request.path), [('Allow', ', '.join(allow))],
                    allowed=allow)
            return Response.error(404, 'no such route: %s' % request.path)
        handler, match, needs_token, at_once = found
        if self.exposed and handler != self.live and \
                handler not in self.console.open_handlers:
            needs_token = True
        if needs_token and not self._authorized(request, token):
            return Response.error(
                401, 'this route needs Authorization: Bearer <token> '
                     '([status] token)',
                [('WWW-Authenticate', 'Bearer realm="huey-worker"')])
        kwargs = match.groupdict()
        if at_once:
            return self._run(handler, request, kwargs)
        return functools.partial(self._run, handler, request, kwargs)

    def _run(self, handler, request, kwargs):
        try:
            return handler(request, **kwargs)
        except BadRequest as exc:
            return Response.error(exc.status, exc.detail, **exc.extra)
        except REDIS_ERRORS as exc:
            log.warning('Redis error answering %s %s: %s', request.method,
                        request.path, exc)
            return Response.error(503, 'Redis unavailable: %s' % exc,
                                  [('Retry-After', '5')])

    @staticmethod
    def _authorized(request, token):
        header = request.headers.get('authorization', '')
        scheme, _, given = header.partition(' ')
        if scheme.lower() != 'bearer' or not token:
            return False
        return hmac.compare_digest(given.strip().encode('utf-8', 'replace'),
                                   token.encode('utf-8'))

    @staticmethod
    def _query(request, allowed):
        try:
            pairs = parse_qsl(request.query, keep_blank_values=True,
                              strict_parsing=bool(request.query),
                              max_num_fields=20)
        except ValueError as exc:
            raise BadRequest(400, 'malformed query string: %s' % exc)
        out = {}
        for key, value in pairs:
            if key not in allowed:
                raise BadRequest(400, 'unknown query parameter %r (known: '
                                      '%s)' % (key, ', '.join(allowed) or
                                               'none'))
            if key in out:
                raise BadRequest(400, 'query parameter %r given twice' % key)
            out[key] = value
        return out

    # -- routes ---------------------------------------------------------------

    def index(self, request):
        self._query(request, ())
        routes = ['GET /health', 'GET /health/live', 'GET /queue',
                  'GET /workers', 'GET /metrics', 'GET /tasks',
                  'GET /task-names', 'GET /tasks/<id>',
                  'GET /api/collect/task/<id>', 'GET /dead-letters']
        if self.token:
            routes += ['POST /tasks', 'POST /tasks/<id>/revoke',
                       'POST /tasks/<id>/retry', 'POST /tasks/<id>/restore',
                       'POST /tasks/retry', 'POST /tasks/revoke',
                       'POST /tasks/restore', 'POST /queue/purge',
                       'POST /tasks/<id>/cancel', 'POST /queue/pause',
                       'POST /queue/resume',
                       'POST /dead-letters/requeue',
                       'POST /dead-letters/purge']
        routes += CONSOLE_ROUTES
        return Response.json(200, {'service': 'huey-worker status',
                                   'routes': routes})

    def live(self, request):
        self._query(request, ())
        return Response.json(200, {'status': 'ok', 'live': True})

    def health(self, request):
        self._query(request, ())
        healthy, body = overview.health_report(self.app)
        return Response.json(200 if healthy else 503, body)

    def queue(self, request):
        self._query(request, ())
        return Response.json(200, overview.queue_report(self.app))

    def workers(self, request):
        self._query(request, ())
        return Response.json(200, overview.workers_report(self.app))

    def task_names(self, request):
        # The registry of this endpoint's app: the [tasks] modules it
        # imported, as the consumers do with the same configuration.
        from ..cli.tasks_cmd import task_table
        self._query(request, ())
        return Response.json(200, task_table(self.app))

    def metrics(self, request):
        self._query(request, ())
        body, content_type = render_metrics(self.app)
        return Response(200, body, content_type)

    def list_tasks(self, request):
        params = self._query(request, ('state', 'limit', 'queue', 'name',
                                       'since', 'until', 'field', 'cursor'))
        try:
            limit = int(params.get('limit', '50'))
        except ValueError:
            raise BadRequest(400, 'limit must be a whole number')
        if not 1 <= limit <= 1000:
            raise BadRequest(400, 'limit must be from 1 to 1000')
        try:
            page = actions.find(
                self.app, queue=params.get('queue'),
                state=params.get('state') or None,
                name=params.get('name') or None,
                since=params.get('since') or None,
                until=params.get('until') or None,
                field=params.get('field') or 'updated', limit=limit,
                cursor=params.get('cursor') or None)
        except actions.ActionError as exc:
            raise BadRequest(exc.status, str(exc))
        return Response.json(200, page)

    def task(self, request, id):
        self._query(request, ())
        _, record = overview.find_task(self.app, id)
        if record is None:
            return Response.error(404, 'unknown task id %r (never enqueued,'
                                       ' or its record expired)' % id)
        return Response.json(200, record)

    def seed_task(self, request, id):
        """The shape seed 000's front end polls."""
        self._query(request, ())
        _, record = overview.find_task(self.app, id)
        if record is None:
            return Response.json(404, {
                'success': False, 'task_id': id, 'status': 'unknown',
                'result': None, 'metadata': {}, 'log': None,
                'error': 'unknown task id'})
        return Response.json(200, seed_shape(record))

    def submit(self, request):
        self._query(request, ())
        body = _json_body(request)
        if not isinstance(body, dict):
            raise BadRequest(400, 'expected a JSON object: {"task": NAME, '
                                  '"args": [...], "kwargs": {...}}')
        unknown = sorted(set(body) - SUBMIT_KEYS)
        if unknown:
            raise BadRequest(400, 'unknown field(s) %s (known: %s)' % (
                ', '.join(unknown), ', '.join(sorted(SUBMIT_KEYS))))
        name = body.get('task', body.get('name'))
        args = body.get('args', [])
        kwargs = body.get('kwargs', {})
        delay = body.get('delay')
        task_id = body.get('id')
        if not isinstance(name, str) or not name:
            raise BadRequest(400, '"task" must name a registered task')
        if not isinstance(args, list):
            raise BadRequest(400, '"args" must be a JSON list')
        if not isinstance(kwargs, dict):
            raise BadRequest(400, '"kwargs" must be a JSON object')
        if delay is not None and (isinstance(delay, bool) or not isinstance(
                delay, (int, float)) or not 0 <= delay <= 365 * 86400):
            raise BadRequest(400, '"delay" must be seconds from 0 to one '
                                  'year')
        if task_id is not None and (not isinstance(task_id, str) or not
                                    re.fullmatch(TASK_ID, task_id)):
            raise BadRequest(400, '"id" must be 1-200 characters of '
                                  'A-Z a-z 0-9 _ . : @ + -')
        priority = body.get('priority')
        if priority is not None:
            try:
                if isinstance(priority, bool):
                    raise ValueError('a task priority must be a finite '
                                     'number, not %r' % (priority,))
                priority_text(priority)
            except ValueError as exc:
                raise BadRequest(400, '"priority": %s' % exc)
        try:
            new_id, full = tasknames.submit(self.app, name, args, kwargs,
                                            delay=delay, task_id=task_id,
                                            priority=priority)
        except tasknames.UnknownTask as exc:
            raise BadRequest(404, str(exc), candidates=exc.candidates)
        except tasknames.AmbiguousTask as exc:
            raise BadRequest(400, str(exc), candidates=exc.candidates)
        state = 'scheduled' if delay else 'pending'
        return Response.json(202, {'task_id': new_id, 'task': full,
                                   'state': state,
                                   'href': '/tasks/%s' % new_id},
                             [('Location', '/tasks/%s' % new_id)])

    def revoke(self, request, id):
        self._query(request, ())
        if request.body.strip():
            _json_body(request)   # tolerated, but it must be JSON
        outcome = self._act(actions.revoke, request, id)
        return Response.json(200, {'task_id': id, 'revoked': True,
                                   'state': outcome.state,
                                   'already': outcome.already,
                                   'detail': 'the worker that takes it will '
                                             'skip it (state becomes '
                                             'revoked)'})

    # -- operator actions (daemon/actions/) -----------------------------------

    def _act(self, action, request, id):
        """Run `action` on task `id`: its Outcome, or the error answer
        (404 unknown, 409 refused, with the task's state and the reason)."""
        outcome = action(self.app, [id], actions.Actor.http(request.client))[0]
        if outcome.reason == 'unknown':
            raise BadRequest(404, 'unknown task id %r' % id)
        if not outcome.done:
            raise BadRequest(409, 'task %s is %s: %s' % (
                id, outcome.state, outcome.detail), state=outcome.state,
                reason=outcome.reason)
        return outcome

    def retry_task(self, request, id):
        self._query(request, ())
        if request.body.strip():
            _json_body(request)
        outcome = self._act(actions.retry, request, id)
        return Response.json(200, {'task_id': id, 'retried': True,
                                   'state': outcome.state,
                                   'href': '/tasks/%s' % id})

    def restore_task(self, request, id):
        self._query(request, ())
        if request.body.strip():
            _json_body(request)
        outcome = self._act(actions.restore, request, id)
        return Response.json(200, {'task_id': id, 'restored': True,
                                   'already': outcome.already,
                                   'state': outcome.state})

    def _selection(self, request, allowed):
        body = _json_body(request)
        if not isinstance(body, dict) or set(body) - set(allowed):
            raise BadRequest(400, 'expected a JSON object with %s' % (
                ', '.join('"%s"' % k for k in allowed)))
        ids = body.get('ids')
        if ids is not None and (not isinstance(ids, list) or not ids or
                                len(ids) > 1000 or not all(
                                    isinstance(i, str) and
                                    re.fullmatch(TASK_ID, i) for i in ids)):
            raise BadRequest(400, '"ids" must be a list of 1 to 1000 task '
                                  'ids')
        for key in ('name', 'state', 'field', 'queue'):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise BadRequest(400, '"%s" must be a string' % key)
        return body

    def retry_many(self, request):
        """Body {"ids": [...]} or a selection {"name", "state", "since",
        "until", "field", "limit", "queue"}."""
        self._query(request, ())
        body = self._selection(request, ('ids', 'name', 'state', 'since',
                                         'until', 'field', 'limit',
                                         'queue'))
        who = actions.Actor.http(request.client)
        try:
            if body.get('ids') is not None:
                if set(body) - {'ids', 'queue'}:
                    raise actions.ActionError('give "ids" or a selection '
                                              '(name, state, since, until), '
                                              'not both')
                outcomes = actions.retry(self.app, body['ids'], who,
                                         queue=body.get('queue'))
            else:
                outcomes = self._retry_selection(body, who)
        except actions.ActionError as exc:
            raise BadRequest(exc.status, str(exc))
        return Response.json(200, actions.summary(outcomes))

    def _retry_selection(self, body, who):
        storage = overview.storage_for(self.app, body.get('queue'))
        if storage is None:
            raise actions.ActionError('unknown queue %r' % body.get('queue'),
                                      404)
        limit = body.get('limit', 1000)
        if isinstance(limit, bool) or not isinstance(limit, int) or \
                not 1 <= limit <= actions.SELECT_MAX:
            raise actions.ActionError('"limit" must be a whole number from '
                                      '1 to %d' % actions.SELECT_MAX)
        field = body.get('field') or 'finished'
        if field not in journal.reads.WINDOW_FIELDS:
            raise actions.ActionError('unknown "field" %r (one of %s)' % (
                field, ', '.join(journal.reads.WINDOW_FIELDS)))
        try:
            since, until = (None if body.get(k) is None else
                            actions.parse_time(body[k])
                            for k in ('since', 'until'))
        except ValueError as exc:
            raise actions.ActionError(str(exc))
        name = body.get('name')
        if name:
            name = actions.resolve_name(self.app, storage, name)
        ids = actions.select_retryable(
            self.app, storage, name=name, state=body.get('state'),
            since=since, until=until, field=field, limit=limit)
        return [actions.retry_one(self.app, storage, i, who) for i in ids]

    def _by_name_or_ids(self, request, by_ids, by_name):
        self._query(request, ())
        body = self._selection(request, ('ids', 'name', 'queue'))
        who = actions.Actor.http(request.client)
        if (body.get('ids') is None) == (body.get('name') is None):
            raise BadRequest(400, 'give "ids" (a list of task ids) or "name" '
                                  '(a task name), not both nor neither')
        try:
            if body.get('ids') is not None:
                return actions.summary(by_ids(self.app, body['ids'], who,
                                              queue=body.get('queue')))
            return by_name(body['name'], who, body.get('queue'))
        except actions.ActionError as exc:
            raise BadRequest(exc.status, str(exc))

    def revoke_many(self, request):
        """Body {"ids": [...]} or {"name": TASK} (Huey's revoke_all)."""
        def by_name(name, who, queue):
            full, outcomes = actions.revoke_name(self.app, name, who, queue)
            return dict(actions.summary(outcomes), name=full,
                        name_revoked=True)
        return Response.json(200, self._by_name_or_ids(
            request, actions.revoke, by_name))

    def restore_many(self, request):
        """Body {"ids": [...]} or {"name": TASK} (Huey's restore_all)."""
        def by_name(name, who, queue):
            full, was, outcomes = actions.restore_name(self.app, name, who,
                                                       queue)
            return dict(actions.summary(outcomes), name=full,
                        name_was_revoked=was)
        return Response.json(200, self._by_name_or_ids(
            request, actions.restore, by_name))

    def purge_queue(self, request):
        """Body {"confirm": true, "queue": NAME, "schedule": false}."""
        self._query(request, ())
        body = _json_body(request)
        if not isinstance(body, dict) or \
                set(body) - {'confirm', 'queue', 'schedule'}:
            raise BadRequest(400, 'expected a JSON object with "confirm": '
                                  'true (and "queue", "schedule")')
        storage = self._dead_storage({'queue': body.get('queue')})
        schedule = body.get('schedule', False)
        if not isinstance(schedule, bool):
            raise BadRequest(400, '"schedule" must be true or false')
        what = 'schedule' if schedule else 'queue'
        if body.get('confirm') is not True:
            raise BadRequest(400, 'add "confirm": true to remove the %d '
                                  'task(s) in the %s of queue %s' % (
                                      actions.purge_size(storage, schedule),
                                      what, storage.name))
        who = actions.Actor.http(request.client)
        removed = (actions.purge_schedule if schedule else
                   actions.purge_queue)(storage, who)
        return Response.json(200, {'queue': storage.name, 'what': what,
                                   'purged': removed})

    def cancel_task(self, request, id):
        """A running task is stopped by its worker (202: requested, or 200
        when it ended canceled at once); a waiting one is revoked (200)."""
        self._query(request, ())
        if request.body.strip():
            _json_body(request)
        outcome = self._act(actions.cancel, request, id)
        return Response.json(
            202 if outcome.result == 'requested' else 200,
            {'task_id': id, 'result': outcome.result, 'state': outcome.state,
             'already': outcome.already,
             'detail': actions.cancel_results[outcome.result],
             'href': '/tasks/%s' % id})

    def _queue_action(self, request, allowed):
        self._query(request, ())
        body = _json_body(request) if request.body.strip() else {}
        if not isinstance(body, dict) or set(body) - set(allowed):
            raise BadRequest(400, 'expected a JSON object with %s (or no '
                                  'body)' % ', '.join('"%s"' % k
                                                      for k in allowed))
        for key in allowed:
            if body.get(key) is not None and not isinstance(body[key], str):
                raise BadRequest(400, '"%s" must be a string' % key)
        return body, actions.Actor.http(request.client)

    def pause_queue(self, request):
        """Body (optional) {"queue": NAME, "reason": TEXT}."""
        body, who = self._queue_action(request, ('queue', 'reason'))
        try:
            return Response.json(200, actions.pause(
                self.app, who, body.get('queue'), body.get('reason')))
        except actions.ActionError as exc:
            raise BadRequest(exc.status, str(exc))

    def resume_queue(self, request):
        """Body (optional) {"queue": NAME}."""
        body, who = self._queue_action(request, ('queue',))
        try:
            return Response.json(200, actions.resume(self.app, who,
                                                     body.get('queue')))
        except actions.ActionError as exc:
            raise BadRequest(exc.status, str(exc))

    # -- dead letters ---------------------------------------------------------

    def _dead_storage(self, params):
        storage = overview.storage_for(self.app, params.get('queue'))
        if storage is None:
            raise BadRequest(404, 'unknown queue %r' % params.get('queue'))
        return storage

    def dead_letters(self, request):
        params = self._query(request, ('limit', 'queue'))
        try:
            limit = int(params.get('limit', '100'))
        except ValueError:
            limit = -1
        if not 1 <= limit <= 1000:
            raise BadRequest(400, 'limit must be a whole number from 1 to '
                                  '1000')
        storage = self._dead_storage(params)
        return Response.json(200, {
            'queue': storage.name, 'count': deadletters.count(storage),
            'dead_letters': deadletters.list_records(storage, limit)})

    def _dead_selection(self, request):
        """Body {"ids": [record or task ids]} or {"all": true}."""
        body = _json_body(request)
        if not isinstance(body, dict) or set(body) - {'ids', 'all', 'queue'}:
            raise BadRequest(400, 'expected a JSON object with "ids" (a list '
                                  'of dead-letter or task ids) or "all": true')
        ids, select_all = body.get('ids'), body.get('all') is True
        if select_all == (ids is not None):
            raise BadRequest(400, 'give "ids" or "all": true, not both nor '
                                  'neither')
        if ids is not None and (not isinstance(ids, list) or not ids or not
                                all(isinstance(i, str) for i in ids)):
            raise BadRequest(400, '"ids" must be a non-empty list of strings')
        storage = self._dead_storage({'queue': body.get('queue')})
        return storage, None if select_all else set(ids)

    def requeue_dead(self, request):
        self._query(request, ())
        storage, selectors = self._dead_selection(request)
        records = deadletters.requeue(storage, selectors)
        return Response.json(200, {'requeued': len(records), 'ids': [
            r.get('id') for r in records]})

    def purge_dead(self, request):
        self._query(request, ())
        storage, selectors = self._dead_selection(request)
        return Response.json(200, {'purged': deadletters.purge(storage,
                                                                selectors)})


def _json_body(request):
    """The request's JSON body; BadRequest (400) when it is missing, not
    JSON, or nested deeper than MAX_JSON_DEPTH lists and objects."""
    if not request.body:
        raise BadRequest(400, 'expected a JSON body')
    too_deep = BadRequest(400, 'body nested deeper than %d levels of lists '
                               'and objects' % MAX_JSON_DEPTH)
    try:
        value = json.loads(request.body.decode('utf-8'))
    except RecursionError:
        raise too_deep
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(400, 'body is not valid JSON: %s' % exc)
    stack = [(value, 1)]   # a loop, not a recursion: depth is the point
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise too_deep
        stack.extend((child, depth + 1) for child in item)
    return value


def seed_shape(record):
    """{"success", "task_id", "status", "result", "metadata", "log"}."""
    prog = record.get('progress') or {}
    error = record.get('error') or {}
    message = prog.get('message') or error.get('message')
    metadata = record.get('metadata') or {}
    log_entry = dict(metadata)
    log_entry.update({
        'id': record['id'], 'log_type': record.get('name'),
        'status': record['state'], 'message': message,
        'current': prog.get('current'), 'total': prog.get('total'),
        'percent': prog.get('percent'),
        'started': record.get('started'), 'finished': record.get('finished'),
        'updated': record.get('updated') or time.time(),
        'error': error or None, 'history': record.get('history', [])})
    return {'success': True, 'task_id': record['id'],
            'status': record['state'], 'result': record.get('result'),
            'metadata': metadata, 'log': log_entry}
