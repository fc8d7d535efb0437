"""`huey-worker config`: the effective configuration and where each value
came from; --check validates; --sample / --reference print the generated
annotated config and settings reference."""
import json

import click

from .. import sample as generated
from .. import settings as registry
from ..exitcodes import EX_OK
from .common import config_options, exits_78_on_config_error, load_from


@click.command('config')
@config_options()
@click.option('--check', is_flag=True,
              help='Only validate: exit 0 when valid, 78 on an error.')
@click.option('--json', 'as_json', is_flag=True, help='Machine-readable output.')
@click.option('--sample', is_flag=True,
              help='Print the annotated sample config (etc/huey-worker.ini).')
@click.option('--reference', is_flag=True,
              help='Print the settings reference (docs/configuration.md).')
@exits_78_on_config_error
def command(check, as_json, sample, reference, **params):
    """Print the effective configuration with the source of each value
    (default, file:line, env NAME, cli); secrets are redacted."""
    if sample:
        click.echo(generated.render_ini(), nl=False)
        return
    if reference:
        click.echo(generated.render_markdown(), nl=False)
        return
    cfg = load_from(params)
    for warning in cfg.warnings:
        click.echo('huey-worker: warning: %s' % warning, err=True)
    if check or cfg.huey.app:
        # What the daemons do before they start, short of Redis: import the
        # app and the task modules and resolve the periodic tasks, so that
        # `config --check && systemctl reload` catches what they would
        # refuse.  An adopted app's values are shown as it gives them.
        from .. import app as app_module
        from ..scheduler import periodic
        app = app_module.configure(cfg)
        cfg = app.config
        periodic.load_entries(cfg, app)
    if check:
        # What the status endpoint would refuse at start (an open bind
        # without a token) is refused here too.
        from ..status.server import check_exposure
        check_exposure(cfg)
        sources = list(cfg.files)
        if cfg.huey.app:
            sources.append('app %s' % cfg.huey.app)
        click.echo('configuration OK (%s; %d tasks)' % (
            ', '.join(sources) if sources else 'defaults only',
            len(app.task_names())), err=True)
        raise SystemExit(EX_OK)
    if as_json:
        click.echo(json.dumps({'files': cfg.files, 'settings': cfg.as_dict()},
                              indent=2, sort_keys=True))
        return
    click.echo('# files read: %s' % (', '.join(cfg.files) or 'none'))
    from ..redisconn import describe
    click.echo('# Redis: %s' % describe(cfg))
    # With sentinels the master's address comes from them: the address
    # settings are not used (a Redis on this host's 6379 is not it).
    unused = {'redis.host', 'redis.port'} if cfg.redis.sentinels else set()
    width = max(len(s.key) for s in registry.SETTINGS)
    for section in registry.SECTIONS:
        click.echo('[%s]' % section)
        for s in registry.SETTINGS:
            if s.section == section:
                click.echo('%-*s = %-30s # %s%s' % (
                    width, s.key, cfg.display_value(s.name),
                    cfg.source(s.name), ', unused: [redis] sentinels is set'
                    if s.name in unused else ''))
        click.echo('')
    for name, keys in sorted(cfg.periodic.items()):
        click.echo('[periodic:%s]' % name)
        for key, value in keys.items():
            setting = registry.PERIODIC.setting(key)
            click.echo('%-*s = %-30s # %s' % (
                width, key, setting.type.format(value),
                cfg.periodic_sources[name][key]))
        click.echo('')
