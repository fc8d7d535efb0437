"""What every subcommand shares: the --config/--set options, the flags the
registry defines, and turning a ConfigError into exit code 78."""
import functools
import logging
import sys

import click

from .. import config as config_module
from .. import settings as registry
from ..config import ConfigError
from ..exitcodes import EX_CONFIG

MULTIPLE = {'tasks.modules'}


def _param(setting):
    return 'opt_%s_%s' % (setting.section, setting.key)


def config_options(*sections):
    """Add --config, --set and the registry's flags for `sections`."""
    def decorate(fn):
        wanted = [s for s in registry.SETTINGS
                  if s.cli and (not sections or s.section in sections)]
        for setting in reversed(wanted):
            # A yes/no setting's flag alone means yes (`--flush-locks`, as
            # huey_consumer has it); `--flush-locks false` still works.
            boolean = isinstance(setting.type, registry.Boolean)
            extra = {'is_flag': False, 'flag_value': 'true'} if boolean \
                else {}
            fn = click.option(
                setting.cli, _param(setting), default=None,
                multiple=setting.name in MULTIPLE,
                metavar='[VALUE]' if boolean else 'VALUE',
                help='%s [%s] %s' % (setting.help, setting.section,
                                     setting.key), **extra)(fn)
        fn = click.option(
            '--set', 'opt_set', multiple=True, metavar='SECTION.KEY=VALUE',
            help='Override any setting, e.g. --set consumer.max_tasks=100.')(fn)
        fn = click.option(
            '-c', '--config', 'opt_config', default=None, metavar='PATH',
            help='Config file (default: $HUEY_WORKER_CONFIG or %s).'
                 % config_module.DEFAULT_PATH)(fn)
        return fn
    return decorate


def overrides_from(params):
    """(name, raw, flag) triples from the parsed flags, in command-line
    order of precedence (specific flags, then --set)."""
    out = []
    for setting in registry.SETTINGS:
        raw = params.get(_param(setting))
        if raw is None or raw == ():
            continue
        if isinstance(raw, tuple):
            raw = ', '.join(raw)
        out.append((setting.name, str(raw), setting.cli))
    for item in params.get('opt_set') or ():
        name, sep, raw = item.partition('=')
        if not sep:
            raise ConfigError('expected SECTION.KEY=VALUE, got %r' % item,
                              origin='cli --set')
        out.append((name.strip(), raw, '--set %s' % item))
    return out


def load_from(params):
    return config_module.load(params.get('opt_config'),
                              overrides=overrides_from(params))


def fail_config(exc):
    click.echo('huey-worker: config error: %s' % exc, err=True)
    sys.exit(EX_CONFIG)


def exits_on(error, handle):
    """A command decorator: `error` (an exception class or a tuple of
    them) raised by the command goes to handle(exc), which prints it and
    exits with its code instead of a traceback."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except error as exc:
                handle(exc)
        return wrapper
    return decorate


# A bad config file, variable or --set: its message, exit 78.
exits_78_on_config_error = exits_on(ConfigError, fail_config)


def prepare_daemon(params, before_logging=None):
    """What every daemon command does first: load the config, set up
    logging, log the config warnings, configure the app: the shared one,
    or the user's own that [huey] app names (huey_worker.adopt).  Returns
    (cfg, app), cfg as the app runs with it (for an adopted app, with the
    values taken from it).  `before_logging(cfg)` runs first (gevent
    patching must precede everything else)."""
    from .. import app as app_module
    from .. import logs
    cfg = None
    try:
        cfg = load_from(params)
        if before_logging is not None:
            before_logging(cfg)
        logs.setup(cfg)
        log = logging.getLogger('huey_worker')
        for warning in cfg.warnings:
            log.warning('%s', warning)
        app = app_module.configure(cfg)
        return app.config, app
    except ConfigError as exc:
        # exits_78_on_config_error prints it for the journal; the log file
        # gets it too, the configured one or the one the unit names.
        logs.config_error_to_file(exc, cfg.logging.file if cfg is not None
                                  else log_file_despite_errors(params))
        raise


def log_file_despite_errors(params, environ=None):
    """[logging] file when the configuration does not load: from the
    sources that can still be read, with load()'s precedence (files, then
    the environment, then the command line).  '' when none sets it."""
    import configparser
    import os
    environ = os.environ if environ is None else environ
    value = ''
    path, _ = config_module.resolve_path(params.get('opt_config'), environ)
    try:
        # The drop-ins load() reads, in its order; a conf.d this user may
        # not list is one of the errors being reported: none then.
        dropins = config_module.dropin_paths(os.path.join(
            os.path.dirname(os.path.abspath(path)), 'conf.d'))
    except ConfigError:
        dropins = []
    for file_path in [path] + dropins:
        parser = configparser.ConfigParser(interpolation=None, strict=False,
                                           default_section='\x00none')
        try:
            parser.read(file_path, encoding='utf-8')
        except configparser.ParsingError:
            pass    # the lines before and after the bad one are kept
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.has_option('logging', 'file'):
            value = parser.get('logging', 'file').strip()
    setting = registry.BY_NAME['logging.file']
    for name in setting.env_names:
        if environ.get(name, '').strip():
            value = environ[name].strip()
            break
    try:
        overrides = overrides_from(params)
    except ConfigError:
        overrides = []
    for name, raw, _ in overrides:
        if name.strip() == setting.name:
            value = raw.strip()
    return value
