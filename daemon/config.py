"""Loading the configuration from its sources.

Precedence, lowest first: built-in default < main file < drop-ins in
conf.d/*.ini (name order) < environment < command line.  Every value keeps
the source it came from, so `huey-worker config` can say where it was set.
When none of them names a Redis, a running `make run` of this user lends
its private one (_use_running_dev_suite).
"""
import configparser
import difflib
import grp
import os
import pwd
import re
import stat
from dataclasses import dataclass, field

from . import settings as registry
from .settings import InvalidValue

DEFAULT_PATH = '/etc/huey-worker/huey-worker.ini'
CONFIG_ENV = 'HUEY_WORKER_CONFIG'
REDACTED = '********'
# A password= parameter of a Redis URL's query (redis-py reads it there too).
_QUERY_PASSWORD = re.compile(r'((?:^|&)[^=&]*password[^=&]*=)([^&]*)', re.I)


def redact_url(url):
    """`url` with the password it carries, in its user part
    (redis://user:PASSWORD@host) or its query (?password=PASSWORD), as
    ***; any other URL unchanged.  Text in, text out."""
    scheme, sep, rest = url.partition('://')
    # The last @ ends the user part, even with a ? or / left unencoded in
    # the password; unless that @ is in the query's values.
    creds, at, host = rest.rpartition('@')
    if at and '=' in host:
        before, qmark, query = rest.partition('?')
        creds, at, host = before.rpartition('@')
        host += qmark + query
    if at and ':' in creds:   # without a colon it is a user name only
        user = creds.partition(':')[0]
    else:
        user, host = None, rest
    host, qmark, query = host.partition('?')
    query = _QUERY_PASSWORD.sub(lambda m: m.group(1) + '***' if m.group(2)
                                else m.group(0), query)
    return scheme + sep + ('' if user is None else user + ':***@') + \
        host + qmark + query


def shown_value(setting, value):
    """`value` of `setting` as it may be printed or logged: a secret as
    REDACTED, a URL without its password."""
    if setting.secret and value:
        return REDACTED
    if isinstance(setting.type, registry.RedisUrl) and value:
        return redact_url(value)
    return value


def holds_secret(setting, value):
    """Whether `value` of `setting` is, or carries, a password or secret."""
    return bool(value) and (setting.secret or (
        isinstance(setting.type, registry.RedisUrl) and
        redact_url(value) != value))


class ConfigError(Exception):
    """A configuration problem; str() names what is wrong and where."""

    def __init__(self, problem, section=None, key=None, value=None,
                 path=None, line=None, origin=None):
        self.problem, self.section, self.key, self.value = \
            problem, section, key, value
        self.path, self.line, self.origin = path, line, origin
        super().__init__(self.describe())

    def describe(self):
        where = []
        if self.section is not None:
            where.append('[%s]' % self.section)
        if self.key is not None:
            where.append(self.key)
        text = ' '.join(where)
        if self.value is not None and self.key is not None:
            text += ' = %r' % self.value
        place = []
        if self.path:
            place.append('file: %s' % self.path)
            if self.line:
                place.append('line %d' % self.line)
        if self.origin:
            place.append(self.origin)
        if place:
            text = ('%s (%s)' % (text, ', '.join(place))).lstrip()
        return '%s: %s' % (text, self.problem) if text else self.problem


@dataclass
class Source:
    kind: str            # default, file, env, cli, run
    detail: str = ''     # path:line, variable name or flag

    def __str__(self):
        if self.kind in ('default', 'cli') and not self.detail:
            return self.kind
        if self.kind == 'env':
            return 'env %s' % self.detail
        if self.kind == 'cli':
            return 'cli %s' % self.detail
        return self.detail


@dataclass
class Config:
    values: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    periodic: dict = field(default_factory=dict)   # name -> {key: value}
    periodic_sources: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    path: str = DEFAULT_PATH

    def get(self, name):
        return self.values[name]

    def __getattr__(self, section):
        if section in registry.SECTIONS:
            return _SectionView(self, section)
        raise AttributeError(section)

    def source(self, name):
        return self.sources[name]

    def display_value(self, name):
        setting = registry.BY_NAME[name]
        value = self.values[name]
        if setting.secret and value:
            return REDACTED
        return setting.type.format(shown_value(setting, value))

    def as_dict(self, redact=True):
        out = {}
        for s in registry.SETTINGS:
            value = self.values[s.name]
            if redact:
                value = shown_value(s, value)
            out.setdefault(s.section, {})[s.key] = {
                'value': list(value) if isinstance(value, tuple) else value,
                'source': str(self.sources[s.name])}
        for name, keys in self.periodic.items():
            out['periodic:%s' % name] = {
                key: {'value': value,
                      'source': str(self.periodic_sources[name][key])}
                for key, value in keys.items()}
        return out


