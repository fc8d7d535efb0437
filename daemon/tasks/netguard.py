"""Which addresses the built-in fetch tasks may connect to.

URLs given to collect.urls, collect.pages and pdf.extract come from users
(a web page's, in the seeds), and so do the redirects of the sites they
name.  Without a guard such a URL reaches the status endpoint on
127.0.0.1, the machine's Redis, private networks and the cloud metadata
address 169.254.169.254.  So, by default, loopback, private, link-local,
unique-local, multicast, reserved and unspecified addresses are refused;
`[collect] allow_networks` opts in to named networks.

The check is made where the socket is connected, in a urllib3 connection
class of our own: the name is resolved once, each address is checked
before it is connected to, and the address actually connected
(getpeername) is checked again.  No second lookup takes place between the
check and the connect, so a name that answers differently the second time
(DNS rebinding) gains nothing; every redirect hop to another host opens a
connection of its own, and is checked the same way.

Through an HTTP(S) proxy (HTTP_PROXY, HTTPS_PROXY in the environment;
NO_PROXY honoured) the connection goes to the proxy, which the operator
chose and which is not checked; the target's name is resolved here and
refused if any of its addresses is refused.  The proxy resolves it again:
a name whose answer changes in between is for the proxy's own rules to
stop.
"""
import ipaddress
import socket
import sys
from urllib.parse import urlsplit

from requests.adapters import HTTPAdapter
from requests.utils import select_proxy
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, \
    NewConnectionError
from urllib3.util.connection import allowed_gai_family
from urllib3.util.timeout import _DEFAULT_TIMEOUT

from .runtime import InputRejected

SETTING = '[collect] allow_networks'

# First match names the kind.  Written out rather than taken from
# ipaddress's is_private & co., whose lists changed between Python patch
# releases.
_REFUSED = tuple((ipaddress.ip_network(net), kind) for net, kind in (
    ('0.0.0.0/8', 'an unspecified address'),
    ('127.0.0.0/8', 'a loopback address'),
    ('10.0.0.0/8', 'a private address'),
    ('172.16.0.0/12', 'a private address'),
    ('192.168.0.0/16', 'a private address'),
    ('100.64.0.0/10', 'a private (carrier-grade NAT) address'),
    ('169.254.0.0/16', 'a link-local address (cloud metadata lives there)'),
    ('192.0.0.0/24', 'a reserved (IETF protocol) address'),
    ('198.18.0.0/15', 'a private (benchmarking) address'),
    ('224.0.0.0/4', 'a multicast address'),
    ('240.0.0.0/4', 'a reserved address'),
    ('::/128', 'an unspecified address'),
    ('::1/128', 'a loopback address'),
    ('::/96', 'a reserved (IPv4-compatible) address'),
    ('100::/64', 'a reserved (discard-only) address'),
    ('64:ff9b:1::/48', 'a private (local NAT64) address'),
    ('fc00::/7', 'a unique-local address'),
    ('fe80::/10', 'a link-local address'),
    ('fec0::/10', 'a reserved (site-local) address'),
    ('ff00::/8', 'a multicast address'),
))

# IPv6 forms that carry an IPv4 address the packet ends up at.
_NAT64 = ipaddress.ip_network('64:ff9b::/96')


def parse_networks(words):
    """('10.0.0.0/8', '::1') -> tuple of ip_network (a bare address is a
    network of one).  The config has checked them already (settings.py,
    NetworkList); raises ValueError for a word that is not a network."""
    return tuple(ipaddress.ip_network(word.strip()) for word in words)


def embedded_ipv4(address):
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, NAT64,
    6to4), or None."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


class AddressPolicy:
    """Refuses the special-purpose addresses outside `allow_networks`
    (a sequence of ip_network)."""

    def __init__(self, allow_networks=()):
        self.allow_networks = tuple(allow_networks)

    def refusal(self, address):
        """(shown, kind) when `address` (text or ipaddress object) may not
        be connected to, e.g. ('127.0.0.1', 'a loopback address'); None
        when it may."""
        if isinstance(address, str):
            address = ipaddress.ip_address(address.split('%', 1)[0])
        inner = embedded_ipv4(address)
        for candidate in (address, inner):
            if candidate is not None and any(
                    candidate.version == net.version and candidate in net
                    for net in self.allow_networks):
                return None
        for candidate in (address, inner):
            if candidate is None:
                continue
            for net, kind in _REFUSED:
                if candidate.version == net.version and candidate in net:
                    if candidate is inner:
                        return '%s (%s)' % (address, inner), kind
                    return str(address), kind
        return None


