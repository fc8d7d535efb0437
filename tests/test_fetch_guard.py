"""The fetch guard of collect.urls, collect.pages and pdf.extract: which
addresses a URL, or a redirect, may lead to ([collect] allow_networks).

Real sockets and real local servers throughout: 127.0.0.1 (refused by
default, like the status endpoint and Redis it stands for), 127.0.0.2 (the
"outside site" a test allows), ::1.  Names are resolved in-process by a
stand-in for socket.getaddrinfo where a test needs a name to point at a
given address; `localhost` goes through the machine's real resolver."""
import ipaddress
import logging
import os
import socket

import pytest

from huey_worker import config
from huey_worker.config import ConfigError
from huey_worker.tasks import collect, pdf
from huey_worker.tasks.collect import collect_pages, collect_urls
from huey_worker.tasks.http import Fetcher, FetchError, HttpSettings
from huey_worker.tasks.netguard import AddressPolicy, AddressRefused, \
    parse_networks
from huey_worker.tasks.pdf import extract_pdf
from huey_worker.tasks.runtime import TaskRejected, TaskRun
from misbehaving_http import Server
from task_helpers import Progress, make_cfg, wait_terminal

SETTING = '[collect] allow_networks'
PROXY_VARS = ('http_proxy', 'https_proxy', 'all_proxy', 'no_proxy')


@pytest.fixture(autouse=True)
def no_proxy_from_the_machine(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def serve(host='127.0.0.1', port=0):
    return Server(host, port).start()


@pytest.fixture
def inside():
    """What the guard protects: a server on 127.0.0.1."""
    server = serve()
    yield server
    server.stop()


@pytest.fixture
def outside():
    """A site the tests allow: a server on 127.0.0.2."""
    server = serve('127.0.0.2')
    yield server
    server.stop()


def fetcher(*allow, **settings):
    settings.setdefault('retries', 3)
    settings.setdefault('retry_delay', 0.01)
    settings.setdefault('connect_timeout', 2)
    return Fetcher(HttpSettings(rate_limit=0, allow_networks=allow,
                                **settings))


class Resolver:
    """socket.getaddrinfo, except for the names given: name -> list of
    addresses, one list per lookup (the last one repeats)."""

    def __init__(self, monkeypatch, **names):
        self.answers = {name.replace('_', '.'): list(lists)
                        for name, lists in names.items()}
        self.lookups = []
        self._real = socket.getaddrinfo
        monkeypatch.setattr(socket, 'getaddrinfo', self.getaddrinfo)

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        if host not in self.answers:
            return self._real(host, port, family, type, proto, flags)
        self.lookups.append(host)
        lists = self.answers[host]
        addresses = lists.pop(0) if len(lists) > 1 else lists[0]
        out = []
        for address in addresses:
            if ':' in address:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, '',
                            (address, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, '',
                            (address, port)))
        return out


# -- the policy --------------------------------------------------------------

@pytest.mark.parametrize('address, kind', [
    ('127.0.0.1', 'a loopback address'),
    ('127.255.0.9', 'a loopback address'),
    ('10.1.2.3', 'a private address'),
    ('172.16.0.1', 'a private address'),
    ('172.31.255.255', 'a private address'),
    ('192.168.1.20', 'a private address'),
    ('100.64.0.1', 'a private (carrier-grade NAT) address'),
    ('169.254.169.254', 'a link-local address (cloud metadata lives there)'),
    ('0.0.0.0', 'an unspecified address'),
    ('224.0.0.251', 'a multicast address'),
    ('255.255.255.255', 'a reserved address'),
    ('::1', 'a loopback address'),
    ('::', 'an unspecified address'),
    ('fe80::1%eth0', 'a link-local address'),
    ('fd12:3456::1', 'a unique-local address'),
    ('ff02::1', 'a multicast address'),
    ('::ffff:127.0.0.1', 'a loopback address'),         # IPv4-mapped
    ('::ffff:169.254.169.254', 'a link-local address (cloud metadata '
                               'lives there)'),
    ('64:ff9b::10.0.0.1', 'a private address'),          # NAT64
    ('2002:a9fe:a9fe::1', 'a link-local address (cloud metadata lives '
                          'there)'),                     # 6to4
])
def test_special_addresses_are_refused_by_default(address, kind):
    shown, found = AddressPolicy().refusal(address)
    assert found == kind
    assert shown.split()[0] == str(ipaddress.ip_address(
        address.split('%')[0]))


@pytest.mark.parametrize('address', [
    '93.184.215.14', '8.8.8.8', '172.32.0.1', '100.128.0.1', '2606:4700::1',
    '::ffff:8.8.8.8', '64:ff9b::8.8.8.8', '2002:0808:0808::1'])