class _SectionView:
    def __init__(self, config, section):
        self._config, self._section = config, section

    def __getattr__(self, key):
        try:
            return self._config.values['%s.%s' % (self._section, key)]
        except KeyError:
            raise AttributeError('%s.%s' % (self._section, key))


def resolve_path(cli_path=None, environ=None):
    """The main file and whether it was named explicitly."""
    environ = os.environ if environ is None else environ
    if cli_path:
        return cli_path, True
    if environ.get(CONFIG_ENV):
        return environ[CONFIG_ENV], True
    return DEFAULT_PATH, False


def load(cli_path=None, environ=None, overrides=None):
    """Read every source and return a validated Config.

    `overrides` maps setting names ('consumer.workers') to raw text from the
    command line, or (name, flag) pairs in a list for better error messages.
    Raises ConfigError on the first problem found.
    """
    environ = os.environ if environ is None else environ
    path, explicit = resolve_path(cli_path, environ)
    config = Config(path=path)
    for s in registry.SETTINGS:
        config.values[s.name] = s.default
        config.sources[s.name] = Source('default')

    if explicit or _exists(path):
        _read_file(config, path)
    conf_d = os.path.join(os.path.dirname(os.path.abspath(path)), 'conf.d')
    for file_path in dropin_paths(conf_d):
        _read_file(config, file_path)

    _apply_environment(config, environ)
    for name, raw, flag in _normalize_overrides(overrides):
        setting = registry.BY_NAME.get(name)
        if setting is None:
            raise ConfigError('unknown setting %r%s' % (name, _did_you_mean(
                name, list(registry.BY_NAME))), origin=str(Source('cli')))
        config.sources[name] = Source('cli', flag)
        # Errors name the flag as `huey-worker config` shows its source.
        config.values[name] = _parse(setting, raw,
                                     origin=str(config.sources[name]))

    _use_running_dev_suite(config, environ)
    _check_consistency(config)
    return config


# Any of these set anywhere names a Redis; then a running `make run` is not
# looked for.
NAMES_A_REDIS = ('redis.url', 'redis.host', 'redis.port', 'redis.db',
                 'redis.username', 'redis.password', 'redis.sentinels')


def _use_running_dev_suite(config, environ):
    """With no Redis named anywhere, the private Redis of this user's
    running `huey-worker run` (make run), as its record says: the CLI next
    to `make run` reaches it with nothing set, instead of the machine's
    Redis on 6379.  A record whose `run` is gone is ignored."""
    if any(config.sources[name].kind != 'default' for name in NAMES_A_REDIS):
        return
    from .devredis import read_run_record
    record = read_run_record(environ)
    if record is None:
        return
    detail = 'make run (pid %d, file %s)' % (record['pid'], record['path'])
    config.values['redis.url'] = _parse(registry.BY_NAME['redis.url'],
                                        record['redis_url'], origin=detail)
    config.sources['redis.url'] = Source('run', detail)


def _normalize_overrides(overrides):
    if not overrides:
        return []
    items = overrides.items() if isinstance(overrides, dict) else overrides
    out = []
    for item in items:
        if len(item) == 2:
            name, raw = item
            flag = '--set %s=%s' % (name, raw)
        else:
            name, raw, flag = item
        out.append((name, raw, flag))
    return out


def _parse(setting, raw, path=None, line=None, origin=None):
    try:
        return setting.type.parse(raw)
    except InvalidValue as exc:
        shown = shown_value(setting, raw)
        raise ConfigError(str(exc), setting.section, setting.key, shown,
                          path=path, line=line, origin=origin)


_SECTION_RE = re.compile(r'^\s*\[([^\]]*)\]')
_KEY_RE = re.compile(r'^([^\s=:#;\[][^=:]*?)\s*[=:]')


def _line_numbers(text):
    """(section, key) -> line number, and section -> line number."""
    keys, sections, section = {}, {}, None
    for number, line in enumerate(text.splitlines(), 1):
        m = _SECTION_RE.match(line)
        if m:
            section = m.group(1).strip()
            sections.setdefault(section, number)
            continue
        m = _KEY_RE.match(line)
        if m and section is not None:
            keys.setdefault((section, m.group(1).strip().lower()), number)
    return keys, sections


