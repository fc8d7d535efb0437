"""Issue 17, finding any task: by state, task name and time window, newest
first, paged with a cursor, over every record still in retention.  An old
pending task behind more than 5,000 newer records (which the recent index
scan of before never reached) is found.  Real Redis, the status endpoint
and the CLI."""
import json
import time

import pytest

from ops_helpers import Client, cli, start_status_server

MANY = 6000


@pytest.fixture
def env(base_env):
    return dict(base_env, HUEY_MODULES='sample_tasks,actions_tasks')


def test_find_and_page_over_more_than_5000_records(producer, env,
                                                   start_daemon):
    import datetime
    import actions_tasks as t
    from huey_worker import actions
    storage = producer.storage
    old = t.note('/dev/null', 'old').id
    # MANY tasks filed in the schedule, then purged: MANY records newer
    # than the pending one, all ended revoked.
    eta = datetime.datetime.utcnow() + datetime.timedelta(hours=1)
    pipe = storage.conn.pipeline(transaction=False)
    for i in range(MANY):
        task = t.quick.s(i)
        pipe.zadd(storage.schedule_key, {producer.serialize_task(task): 1})
    pipe.execute()
    before = time.time()
    assert actions.purge_schedule(storage, actions.Actor.cli()) == MANY
    after = time.time()
    recent = storage.conn.zrevrange(storage.keys.journal_recent, 0, 4999)
    assert len(recent) == 5000 and old.encode() not in recent

    _, port = start_status_server(start_daemon, env)
    client = Client(port)
    status, body = client.get('/tasks?state=pending')
    assert status == 200 and [x['id'] for x in body['tasks']] == [old], body
    run = cli(env, 'find', '--state', 'pending', '--json')
    assert run.returncode == 0, run.stderr
    assert [x['id'] for x in json.loads(run.stdout)['tasks']] == [old]
    run = cli(env, 'find', '--name', 'note')
    assert run.returncode == 0 and old in run.stdout

    # Every record, newest first, exactly once, a page at a time.
    seen, cursor, pages = [], None, 0
    while True:
        query = '/tasks?limit=1000' + ('&cursor=%s' % cursor if cursor
                                       else '')
        status, body = client.get(query)
        assert status == 200, body
        seen += [(x['updated'], x['id']) for x in body['tasks']]
        pages += 1
        cursor = body['next_cursor']
        if not cursor:
            break
    assert len(seen) == MANY + 1 and len(set(seen)) == MANY + 1
    assert seen[-1][1] == old and pages >= 7
    assert [u for u, _ in seen] == sorted((u for u, _ in seen),
                                          reverse=True)

    # A state with a time window on when they finished.
    page = actions.find(producer, state='revoked', since=before, until=after,
                        field='finished', limit=1000)
    assert page['count'] == 1000 and page['next_cursor']
    assert actions.find(producer, state='revoked', until=before - 1,
                        field='finished')['tasks'] == []
    # Bad filters are a 400 / exit 65.
    assert client.get('/tasks?state=nosuch')[0] == 400
    assert client.get('/tasks?cursor=garbage')[0] == 400
    assert client.get('/tasks?since=yesterday')[0] == 400
    for endless in ('nan', 'inf', '-inf'):   # no moment in time
        assert client.get('/tasks?since=%s' % endless)[0] == 400, endless
        assert client.get('/tasks?until=%s' % endless)[0] == 400, endless
    assert cli(env, 'find', '--since', 'soon').returncode == 65