def test_public_addresses_pass(address):
    assert AddressPolicy().refusal(address) is None


def test_allow_networks_opt_in_to_named_networks_only():
    policy = AddressPolicy(parse_networks(['10.0.0.0/8', '192.168.1.0/24',
                                           '::1']))
    for allowed in ('10.0.0.1', '10.255.255.255', '192.168.1.7', '::1',
                    '::ffff:10.1.2.3'):
        assert policy.refusal(allowed) is None, allowed
    for refused in ('192.168.2.7', '127.0.0.1', '169.254.169.254',
                    'fd00::1', '::ffff:127.0.0.1'):
        assert policy.refusal(refused) is not None, refused


def test_allow_networks_is_validated_with_a_clear_error(tmp_path):
    ini = tmp_path / 'huey-worker.ini'
    ini.write_text('[collect]\nallow_networks = 10.0.0.0/8, 192.168.1.1/24\n')
    with pytest.raises(ConfigError) as error:
        config.load(str(ini), environ={})
    text = str(error.value)
    assert '[collect] allow_networks' in text and str(ini) in text
    assert "'192.168.1.1/24'" in text and 'did you mean 192.168.1.0/24' \
        in text
    with pytest.raises(ConfigError, match='CIDR form'):
        config.load(str(ini), environ={}, overrides={
            'collect.allow_networks': 'intranet'})
    with pytest.raises(ConfigError, match='CIDR form'):
        config.load(str(ini), environ={
            'HUEY_WORKER_COLLECT_ALLOW_NETWORKS': '10.0.0.0/33'})
    ini.write_text('[collect]\nallow_networks = 10.0.0.0/8,\n'
                   '  fd00::/8, 203.0.113.9\n')
    cfg = config.load(str(ini), environ={})
    assert cfg.collect.allow_networks == ('10.0.0.0/8', 'fd00::/8',
                                          '203.0.113.9/32')
    ini.write_text('')
    assert config.load(str(ini), environ={}).collect.allow_networks == ()


# -- real connections --------------------------------------------------------

@pytest.mark.parametrize('scheme', ['http', 'https'])
def test_a_loopback_url_is_refused_before_connecting(scheme):
    # A bare listening socket: a connection would wait in its backlog.
    with socket.socket() as listener:
        listener.bind(('127.0.0.1', 0))
        listener.listen(8)
        url = '%s://127.0.0.1:%d/health' % (scheme,
                                            listener.getsockname()[1])
        with fetcher() as f, pytest.raises(AddressRefused) as refused:
            f.fetch_bytes(url)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()          # nobody ever connected
    assert str(refused.value) == (
        'refused %s: 127.0.0.1 is a loopback address; to allow it, add its '
        'network to %s' % (url, SETTING))
    assert isinstance(refused.value, TaskRejected)


def test_an_allowed_network_is_reached(inside):
    with fetcher('127.0.0.0/8') as f:
        assert f.fetch_bytes(inside.url('/ok/x?size=5')).body == b'/ok/x'
    with fetcher('10.0.0.0/8', '127.0.0.1/32') as f:
        assert f.fetch_bytes(inside.url('/ok/y?size=5')).status == 200


def test_a_redirect_to_loopback_is_refused_on_that_hop(inside, outside):
    secret = inside.url('/ok/secret')
    start = outside.url('/redirect?to=' + secret)
    with fetcher('127.0.0.2/32') as f, pytest.raises(AddressRefused) as got:
        f.fetch_bytes(start)
    assert str(got.value) == (
        'refused %s (redirected to %s): 127.0.0.1 is a loopback address; to '
        'allow it, add its network to %s' % (start, secret, SETTING))
    assert inside.count('/ok/secret') == 0
    assert outside.count('/redirect') == 1          # not retried (retries=3)
    # The same redirect where both networks are allowed is followed.
    with fetcher('127.0.0.2/32', '127.0.0.1/32') as f:
        fetched = f.fetch_bytes(start)
    assert fetched.final_url == secret and inside.count('/ok/secret') == 1


def test_a_name_that_resolves_to_a_private_address(monkeypatch, inside):
    # Connecting to 10.20.30.40 would time out (connect_timeout 2 s, a
    # transient FetchError): a refusal shows no connection was tried.
    Resolver(monkeypatch, intranet_example=[['10.20.30.40']])
    with fetcher() as f, pytest.raises(AddressRefused) as got:
        f.fetch_bytes('http://intranet.example:8470/health')
    assert 'intranet.example resolves to 10.20.30.40, a private address' \
        in str(got.value)
    # One refused and one allowed address: only the allowed one is used.
    Resolver(monkeypatch, mixed_example=[['10.20.30.40', '127.0.0.1']])
    with fetcher('127.0.0.1/32') as f:
        url = 'http://mixed.example:%d/ok/mixed' % inside.port
        assert f.fetch_bytes(url).status == 200
    assert inside.count('/ok/mixed') == 1