def _exists(path):
    """Whether the default file is there.  Absent means the defaults; one
    this user may not even look at is an error, never silent defaults
    (os.path.exists() says False for both)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except PermissionError:
        raise ConfigError(_permission_denied(path), path=path)
    except OSError as exc:
        raise ConfigError('cannot read the file (%s)' % exc.strerror,
                          path=path)
    return True


def dropin_paths(conf_d):
    """conf.d/*.ini in name order; a conf.d this user may not list is an
    error, as drop-ins skipped unseen would be (glob() says nothing)."""
    try:
        names = os.listdir(conf_d)
    except FileNotFoundError:
        return []
    except PermissionError:
        raise ConfigError(_permission_denied(conf_d, os.R_OK | os.X_OK),
                          path=conf_d)
    except OSError as exc:
        raise ConfigError('cannot read the drop-in directory (%s)'
                          % exc.strerror, path=conf_d)
    return sorted(os.path.join(conf_d, name) for name in names
                  if name.endswith('.ini') and not name.startswith('.'))


def _permission_denied(path, need=os.R_OK):
    """The problem text for a file or directory this user may not read:
    which directory on the way (or the file itself) shuts them out, and
    how to get in."""
    path = os.path.abspath(path)
    blocker, wanted = path, need
    parents = []
    parent = os.path.dirname(path)
    while parent not in parents:
        parents.insert(0, parent)
        parent = os.path.dirname(parent)
    for parent in parents:
        if not _may(parent, os.X_OK):
            blocker, wanted = parent, os.X_OK
            break
    else:
        if _may(path, need):
            return 'permission denied'   # ACLs or a MAC policy: no advice
    try:
        st = os.stat(blocker)
    except OSError:
        return 'permission denied'
    user = _name(pwd.getpwuid, os.geteuid())
    group = _name(grp.getgrgid, st.st_gid)
    kind = 'directory' if stat.S_ISDIR(st.st_mode) else 'file'
    what = 'the %s%s (%04o %s:%s)' % (
        kind, '' if blocker == path else ' ' + blocker,
        stat.S_IMODE(st.st_mode), _name(pwd.getpwuid, st.st_uid), group)
    group_may = (st.st_mode >> 3) & wanted == wanted
    in_group = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    if st.st_gid == 0 or not group_may or in_group or \
            st.st_uid == os.geteuid():
        fix = 'run the command with sudo'
    else:
        # Usually the service's group, with the service user of that name.
        fix = 'add %s to the group %s (sudo usermod -aG %s %s, then log in ' \
              'again), or run the command ' % (user, group, group, user)
        fix += ('as sudo -u %s huey-worker ...' % group) \
            if _user_in_group(group, st.st_gid) else 'with sudo'
    return 'permission denied: %s is closed to user %s; %s' % (
        what, user, fix)


def _user_in_group(name, gid):
    try:
        return pwd.getpwnam(name).pw_gid == gid or \
            name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def _may(path, mode):
    return os.access(path, mode,
                     effective_ids=os.access in os.supports_effective_ids)


def _name(lookup, number):
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)


def _read_file(config, path):
    try:
        with open(path, encoding='utf-8') as fh:
            text = fh.read()
            mode = os.fstat(fh.fileno()).st_mode
    except FileNotFoundError:
        raise ConfigError('file not found', path=path)
    except IsADirectoryError:
        raise ConfigError('is a directory, expected an INI file', path=path)
    except PermissionError:
        raise ConfigError(_permission_denied(path), path=path)
    except UnicodeDecodeError as exc:
        raise ConfigError('not UTF-8 text (%s)' % exc.reason, path=path)
    except OSError as exc:
        raise ConfigError('cannot read the file (%s)' % exc.strerror,
                          path=path)

    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       empty_lines_in_values=False,
                                       default_section='\x00none')
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateSectionError as exc:
        raise ConfigError('section appears twice', exc.section, path=path,
                          line=exc.lineno)
    except configparser.DuplicateOptionError as exc:
        raise ConfigError('key appears twice in this section', exc.section,
                          exc.option, path=path, line=exc.lineno)
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError('a key before any [section] header', path=path,
                          line=exc.lineno)
    except configparser.ParsingError as exc:
        lineno = exc.errors[0][0] if exc.errors else None
        raise ConfigError('not INI syntax (expected [section] or key = '
                          'value)', path=path, line=lineno)

    lines, section_lines = _line_numbers(text)
    config.files.append(path)
    secret_found = False
    for section in parser.sections():
        family = registry.family_of(section)
        if family is not None:
            _read_family_section(config, parser, section, family, path, lines,
                                 section_lines)
            continue
        if section not in registry.SECTIONS:
            choices = list(registry.SECTIONS) + [
                '%s:NAME' % f.prefix for f in registry.SECTION_FAMILIES]
            raise ConfigError('unknown section%s' % _did_you_mean(
                section, choices, brackets=True), section, path=path,
                line=section_lines.get(section))
        for key, raw in parser.items(section):
            line = lines.get((section, key))
            setting = registry.lookup(section, key)
            if setting is None:
                known = [s.key for s in registry.SETTINGS
                         if s.section == section]
                raise ConfigError('unknown key%s' % _did_you_mean(key, known),
                                  section, key, path=path, line=line)
            value = _parse(setting, raw, path=path, line=line)
            config.values[setting.name] = value
            config.sources[setting.name] = Source(
                'file', '%s:%d' % (path, line) if line else path)
            if holds_secret(setting, value):
                secret_found = True
    if secret_found and mode & stat.S_IROTH:
        config.warnings.append(
            '%s holds a password or secret and is readable by all users; '
            'run: chmod o-r %s' % (path, path))


def _read_family_section(config, parser, section, family, path, lines,
                         section_lines):
    name = section.partition(':')[2].strip()
    values, sources = {}, {}
    for key, raw in parser.items(section):
        line = lines.get((section, key))
        setting = family.setting(key)
        if setting is None:
            raise ConfigError('unknown key%s' % _did_you_mean(
                key, [s.key for s in family.settings]), section, key,
                path=path, line=line)
        try:
            values[key] = setting.type.parse(raw)
        except InvalidValue as exc:
            raise ConfigError(str(exc), section, key, raw, path=path,
                              line=line)
        sources[key] = Source('file', '%s:%d' % (path, line))
    for setting in family.settings:
        if setting.key not in values:
            if setting.required:
                raise ConfigError('missing required key %r' % setting.key,
                                  section, path=path,
                                  line=section_lines.get(section))
            values[setting.key] = setting.default
            sources[setting.key] = Source('default')
    config.periodic[name] = values
    config.periodic_sources[name] = sources


def _apply_environment(config, environ):
    known = {CONFIG_ENV}
    for s in registry.SETTINGS:
        known.update(s.env_names)
        for env_name in s.env_names:
            raw = environ.get(env_name)
            # An empty variable (REDIS_PASSWORD= in a .env file) means unset.
            if raw is None or raw.strip() == '':
                continue
            config.values[s.name] = _parse(
                s, raw, origin='env %s' % env_name)
            config.sources[s.name] = Source('env', env_name)
            break
    for env_name in environ:
        if env_name.startswith('HUEY_WORKER_') and env_name not in known:
            config.warnings.append(
                'environment variable %s is not a setting, ignored%s' % (
                    env_name, _did_you_mean(env_name, sorted(known))))


def _check_consistency(config):
    v = config.values
    if v['redis.socket_timeout'] <= v['consumer.read_timeout'] + 1:
        raise ConfigError(
            'must exceed [consumer] read_timeout (%g) by more than 1 second, '
            'or a quiet queue would look like a dead connection'
            % v['consumer.read_timeout'], 'redis', 'socket_timeout',
            registry.BY_NAME['redis.socket_timeout'].type.format(
                v['redis.socket_timeout']),
            origin=str(config.sources['redis.socket_timeout']))
    if v['redis.url'] and v['redis.sentinels']:
        raise ConfigError('set either url or sentinels, not both', 'redis',
                          'sentinels', ', '.join(v['redis.sentinels']),
                          origin=str(config.sources['redis.sentinels']))
    if v['delivery.recovery_timeout'] <= 2 * v['delivery.heartbeat_interval']:
        raise ConfigError(
            'must be more than twice [delivery] heartbeat_interval (%g)'
            % v['delivery.heartbeat_interval'], 'delivery',
            'recovery_timeout', '%g' % v['delivery.recovery_timeout'],
            origin=str(config.sources['delivery.recovery_timeout']))
    for name, keys in config.periodic.items():
        if not keys.get('task'):
            raise ConfigError("missing required key 'task'", 'periodic:%s'
                              % name)


def _did_you_mean(word, choices, brackets=False):
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1,
                                      cutoff=0.6)
    if not close:
        return ''
    match = by_lower[close[0]]
    return '; did you mean %s?' % (('[%s]' % match) if brackets
                                   else repr(match))
