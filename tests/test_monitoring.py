"""The shipped monitoring (deploy/monitoring) against a real Prometheus
(Debian's prometheus package, installed by .ci/run): promtool checks the
rule files, a promtool unit test makes each alert fire on its condition
(and stay quiet without it), every Grafana panel's expression parses, and
a real Prometheus scraping a real status endpoint fed by a real consumer
answers every dashboard expression and fires an alert when the consumer
stops."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import urllib.parse
import urllib.request

import pytest

from conftest import ROOT
from ops_helpers import start_status_server, wait_for_state, wait_until

MONITORING = os.path.join(ROOT, 'deploy', 'monitoring')
ALERTS = os.path.join(MONITORING, 'alerts.yml')
RECORDING = os.path.join(MONITORING, 'recording.yml')
DASHBOARD = os.path.join(MONITORING, 'grafana-dashboard.json')
PROMTOOL = shutil.which('promtool')
PROMETHEUS = shutil.which('prometheus')
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason='promtool missing (apt-get install prometheus)')

# Dashboard expressions that a short live run cannot fill: the scheduler's
# slot age needs a leader that enqueued a periodic minute.
EMPTY_IN_A_SHORT_RUN = {'Last scheduler slot age'}


def promtool(*args, cwd=None):
    out = subprocess.run([PROMTOOL] + list(args), capture_output=True,
                         text=True, cwd=cwd, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def alert_names():
    with open(ALERTS) as fh:
        return re.findall(r'^\s*- alert: (\w+)\s*$', fh.read(), re.M)


def dashboard_targets(substitute=True):
    """[(panel title, expr)] of every panel, with Grafana's variables
    replaced by what they stand for."""
    with open(DASHBOARD) as fh:
        dash = json.load(fh)
    out = []
    for panel in dash['panels']:
        for target in panel.get('targets', ()):
            expr = target['expr']
            if substitute:
                expr = expr.replace('$__rate_interval', '1m').replace(
                    '"$queue"', '".*"')
            out.append((panel['title'], expr))
    return out


@needs_promtool
def test_rule_files_pass_promtool_check():
    out = promtool('check', 'rules', ALERTS, RECORDING)
    assert 'SUCCESS: %d rules found' % len(alert_names()) in out


# One promtool unit test per alert: its condition, and a quiet case.
S = 'job="hw", instance="a:8470", queue="q"'
UNIT_TESTS = {
    'HueyWorkerRedisDown': (
        ['huey_worker_redis_up{job="hw", instance="a:8470"} 1 0x5'],
        '4m', {'job': 'hw', 'severity': 'critical'}),
    'HueyWorkerStatusEndpointDown': (
        ['up{job="huey-worker", instance="a:8470"} 0x5'],
        '4m', {'job': 'huey-worker', 'instance': 'a:8470',
               'severity': 'warning'}),
    'HueyWorkerNoLiveConsumer': (
        ['huey_worker_consumers_live{%s} 1 0x5' % S],
        '4m', {'job': 'hw', 'queue': 'q', 'severity': 'critical'}),
    'HueyWorkerSchedulerWithoutLeader': (
        ['huey_worker_scheduler_leader{%s} 1 0x5' % S,
         'huey_worker_scheduler_last_slot_age_seconds{%s} 30+60x5' % S],
        '4m', {'job': 'hw', 'queue': 'q', 'severity': 'critical'}),
    'HueyWorkerSchedulerStalled': (
        ['huey_worker_scheduler_leader{%s} 1x8' % S,
         'huey_worker_scheduler_last_slot_age_seconds{%s} 30+60x8' % S],
        '7m', {'job': 'hw', 'queue': 'q', 'severity': 'warning'}),
    'HueyWorkerDeadLettersGrowing': (
        ['huey_worker_dead_letters{%s} 0x10 3 5 5' % S],
        '12m', {'job': 'hw', 'queue': 'q', 'severity': 'warning'}),
    'HueyWorkerQueueLatencyHigh': (
        ['huey_worker_queue_latency_seconds{%s} 0 400x8' % S],
        '7m', {'job': 'hw', 'queue': 'q', 'severity': 'warning'}),
    'HueyWorkerFailureRatioHigh': (
        ['huey_worker_tasks_total{%s, task="t", state="failed"} 0+6x30' % S,
         'huey_worker_tasks_total{%s, task="t", state="complete"} 0+6x30'
         % S],
        '25m', {'job': 'hw', 'queue': 'q', 'task': 't',
                'severity': 'warning'}),
    'HueyWorkerRedisNearMaxmemory': (
        ['huey_worker_redis_memory_used_bytes{job="hw", instance="a"} 95x9',
         'huey_worker_redis_memory_max_bytes{job="hw", instance="a"} 100x9'],
        '7m', {'job': 'hw', 'severity': 'warning'}),
    'HueyWorkerConsumerRestarting': (
        ['huey_worker_consumer_started_timestamp_seconds{%s, consumer="h:0"}'
         ' 100 100 200 300 400 400 400' % S],
        '6m', {'job': 'hw', 'instance': 'a:8470', 'queue': 'q',
               'consumer': 'h:0', 'severity': 'warning'}),
    'HueyWorkerWorkersRestarting': (
        ['huey_worker_worker_restarts_total{%s, consumer="h:0"}'
         ' 0 0 1 2 3 4 5' % S],
        '6m', {'job': 'hw', 'instance': 'a:8470', 'queue': 'q',
               'consumer': 'h:0', 'severity': 'warning'}),
}
# The same series, healthy: no alert.
QUIET = [
    'huey_worker_redis_up{job="hw", instance="a:8470"} 1x10',
    'huey_worker_consumers_live{%s} 2x10' % S,
    'huey_worker_scheduler_leader{%s} 1x10' % S,
    'huey_worker_scheduler_last_slot_age_seconds{%s} 30x10' % S,
    'huey_worker_dead_letters{%s} 4x10' % S,
    'huey_worker_queue_latency_seconds{%s} 20x10' % S,
    'huey_worker_tasks_total{%s, task="t", state="failed"} 0+1x10' % S,
    'huey_worker_tasks_total{%s, task="t", state="complete"} 0+9x10' % S,
    'huey_worker_redis_memory_used_bytes{job="hw", instance="a"} 50x10',
    'huey_worker_redis_memory_max_bytes{job="hw", instance="a"} 100x10',
    'huey_worker_consumer_started_timestamp_seconds{%s, consumer="h:0"} '
    '100x10' % S,
    'huey_worker_worker_restarts_total{%s, consumer="h:0"} 1x10' % S,
]


# What each alert's value reads as in its annotations, at UNIT_TESTS' times.
VALUES = {
    'HueyWorkerConsumerRestarting': '3',
    'HueyWorkerDeadLettersGrowing': '5',
    'HueyWorkerFailureRatioHigh': '50%',
    'HueyWorkerQueueLatencyHigh': '6m 40s',
    'HueyWorkerRedisNearMaxmemory': '95%',
    'HueyWorkerSchedulerStalled': '7m 30s',
    'HueyWorkerWorkersRestarting': '5',
}


def annotations(alert, labels):
    """The annotations alerts.yml gives `alert`, rendered for `labels` and
    the value VALUES says it has (as its template formats it)."""
    with open(ALERTS) as fh:
        text = fh.read()
    block = re.split(r'^\s*- alert: ', text, flags=re.M)
    block = [b for b in block if b.split()[0] == alert][0]
    out = {}
    for key, template in re.findall(r'^\s+(summary|description): "(.*)"$',
                                    block, re.M):
        template = template.replace('\\"', '"')
        template = re.sub(r'\{\{ \$labels\.(\w+) \}\}',
                          lambda m: labels[m.group(1)], template)
        out[key] = re.sub(r'\{\{ \$value[^}]*\}\}',
                          lambda m: VALUES[alert], template)
    assert set(out) == {'summary', 'description'}, alert
    return out


def series_yaml(lines):
    out = []
    for line in lines:
        name, values = line.rsplit('} ', 1)
        out.append({'series': name + '}', 'values': values})
    return out


@needs_promtool
def test_each_alert_fires_on_its_condition_and_only_then(tmp_path):
    assert sorted(UNIT_TESTS) == sorted(alert_names())
    tests = []
    for alert, (series, at, labels) in sorted(UNIT_TESTS.items()):
        tests.append({
            'interval': '1m', 'input_series': series_yaml(series),
            'alert_rule_test': [
                {'eval_time': at, 'alertname': alert,
                 'exp_alerts': [{'exp_labels': labels,
                                 'exp_annotations': annotations(
                                     alert, labels)}]}]})
    tests.append({
        'interval': '1m', 'input_series': series_yaml(QUIET),
        'alert_rule_test': [{'eval_time': '9m', 'alertname': alert,
                             'exp_alerts': []}
                            for alert in sorted(UNIT_TESTS)]})
    path = tmp_path / 'alerts_test.yml'
    path.write_text(json.dumps({
        'rule_files': [ALERTS, RECORDING], 'evaluation_interval': '1m',
        'tests': tests}))
    promtool('test', 'rules', str(path))


def test_dashboard_is_well_formed():
    with open(DASHBOARD) as fh:
        dash = json.load(fh)
    assert dash['uid'] and dash['title'] and dash['schemaVersion'] >= 30
    ids = [p['id'] for p in dash['panels']]
    assert len(ids) == len(set(ids))
    variables = {v['name'] for v in dash['templating']['list']}
    assert variables == {'datasource', 'queue'}
    for panel in dash['panels']:
        pos = panel['gridPos']
        assert 0 <= pos['x'] and pos['x'] + pos['w'] <= 24, panel['title']
        if panel['type'] == 'row':
            continue
        assert panel['targets'], panel['title']
        for target in panel['targets']:
            assert target['datasource']['uid'] == '${datasource}'
            # Every panel follows the queue chosen, but Redis's own.
            assert 'queue=~"$queue"' in target['expr'] or \
                'redis' in target['expr'], target['expr']
    # Panels do not overlap.
    cells = set()
    for panel in dash['panels']:
        pos = panel['gridPos']
        for x in range(pos['x'], pos['x'] + pos['w']):
            for y in range(pos['y'], pos['y'] + pos['h']):
                assert (x, y) not in cells, panel['title']
                cells.add((x, y))


@needs_promtool
def test_every_dashboard_expression_parses(tmp_path):
    # promtool parses PromQL when it checks rules: each expression as a
    # recording rule.
    rules = [{'record': 'dashboard:panel_%d' % i, 'expr': expr}
             for i, (_, expr) in enumerate(dashboard_targets())]
    path = tmp_path / 'dashboard_rules.yml'
    path.write_text(json.dumps({'groups': [{'name': 'dashboard',
                                                'rules': rules}]}))
    assert 'SUCCESS: %d rules' % len(rules) in promtool('check', 'rules',
                                                        str(path))


# --- a live Prometheus --------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def api(port, path, **params):
    url = 'http://127.0.0.1:%d/api/v1/%s?%s' % (
        port, path, urllib.parse.urlencode(params))
    with urllib.request.urlopen(url, timeout=10) as answer:
        body = json.load(answer)
    assert body['status'] == 'success', body
    return body['data']


def query(port, expr):
    return api(port, 'query', query=expr)['result']


@pytest.fixture
def prometheus(tmp_path):
    """start(status port) -> Prometheus's port: a real Prometheus scraping
    the endpoint every second with the shipped rules, their `for:` cut to
    a second so an alert fires within the test."""
    if PROMETHEUS is None:
        pytest.skip('prometheus missing (apt-get install prometheus)')
    procs = []

    def start(target_port):
        rules = []
        for source in (ALERTS, RECORDING):
            with open(source) as fh:
                text = re.sub(r'\bfor: \S+', 'for: 1s', fh.read())
            rules.append(tmp_path / os.path.basename(source))
            rules[-1].write_text(text)
        config = tmp_path / 'prometheus.yml'
        config.write_text(json.dumps({
            'global': {'scrape_interval': '1s', 'evaluation_interval': '1s'},
            'rule_files': [str(r) for r in rules],
            'scrape_configs': [{
                'job_name': 'huey-worker',
                'static_configs': [
                    {'targets': ['127.0.0.1:%d' % target_port]}]}]}))
        port = free_port()
        log = open(tmp_path / 'prometheus.log', 'wb')
        procs.append(subprocess.Popen(
            [PROMETHEUS, '--config.file=%s' % config,
             '--storage.tsdb.path=%s' % (tmp_path / 'tsdb'),
             '--web.listen-address=127.0.0.1:%d' % port],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

        def ready():
            try:
                with urllib.request.urlopen(
                        'http://127.0.0.1:%d/-/ready' % port, timeout=2):
                    return True
            except OSError:
                assert procs[-1].poll() is None, \
                    (tmp_path / 'prometheus.log').read_text()
                return None
        wait_until(ready, timeout=30, what='Prometheus ready')
        return port
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_live_prometheus_scrapes_the_suite_and_an_alert_fires(
        producer, base_env, start_daemon, prometheus):
    import sample_tasks
    env = dict(base_env, HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.3',
               HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT='2')
    consumer = start_daemon(['consumer', '--workers', '2'], env, 'consumer')
    _, status_port = start_status_server(start_daemon, env)
    consumer.wait_for_output('consumer ready')
    port = prometheus(status_port)
    wait_until(lambda: query(port, 'huey_worker_consumers_live') or None,
               timeout=30, what='the first scrape')

    def run(adds, booms):
        tasks = [sample_tasks.add(i, i) for i in range(adds)]
        failing = [sample_tasks.boom() for _ in range(booms)]
        for task in tasks:
            wait_for_state(producer, task.id, 'complete')
        for task in failing:
            wait_for_state(producer, task.id, 'failed')
    # A counter's first sample is no increase to Prometheus: the first
    # outcomes make the series, the next ones the rates.
    run(1, 1)
    wait_until(lambda: query(port, 'huey_worker_tasks_total{task='
                                   '"sample_tasks.boom"}') or None,
               timeout=30, what='the first outcomes scraped')
    run(4, 2)

    wait_until(lambda: query(port, 'huey_worker:task_failure_ratio:rate10m')
               or None, timeout=30, what='the recording rule evaluated')
    ratio = query(port, 'huey_worker:task_failure_ratio:rate10m'
                  '{task="sample_tasks.boom"}')
    assert float(ratio[0]['value'][1]) == 1.0
    live = query(port, 'huey_worker_consumers_live{queue="huey"}')
    assert [r['value'][1] for r in live] == ['1']
    empty = sorted({title for title, expr in dashboard_targets()
                    if not query(port, expr)})
    assert set(empty) == EMPTY_IN_A_SHORT_RUN, empty
    # The rules loaded and evaluate without error.
    groups = api(port, 'rules')['groups']
    rules = [r for g in groups for r in g['rules']]
    assert len([r for r in rules if r['type'] == 'alerting']) == \
        len(alert_names())
    assert all(r['health'] == 'ok' for r in rules), [
        (r['name'], r.get('lastError')) for r in rules]
    assert not [a for a in api(port, 'alerts')['alerts']
                if a['labels']['alertname'] == 'HueyWorkerNoLiveConsumer']

    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0

    def firing():
        return [a for a in api(port, 'alerts')['alerts']
                if a['labels']['alertname'] == 'HueyWorkerNoLiveConsumer'
                and a['state'] == 'firing'] or None
    alert = wait_until(firing, timeout=30, what='the alert firing')[0]
    assert alert['labels']['queue'] == 'huey'
    assert alert['labels']['severity'] == 'critical'


def test_make_install_puts_the_monitoring_files_in_datadir(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'install', os.path.join(ROOT, 'deploy', 'install.py'))
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    layout = install.Layout(str(tmp_path), prefix='/opt/hw')
    installer = install.Installer(layout, quiet=True)
    installer.ensure_docs()
    texts = install.render_all(layout)
    for path, text in texts.items():
        if path.startswith(layout.monitoringdir):
            installer.ensure_file(path, text)
    where = tmp_path / 'opt/hw/share/huey-worker/monitoring'
    assert sorted(os.listdir(where)) == [
        'alerts.yml', 'grafana-dashboard.json',
        'prometheus-scrape.example.yml', 'recording.yml']
    with open(ALERTS, 'rb') as fh:
        assert (where / 'alerts.yml').read_bytes() == fh.read()
    example = (where / 'prometheus-scrape.example.yml').read_text()
    # The rule files at the paths of this install; DESTDIR in no file.
    assert '/opt/hw/share/huey-worker/monitoring/alerts.yml' in example
    assert str(tmp_path) not in example and '@' not in example
    removed = installer.uninstall()
    assert not os.path.exists(where / 'alerts.yml')
    assert str(where / 'prometheus-scrape.example.yml') in removed