def test_localhost_through_the_real_resolver_is_refused(inside):
    url = 'http://localhost:%d/ok/local' % inside.port
    with fetcher() as f, pytest.raises(AddressRefused) as got:
        f.fetch_bytes(url)
    assert 'localhost resolves to ' in str(got.value)
    assert 'a loopback address' in str(got.value)
    assert inside.count('/ok/local') == 0
    with fetcher('127.0.0.0/8', '::1') as f:   # ::1 first on some hosts
        assert f.fetch_bytes(url).status == 200


def test_a_name_that_resolves_twice_cannot_slip_through(monkeypatch):
    """DNS rebinding: the first answer allowed, the next one not.  The
    guard connects to the address it checked, without a second lookup."""
    for _ in range(20):     # two servers on one port, two addresses
        allowed = serve('127.0.0.2')
        try:
            refused = serve('127.0.0.1', allowed.port)
            break
        except OSError:
            allowed.stop()
    else:
        pytest.fail('no port free on both 127.0.0.1 and 127.0.0.2')
    url = 'http://rebind.example:%d/ok/data' % allowed.port
    try:
        resolver = Resolver(monkeypatch, rebind_example=[
            ['127.0.0.2'], ['127.0.0.1']])
        with fetcher('127.0.0.2/32') as f:
            assert f.fetch_bytes(url).status == 200
        assert allowed.count('/ok/data') == 1 and \
            refused.count('/ok/data') == 0
        assert resolver.lookups == ['rebind.example']
        # The other way round: refused, whatever a later lookup says.
        resolver = Resolver(monkeypatch, rebind_example=[
            ['127.0.0.1'], ['127.0.0.2']])
        with fetcher('127.0.0.2/32') as f, pytest.raises(AddressRefused):
            f.fetch_bytes(url)
        assert allowed.count('/ok/data') == 1 and \
            refused.count('/ok/data') == 0
    finally:
        allowed.stop()
        refused.stop()


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(('::1', 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason='no IPv6 loopback here')
def test_ipv6_loopback_and_ipv4_mapped_addresses(inside):
    six = serve('::1')
    try:
        with fetcher() as f, pytest.raises(AddressRefused,
                                           match='::1 is a loopback'):
            f.fetch_bytes(six.url('/ok/v6'))
        with fetcher('::1/128') as f:
            assert f.fetch_bytes(six.url('/ok/v6')).status == 200
    finally:
        six.stop()
    # 127.0.0.1 written as an IPv6 address is still 127.0.0.1.
    mapped = 'http://[::ffff:127.0.0.1]:%d/ok/mapped' % inside.port
    with fetcher() as f, pytest.raises(AddressRefused) as got:
        f.fetch_bytes(mapped)
    assert '(127.0.0.1) is a loopback address' in str(got.value)
    assert inside.count('/ok/mapped') == 0
    with fetcher('127.0.0.1/32') as f:
        assert f.fetch_bytes(mapped).status == 200


def test_through_a_proxy_the_target_name_is_checked(monkeypatch, inside):
    """The proxy (here: the test server, which answers requests in proxy
    form) is the operator's and is not checked; the target is, before
    anything is sent to the proxy."""
    monkeypatch.setenv('HTTP_PROXY', inside.base)
    Resolver(monkeypatch, public_example=[['93.184.215.14']],
             intranet_example=[['10.20.30.40']])
    with fetcher() as f:
        fetched = f.fetch_bytes('http://public.example/ok/via-proxy?size=8')
    assert fetched.status == 200
    assert inside.arrivals('http://public.example/ok/via-proxy')
    for target, shown in (('http://intranet.example/ok/no', '10.20.30.40'),
                          ('http://169.254.169.254/latest/meta-data/',
                           '169.254.169.254')):
        with fetcher() as f, pytest.raises(AddressRefused, match=shown):
            f.fetch_bytes(target)
    assert inside.count('/ok/no') == 0 and inside.count('/latest/') == 0


# -- in the tasks ------------------------------------------------------------

def test_collect_urls_fails_the_refused_items_only(tmp_path, inside, outside,
                                                   caplog):
    secret = inside.url('/ok/secret')
    urls = [outside.url('/ok/fine'), secret,
            outside.url('/redirect?to=' + secret)]
    run = TaskRun(make_cfg(tmp_path, collect__allow_networks='127.0.0.2'),
                  progress=Progress())
    with caplog.at_level(logging.WARNING, logger='huey_worker.tasks'):
        summary = collect_urls(run, urls)
    assert (summary['saved'], summary['failed']) == (1, 2)
    errors = {e['item']: e['error'] for e in summary['errors']}
    assert errors[secret].startswith('refused %s: 127.0.0.1 is a loopback'
                                     % secret)
    assert '(redirected to %s)' % secret in errors[urls[2]]
    assert inside.count('/ok/secret') == 0
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(SETTING in w for w in warnings)


def test_collect_pages_and_pdf_extract_are_rejected_not_retried(
        tmp_path, inside, producer):
    cfg = make_cfg(tmp_path)
    task = collect.pages.s(inside.url('/api/next'), retries=3)
    with pytest.raises(AddressRefused, match='127.0.0.1 is a loopback'):
        TaskRun(cfg, task, Progress()).run(collect_pages,
                                           inside.url('/api/next'))
    assert task.retries == 0
    task = pdf.extract.s(inside.url('/file/a.pdf'), retries=3)
    with pytest.raises(AddressRefused) as got:
        TaskRun(cfg, task, Progress()).run(extract_pdf,
                                           inside.url('/file/a.pdf'))
    assert task.retries == 0
    assert repr(got.value).startswith('AddressRefused: refused http://')
    assert inside.count('/api/next') == inside.count('/file/a.pdf') == 0
    downloads = os.path.join(cfg.pdf.output_root, '.downloads')
    assert os.listdir(downloads) == []


def test_transient_errors_are_still_fetch_errors(inside):
    # The guard changes nothing for an allowed address that fails.
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with fetcher('127.0.0.1', retries=0) as f, \
            pytest.raises(FetchError) as got:
        f.fetch_bytes('http://127.0.0.1:%d/' % port)
    assert got.value.transient and 'connection failed' in got.value.problem


@pytest.mark.parametrize('network', ['127.0.0.2/32', '127.0.0.2'])
def test_networks_parse_like_the_config(network):
    assert parse_networks([network]) == (
        ipaddress.ip_network('127.0.0.2/32'),)


# -- end to end --------------------------------------------------------------

def test_a_redirect_to_loopback_through_a_consumer(
        tmp_path, inside, outside, base_env, start_daemon, producer):
    env = dict(base_env)
    env.update({
        'HUEY_WORKER_TASKS_BUILTIN': 'true',
        'HUEY_WORKER_COLLECT_OUTPUT_ROOT': str(tmp_path / 'collected'),
        'HUEY_WORKER_PDF_OUTPUT_ROOT': str(tmp_path / 'pdf'),
        'HUEY_WORKER_COLLECT_RATE_LIMIT': '0',
        'HUEY_WORKER_COLLECT_ALLOW_NETWORKS': '127.0.0.2/32',
        'HUEY_WORKERS': '2',
    })
    for name in PROXY_VARS:
        env.pop(name, None)
        env.pop(name.upper(), None)
    consumer = start_daemon(['consumer'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    target = inside.url('/api/next')
    start = outside.url('/redirect?to=' + target)
    result = collect.pages(start, retries=2, retry_delay=0)
    record = wait_terminal(producer, result.id)
    assert record['state'] == 'failed' and record['attempt'] == 1, record
    assert record['error']['type'] == 'AddressRefused'
    assert record['error']['message'] == (
        'refused %s (redirected to %s): 127.0.0.1 is a loopback address; to '
        'allow it, add its network to %s' % (start, target, SETTING))
    direct = pdf.extract(inside.url('/file/x.pdf'), retries=2)
    record = wait_terminal(producer, direct.id)
    assert record['state'] == 'failed' and record['attempt'] == 1, record
    assert record['error']['type'] == 'AddressRefused'
    # The first hop was made (its network is allowed); loopback never saw
    # a request.
    assert outside.count('/redirect') == 1
    assert inside.count('/api/next') == inside.count('/file/x.pdf') == 0
    output = consumer.output()
    assert 'Traceback' not in output
    for task_id in (result.id, direct.id):
        lines = [line for line in output.splitlines() if task_id in line
                 and ' WARNING ' in line]
        assert len(lines) == 1 and 'AddressRefused: refused' in lines[0], \
            output


def test_the_daemon_units_deny_link_local(tmp_path):
    """The second wall: systemd's own firewall keeps the metadata address
    out of reach of every daemon, whatever allow_networks says."""
    from deploy_support import ROOT, temp_layout, write_rendered
    layout = temp_layout(str(tmp_path), bindir=os.path.join(ROOT, 'bin'))
    files = write_rendered(layout)
    for unit in ('huey-worker-consumer.service',
                 'huey-worker-scheduler.service',
                 'huey-worker-status.service', 'huey-worker@.service'):
        lines = files[os.path.join(layout.unitdir, unit)].splitlines()
        assert 'IPAddressDeny=link-local' in lines, unit