class AddressRefused(InputRejected):
    """A URL led to an address the policy refuses.  The Fetcher fills in
    `url` (the one asked for) and `hop` (the redirect that led there)."""

    def __init__(self, host, address, kind):
        self.host, self.address, self.kind = host, address, kind
        self.url = self.hop = None
        super().__init__(host, address, kind)

    def __str__(self):
        where = self.url or self.host
        if self.hop and self.hop != self.url:
            where = '%s (redirected to %s)' % (self.url, self.hop)
        try:
            ipaddress.ip_address(self.host)
            what = '%s is %s' % (self.address, self.kind)
        except ValueError:
            what = '%s resolves to %s, %s' % (self.host, self.address,
                                               self.kind)
        return 'refused %s: %s; to allow it, add its network to %s' % (
            where, what, SETTING)


def guarded_connect(policy, host, port, timeout=_DEFAULT_TIMEOUT,
                    source_address=None, socket_options=None):
    """A socket connected to one of `host`'s addresses that `policy`
    allows, trying them in the resolver's order.  Raises AddressRefused
    when every address is refused, OSError (socket.gaierror, timeout...)
    when none could be reached."""
    host = host.strip('[]')
    refused, error = None, None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(
            host, port, allowed_gai_family(), socket.SOCK_STREAM):
        found = policy.refusal(sockaddr[0])
        if found is not None:
            refused = refused or found
            continue
        sock = socket.socket(family, kind, proto)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            if timeout is not _DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        # The address connected, not the one meant: what counts.
        found = policy.refusal(sock.getpeername()[0])
        if found is not None:
            sock.close()
            raise AddressRefused(host, *found)
        return sock
    if error is not None:
        raise error
    if refused is not None:
        raise AddressRefused(host, *refused)
    raise OSError('getaddrinfo returned no address for %s' % host)


class _GuardedConnection:
    """Mixed into urllib3's HTTP(S)Connection: connects through
    guarded_connect, with urllib3's own errors for the rest."""
    policy = AddressPolicy()

    def _new_conn(self):
        try:
            sock = guarded_connect(self.policy, self._dns_host, self.port,
                                   self.timeout, self.source_address,
                                   self.socket_options)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except socket.timeout as exc:
            raise ConnectTimeoutError(
                self, 'Connection to %s timed out. (connect timeout=%s)'
                % (self.host, self.timeout)) from exc
        except OSError as exc:
            raise NewConnectionError(
                self, 'Failed to establish a new connection: %s' % exc) \
                from exc
        sys.audit('http.client.connect', self, self.host, self.port)
        return sock


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose direct connections go through the policy;
    proxied requests have their target's name checked instead (see the
    module's docstring)."""

    def __init__(self, policy, **kwargs):
        self.policy = policy
        attrs = {'policy': policy}
        http = type('GuardedHTTPConnection',
                    (_GuardedConnection, HTTPConnection), attrs)
        https = type('GuardedHTTPSConnection',
                     (_GuardedConnection, HTTPSConnection), attrs)
        self._pool_classes = {
            'http': type('GuardedHTTPConnectionPool', (HTTPConnectionPool,),
                         {'ConnectionCls': http}),
            'https': type('GuardedHTTPSConnectionPool',
                          (HTTPSConnectionPool,), {'ConnectionCls': https}),
        }
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(self._pool_classes)

    def send(self, request, stream=False, timeout=None, verify=True,
             cert=None, proxies=None):
        if select_proxy(request.url, proxies):
            parts = urlsplit(request.url)
            check_name(self.policy, parts.hostname, parts.port or (
                443 if parts.scheme == 'https' else 80))
        return super().send(request, stream=stream, timeout=timeout,
                            verify=verify, cert=cert, proxies=proxies)


def check_name(policy, host, port):
    """Raise AddressRefused if any address `host` resolves to is refused
    (for a proxied request, which the proxy connects).  A name that does
    not resolve here is left to the proxy."""
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except OSError:
        return
    for info in infos:
        found = policy.refusal(info[4][0])
        if found is not None:
            raise AddressRefused(host, *found)
