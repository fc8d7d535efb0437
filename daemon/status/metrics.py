"""GET /metrics: Prometheus text format through prometheus-client, from a
collector that reads Redis at scrape time.  Counters and the duration
histogram live in Redis (written by the journal with each outcome), so
they are right whatever the worker type and however many consumers run;
gauges come from Huey's keys and the consumers' heartbeats."""
import logging

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily,
                                    GaugeMetricFamily, HistogramMetricFamily)

from .. import journal, overview
from ..scheduler.periodic import parse_slot_name

log = logging.getLogger('huey_worker.status')


class SuiteCollector:
    def __init__(self, app):
        self.app = app

    def collect(self):
        up = GaugeMetricFamily('huey_worker_redis_up',
                               'Whether Redis answered this scrape.')
        try:
            families = list(self._families())
        except overview.REDIS_ERRORS as exc:
            log.warning('metrics: Redis unavailable: %s', exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self):
        tasks = CounterMetricFamily(
            'huey_worker_tasks', 'Task outcomes by task name and state.',
            labels=['queue', 'task', 'state'])
        durations = HistogramMetricFamily(
            'huey_worker_task_duration_seconds',
            'Run time of task bodies (complete, failed and retrying runs).',
            labels=['queue', 'task'])
        gauges = {name: GaugeMetricFamily('huey_worker_%s' % name, text,
                                          labels=['queue'])
                  for name, text in (
                      ('queue_pending', 'Messages waiting in the queue.'),
                      ('queue_scheduled', 'Tasks waiting for their eta '
                                          '(delayed and retry-delayed).'),
                      ('tasks_running', 'Tasks being run by live workers.'),
                      ('results_held', 'Task results held (journal index).'),
                      ('dead_letters', 'Messages in the dead-letter list.'),
                      ('consumers_live', 'Consumers with a fresh heartbeat.'),
                      ('scheduler_leader', '1 when a scheduler holds the '
                                           'leader lease.'))}
        leader_info = GaugeMetricFamily(
            'huey_worker_scheduler_leader_info',
            'The scheduler leader now (value 1; which one in the labels).',
            labels=['queue', 'leader', 'host', 'pid'])
        last_slot = GaugeMetricFamily(
            'huey_worker_scheduler_last_slot_timestamp_seconds',
            'Start of the last periodic minute the scheduler leader '
            'enqueued (Unix time).', labels=['queue'])
        workers = GaugeMetricFamily(
            'huey_worker_workers', 'Workers of live consumers by state.',
            labels=['queue', 'consumer', 'state'])
        restarts = CounterMetricFamily(
            'huey_worker_worker_restarts',
            'Workers restarted after dying, per live consumer (since the '
            'consumer started).', labels=['queue', 'consumer'])
        for name, storage in overview.queue_storages(self.app):
            snap = overview.snapshot(self.app, storage, counts=True,
                                     scheduler=True, metrics=True)
            for (task, state), count in sorted(snap['outcomes'].items()):
                tasks.add_metric([name, task, state], count)
            for task, stats in sorted(snap['durations'].items()):
                cumulative, running = [], 0
                for bound in journal.DURATION_BUCKETS:
                    running += stats['buckets'].get(bound, 0)
                    cumulative.append(('+Inf' if bound == float('inf')
                                       else repr(bound), running))
                durations.add_metric([name, task], cumulative,
                                     stats['sum'])
            q = overview.queue_entry(snap)
            gauges['queue_pending'].add_metric([name], q['pending'])
            gauges['queue_scheduled'].add_metric([name], q['scheduled'])
            gauges['tasks_running'].add_metric([name], q['running'])
            gauges['results_held'].add_metric([name], q['results_held'])
            gauges['dead_letters'].add_metric([name], q['dead_letters'])
            gauges['consumers_live'].add_metric([name], q['consumers'])
            scheduler = snap['scheduler']
            gauges['scheduler_leader'].add_metric(
                [name], 1 if scheduler['leader_present'] else 0)
            if scheduler['leader_present']:
                leader_info.add_metric([name, str(scheduler['leader']),
                                        str(scheduler['host'] or ''),
                                        str(scheduler['pid'] or '')], 1)
            slot = parse_slot_name(scheduler['last_slot'])
            if slot is not None:
                last_slot.add_metric([name], slot)
            for consumer in snap['consumers']:
                if not consumer['alive']:
                    continue
                ident = consumer['identity']
                workers.add_metric([name, ident, 'busy'], consumer['busy'])
                workers.add_metric([name, ident, 'idle'], consumer['idle'])
                restarts.add_metric([name, ident], consumer['restarts'])
        yield tasks
        yield durations
        yield from gauges.values()
        yield leader_info
        yield last_slot
        yield workers
        yield restarts


_registries = {}


def render_metrics(app):
    """(body bytes, content type)."""
    registry = _registries.get(id(app))
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SuiteCollector(app))
        _registries[id(app)] = registry
    return generate_latest(registry), CONTENT_TYPE_LATEST
