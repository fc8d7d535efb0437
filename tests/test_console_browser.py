"""Issue 19, the web console in a real browser: Debian's chromium driven
by selenium through Debian's chromedriver (both at /usr/bin, installed by
.ci/run; selenium is given their paths, so its driver manager downloads
nothing).  A live suite -- the session's private Redis, a real consumer,
scheduler and status-server started as processes, real tasks -- and each
action clicked as an operator would: retry a failed task (signing in
first), revoke a scheduled one and restore it, requeue and purge dead
letters, purge a queue after its confirmation, cancel a running task,
pause and resume a queue, read a failed task's traceback; each effect is
checked in Redis and on the page.  Then the page with the status server's Redis
stopped: it says so and keeps working, and recovers when Redis is back.
And the tab hidden: the page stops polling, and polls again once shown.

Screenshots of each page go to $HUEY_TEST_SCREENSHOTS when it is set
(`HUEY_TEST_SCREENSHOTS=docs/console` refreshes the ones docs/console.md
shows), else to the test's temporary directory: a test run leaves the
tree as it was."""
import os
import re
import signal
import time

import pytest

from ops_helpers import (Client, start_status_server, task_record,
                         wait_for_state, wait_until)

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where screenshots go (see the module's docstring); None: a temp dir.
SHOTS = os.environ.get('HUEY_TEST_SCREENSHOTS')
CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
TOKEN = 'console-test-token-0123456789'

webdriver = pytest.importorskip('selenium.webdriver')
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException, StaleElementReferenceException)
from selenium.webdriver.common.by import By  # noqa: E402


@pytest.fixture
def browser(tmp_path):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip('%s missing: apt-get install chromium chromium-driver '
                        '(.ci/run does)' % path)
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage',
                '--disable-gpu', '--window-size=1360,1000',
                '--no-first-run', '--disable-extensions'):
        options.add_argument(arg)
    options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    driver.shots_dir = str(tmp_path / 'shots')   # unless SHOTS is set
    yield driver
    driver.quit()


class Page:
    """The console in `driver`, with waits that outlast its re-renders
    (a poll may replace an element between finding and using it)."""

    def __init__(self, driver, port):
        self.driver, self.base = driver, 'http://127.0.0.1:%d/console/' % port
        self.tmp = driver.shots_dir

    def open(self, hash_=''):
        self.driver.get(self.base + hash_)
        self.wait(lambda: self.driver.execute_script(
            'return document.body.dataset.polled'), 'a first poll')

    def wait(self, condition, what, timeout=30):
        def attempt():
            try:
                return condition()
            except (NoSuchElementException, StaleElementReferenceException):
                return None
        return wait_until(attempt, timeout, 0.1, what)

    def find(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self, css):
        return self.wait(lambda: self.find(css).text, css)

    def has_text(self, css, needle, timeout=30):
        return self.wait(lambda: needle in self.find(css).text,
                         '%r in %s (has %r)' % (needle, css,
                                                self._safe_text(css)),
                         timeout)

    def _safe_text(self, css):
        try:
            return self.find(css).text
        except Exception:
            return None

    def click(self, css):
        def attempt():
            element = self.find(css)
            if not element.is_displayed() or not element.is_enabled():
                return None
            element.click()
            return True
        self.wait(attempt, 'a click on %s' % css)

    def sign_in(self, token):
        self.wait(lambda: self.find('#signin-dialog').get_attribute('open')
                  is not None, 'the sign-in dialog')
        field = self.find('#token-input')
        field.clear()
        field.send_keys(token)
        self.click('#signin-submit')

    def confirm(self, needle=None):
        self.wait(lambda: self.find('#confirm-dialog').get_attribute('open')
                  is not None, 'the confirmation dialog')
        text = self.find('#confirm-text').text
        if needle is not None:
            assert needle in text, text
        self.click('#confirm-ok')
        return text

    def shot(self, name, at=None):
        """NAME.png of the window in SHOTS (or the test's temporary
        directory), scrolled to the top or to the element `at` (a CSS
        selector)."""
        shots = SHOTS or self.tmp
        os.makedirs(shots, exist_ok=True)
        if at is None:
            self.driver.execute_script('window.scrollTo(0, 0)')
        else:
            self.driver.execute_script(
                'document.querySelector(arguments[0]).scrollIntoView()', at)
        time.sleep(0.3)   # the chart's canvas paints on the next frame
        self.driver.save_screenshot(os.path.join(shots, name + '.png'))

    def errors(self):
        """The browser's script errors (a failed request's own log line
        aside: a 503 from Redis being down is no script error)."""
        return [e['message'] for e in self.driver.get_log('browser')
                if e['level'] == 'SEVERE' and
                'Failed to load resource' not in e['message']]


@pytest.fixture
def env(base_env, tmp_path):
    with open(base_env['HUEY_WORKER_CONFIG'], 'w') as fh:
        fh.write('[periodic:nightly-report]\ntask = sample_tasks.add\n'
                 'schedule = 30 2 * * *\nargs = [20, 22]\n')
    return dict(base_env, HUEY_MODULES='sample_tasks,actions_tasks',
                HUEY_STATUS_TOKEN=TOKEN,
                HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.5')


def test_each_page_and_action_in_a_browser(browser, env, producer,
                                           start_daemon, tmp_path):
    import actions_tasks
    import sample_tasks
    from huey_worker import deadletters
    storage = producer.storage
    conn = storage.conn
    # A consumer that knows only sample_tasks: actions_tasks' messages are
    # set aside as dead letters (unknown task), as after a bad deploy.
    narrow = dict(env, HUEY_MODULES='sample_tasks')
    consumer = start_daemon(['consumer', '--workers', '2'], narrow,
                            'consumer')
    consumer.wait_for_output('consumer ready')
    scheduler = start_daemon(['scheduler'], env, 'scheduler')
    scheduler.wait_for_output('periodic config:nightly-report')
    _, port = start_status_server(start_daemon, env)

    log = str(tmp_path / 'notes')
    dead_ids = [actions_tasks.note(log, 'requeued').id,
                actions_tasks.note(log, 'purged').id]
    done = [sample_tasks.add(i, i).id for i in range(6)]
    failed = sample_tasks.boom().id
    gate = str(tmp_path / 'gate')
    running = sample_tasks.progress_steps(10, gate).id
    scheduled = sample_tasks.add.schedule((1, 2), delay=3600).id
    for task_id in done:
        wait_for_state(producer, task_id, 'complete')
    wait_for_state(producer, failed, 'failed')
    for task_id in dead_ids:
        wait_for_state(producer, task_id, 'failed')
    wait_until(lambda: ((task_record(producer, running) or {}).get(
        'progress') or {}).get('percent') == 50.0, what='progress at 50%')

    page = Page(browser, port)

    # -- overview: Redis, queues, the graph, the scheduler, workers ----------
    page.open('')
    page.has_text('#redis-reachable', 'Redis reachable')
    page.has_text('#queue-table tr[data-queue="huey"]', 'huey')
    page.wait(lambda: page.find('#throughput-chart').get_attribute(
        'data-completed') == '6', 'six completed tasks in the graph')
    assert page.find('#throughput-chart').get_attribute('data-failed') == '3'
    assert page.find('#throughput-chart canvas') is not None
    page.has_text('#scheduler-state', 'Leader:')
    page.has_text('#scheduler-state', 'T02:30Z')
    busy = 'tr[data-task-id="%s"]' % running
    page.has_text('#consumers ' + busy, 'sample_tasks.progress_steps')
    page.wait(lambda: page.find('#consumers %s progress' % busy)
              .get_attribute('value') == '50', 'the worker\'s progress bar')
    page.shot('overview')

    # -- tasks: filters and the list ------------------------------------------
    page.open('#/tasks?state=failed')
    page.has_text('#task-table tr[data-task-id="%s"]' % failed,
                  'sample_tasks.boom')
    rows = browser.find_elements(By.CSS_SELECTOR, '#task-table tbody tr')
    assert {r.get_attribute('data-state') for r in rows} == {'failed'}
    page.open('#/tasks')
    page.has_text('#task-table', 'sample_tasks.progress_steps')
    page.shot('tasks')

    # -- a running task: its progress and history ----------------------------
    page.open('#/task/' + running)
    page.wait(lambda: page.find('#task-progress progress').get_attribute(
        'value') == '50', 'the task\'s progress bar')
    page.has_text('#task-progress', 'step 5 of 10')
    page.has_text('#task-history', 'running')
    page.shot('task-running')
    open(gate, 'w').close()
    wait_for_state(producer, running, 'complete')
    page.has_text('#task-state', 'complete')
    page.has_text('#task-result', '"steps": 10')

    # -- retry a failed task: signs in first ----------------------------------
    page.open('#/task/' + failed)
    page.has_text('#task-error', 'ValueError')
    page.has_text('#task-error', 'boom')
    page.click('#task-actions button[data-action="retry"]')
    page.sign_in(TOKEN)
    record = wait_until(lambda: (task_record(producer, failed) or {}).get(
        'retried') == 1 and task_record(producer, failed), what='the retry')
    record = wait_for_state(producer, failed, 'failed')
    assert record['attempt'] == 2
    assert 'retried' in [e['state'] for e in record['history']]
    page.has_text('#task-history', 'retried')
    page.has_text('#notice', 'Retried')
    page.shot('task-failed')

    # -- revoke a scheduled task, then restore it ----------------------------
    page.open('#/task/' + scheduled)
    page.has_text('#task-state', 'scheduled')
    page.click('#task-actions button[data-action="revoke"]')
    wait_for_state(producer, scheduled, 'revoked')
    page.has_text('#task-state', 'revoked')
    page.click('#task-actions button[data-action="restore"]')
    record = wait_until(lambda: (task_record(producer, scheduled) or {})
                        .get('state') not in (None, 'revoked') and
                        task_record(producer, scheduled), what='the restore')
    assert record['state'] == 'scheduled'
    page.has_text('#task-state', 'scheduled')
    assert not browser.find_elements(
        By.CSS_SELECTOR, '#task-actions button[data-action="restore"]')

    # -- dead letters: requeue one (now that a consumer knows the task) and
    # purge the other after its confirmation --------------------------------
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(30) == 0
    consumer = start_daemon(['consumer', '--workers', '2'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    assert deadletters.count(storage) == 2
    page.open('#/dead-letters')
    page.has_text('#dead-count', '2 dead letter(s)')
    requeue_row = 'tr[data-task-id="%s"]' % dead_ids[0]
    purge_row = 'tr[data-task-id="%s"]' % dead_ids[1]
    page.has_text(requeue_row, 'unknown-task')
    assert re.search(r'\d+ B', page.text(requeue_row + ' [data-field=size]'))
    page.shot('dead-letters')
    page.click(requeue_row + ' button[data-action="requeue"]')
    assert wait_for_state(producer, dead_ids[0], 'complete')['result'] == \
        'requeued'
    page.has_text('#dead-count', '1 dead letter(s)')
    page.click(purge_row + ' button[data-action="purge"]')
    page.confirm('Purge this dead letter?')
    wait_until(lambda: deadletters.count(storage) == 0,
               what='the dead letter purged')
    page.has_text('#dead-list', 'No dead letter.')
    assert open(log).read().split() == ['requeued']   # the purged never ran

    # -- periodic tasks -------------------------------------------------------
    page.open('#/periodic')
    page.has_text('tr[data-entry="config:nightly-report"]', '30 2 * * *')
    page.has_text('tr[data-entry="config:nightly-report"] [data-field=next]',
                  'T02:30Z')
    page.has_text('#periodic', 'Scheduler leader:')
    page.shot('periodic')

    # -- purge a queue: the confirmation says how many -----------------------
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(30) == 0
    waiting = [sample_tasks.add(i, 1).id for i in range(3)]
    page.open('')
    page.wait(lambda: page.find('#queue-table tr[data-queue="huey"] '
                                '[data-field=pending]').text == '3',
              'three pending on the overview')
    page.click('#queue-table button[data-action="purge-queue"]')
    page.confirm('3 task(s)')
    wait_until(lambda: storage.queue_size() == 0, what='the queue purged')
    for task_id in waiting:
        record = wait_for_state(producer, task_id, 'revoked')
        assert record['revoked_reason'] == 'purged'
    page.wait(lambda: page.find('#queue-table tr[data-queue="huey"] '
                                '[data-field=pending]').text == '0',
              'no pending task on the overview')
    page.has_text('#notice', 'Purged 3 task(s)')
    assert page.errors() == []
    assert conn.llen(storage.keys.dead) == 0


def test_a_wrong_token_is_refused_and_asked_again(browser, env, producer,
                                                   start_daemon):
    import sample_tasks
    _, port = start_status_server(start_daemon, env)
    task_id = sample_tasks.add.schedule((1, 1), delay=3600).id
    wait_for_state(producer, task_id, 'scheduled')
    page = Page(browser, port)
    page.open('#/task/' + task_id)
    page.click('#task-actions button[data-action="revoke"]')
    page.sign_in('not-the-token')
    page.has_text('#signin-why', 'refused')
    assert task_record(producer, task_id)['state'] == 'scheduled'
    assert browser.execute_script(
        "return sessionStorage.getItem('huey-worker.token')") is None
    page.sign_in(TOKEN)
    page.click('#task-actions button[data-action="revoke"]')
    wait_for_state(producer, task_id, 'revoked')
    # The token stays in this tab's sessionStorage, never in a cookie.
    assert browser.execute_script(
        "return sessionStorage.getItem('huey-worker.token')") == TOKEN
    assert browser.get_cookies() == []


def test_the_page_with_the_status_servers_redis_down(browser, base_env,
                                                      start_daemon, tmp_path):
    from huey_worker.devredis import EmbeddedRedis
    own = EmbeddedRedis(str(tmp_path / 'own-redis'))
    own.start()
    try:
        env = dict(base_env, HUEY_REDIS_URL=own.url)
        _, port = start_status_server(start_daemon, env)
        page = Page(browser, port)
        page.open('')
        page.has_text('#redis-reachable', 'Redis reachable')
        own.stop()
        page.has_text('#redis-reachable', 'Redis unreachable')
        assert page.find('#redis-reachable').get_attribute('data-ok') == '0'
        page.has_text('#banner', 'Redis unreachable')
        page.has_text('#health-status', 'unhealthy')
        # Still polling (the page did not break): the live state updates.
        before = page.find('body').get_attribute('data-polled')
        page.wait(lambda: page.find('body').get_attribute('data-polled') !=
                  before, 'another poll')
        page.shot('redis-down')
        for hash_ in ('#/tasks', '#/dead-letters', '#/periodic'):
            page.open(hash_)
            page.has_text('#banner', 'Redis unreachable')
        assert Client(port).get('/health/live')[0] == 200
        own.restart()
        page.open('')
        page.has_text('#redis-reachable', 'Redis reachable')
        page.wait(lambda: not page.find('#banner').is_displayed(),
                  'the banner gone')
        assert page.errors() == []
    finally:
        own.cleanup()


def test_cancel_pause_resume_and_a_traceback_in_a_browser(
        browser, env, producer, start_daemon):
    import sample_tasks
    conn = producer.storage.conn
    paused_key = 'hw:%s:paused' % producer.storage.name
    consumer = start_daemon(['consumer', '--workers', '2', '--worker-type',
                             'thread'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    _, port = start_status_server(start_daemon, env)
    failed = sample_tasks.boom().id
    # Reports progress in a loop, so its worker sees the cancel mark.
    running = sample_tasks.progress_steps(100000, pause=0.05).id
    wait_for_state(producer, failed, 'failed')
    wait_until(lambda: (task_record(producer, running) or {}).get(
        'progress'), what='the task reporting progress')
    page = Page(browser, port)

    # -- a failed task's traceback, as the journal keeps it ------------------
    page.open('#/task/' + failed)
    traceback = page.text('#task-error pre.traceback')
    assert traceback.startswith('Traceback (most recent call last):')
    assert 'in boom' in traceback
    assert traceback.rstrip().endswith('ValueError: boom')
    # Scrolled to its end, it stays there while the page polls on (a
    # re-render would put it back at its first line).
    tail = ('const pre = document.querySelector("#task-error pre");'
            'pre.scrollTop = pre.scrollHeight; return pre.scrollTop')
    scrolled = browser.execute_script(tail)
    assert scrolled > 0
    before = page.find('body').get_attribute('data-polled')
    page.wait(lambda: page.find('body').get_attribute('data-polled') !=
              before, 'another poll')
    assert browser.execute_script('return document.querySelector('
                                  '"#task-error pre").scrollTop') == scrolled
    page.shot('task-traceback', at='#task-error')

    # -- cancel the running task: confirm, sign in, it ends canceled ---------
    page.open('#/task/' + running)
    page.has_text('#task-state', 'running')
    page.click('#task-actions button[data-action="cancel"]')
    page.confirm('Cancel the running task %s?' % running)
    page.sign_in(TOKEN)
    record = wait_for_state(producer, running, 'canceled')
    assert 'canceled' in [e['state'] for e in record['history']]
    page.has_text('#task-state', 'canceled')
    page.has_text('#task-history', 'canceled')
    assert not browser.find_elements(
        By.CSS_SELECTOR, '#task-actions button[data-action="cancel"]')

    # -- pause the queue: what is enqueued then stays pending ----------------
    row = '#queue-table tr[data-queue="huey"]'
    page.open('')
    page.click(row + ' button[data-action="pause"]')
    wait_until(lambda: conn.exists(paused_key), what=paused_key)
    page.has_text(row + ' [data-field=paused]', 'paused')
    page.has_text('#notice', 'Queue huey paused.')
    consumer.wait_for_output('queue huey paused')
    held = sample_tasks.add(2, 3).id
    page.wait(lambda: page.find(row + ' [data-field=pending]').text == '1',
              'one pending on the overview')
    before = page.find('body').get_attribute('data-polled')
    page.wait(lambda: page.find('body').get_attribute('data-polled') !=
              before, 'another poll')
    assert page.find(row + ' [data-field=pending]').text == '1'
    assert task_record(producer, held)['state'] == 'pending'
    page.shot('overview-paused')

    # -- resume: it runs -----------------------------------------------------
    page.click(row + ' button[data-action="resume"]')
    assert wait_for_state(producer, held, 'complete')['result'] == 5
    assert not conn.exists(paused_key)
    page.has_text(row + ' [data-field=paused]', 'active')
    page.wait(lambda: page.find(row + ' [data-field=pending]').text == '0',
              'no pending task on the overview')
    assert page.errors() == []


# The console's poll period (POLL_MS in assets/app.js), in seconds.
POLL_S = 2.5

# Counts the page's requests (fetch is looked up at each call in api.js, so
# a wrapper installed after load sees them all) and lets the test say
# whether the tab is hidden: headless chromium reports every tab visible,
# so the test overrides what the console reads and sends the event it
# listens to, as the browser does when the tab goes to the background.
WATCH_FETCH_AND_VISIBILITY = '''
window.__fetched = [];
const fetch0 = window.fetch;
window.fetch = function (input, init) {
  window.__fetched.push(new URL(String(input), document.baseURI).pathname);
  return fetch0.apply(this, arguments);
};
window.__hidden = false;
Object.defineProperty(document, 'visibilityState', {configurable: true,
  get: () => (window.__hidden ? 'hidden' : 'visible')});
Object.defineProperty(document, 'hidden', {configurable: true,
  get: () => window.__hidden});
'''
# Hides or shows the tab; returns the paths fetched while the event was
# handled (synchronously, as a poll's requests all start at once).
SET_HIDDEN = '''
const before = window.__fetched.length;
window.__hidden = arguments[0];
document.dispatchEvent(new Event('visibilitychange'));
return window.__fetched.slice(before);
'''


def test_polling_pauses_while_the_tab_is_hidden(browser, env, start_daemon):
    _, port = start_status_server(start_daemon, env)
    page = Page(browser, port)
    page.open('')
    page.has_text('#redis-reachable', 'Redis reachable')
    browser.execute_script(WATCH_FETCH_AND_VISIBILITY)
    # Visible: it polls on, each poll fetching the overview's routes.
    page.wait(lambda: '/queue' in browser.execute_script(
        'return window.__fetched'), 'a poll while visible')

    assert browser.execute_script(SET_HIDDEN, True) == []
    page.wait(lambda: page.find('#live-state').get_attribute('data-kind') ==
              'paused', 'the live state paused')
    assert page.find('#live-state').text == 'paused (tab hidden)'
    # Every request of a poll starts when the poll does, so none started
    # from here on belongs to a poll begun before the tab was hidden.
    hidden_at = browser.execute_script('return window.__fetched.length')
    # Two poll periods and a margin: a console that ignored the tab's
    # visibility would poll at least twice in this window.
    time.sleep(2 * POLL_S + 1)
    assert browser.execute_script(
        'return window.__fetched.slice(arguments[0])', hidden_at) == []
    assert page.find('#live-state').text == 'paused (tab hidden)'

    # Visible again: a poll at once (in the event's handler), then on.
    fetched = browser.execute_script(SET_HIDDEN, False)
    assert {'/health', '/queue', '/workers', '/tasks', '/activity',
            '/periodic'} <= set(fetched), fetched
    shown_at = browser.execute_script('return window.__fetched.length')
    page.wait(lambda: browser.execute_script(
        'return window.__fetched.length') > shown_at,
        'the next poll after the tab is shown')
    page.wait(lambda: page.find('#live-state').get_attribute('data-kind') ==
              'live', 'the live state live again')
    assert page.errors() == []
