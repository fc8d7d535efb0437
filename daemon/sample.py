"""The annotated sample config and the settings reference, both rendered
from the registry (etc/huey-worker.ini and docs/configuration.md are these
texts, checked by a test)."""
import textwrap

from . import settings as registry

HEADER = """\
# huey-worker configuration.
#
# Every setting is shown with its built-in default, commented out unless the
# shipped config sets it.  Precedence, lowest first: default < this file <
# conf.d/*.ini (name order) < environment < command line.  Each setting can
# also be set by the environment variable named beside it.
# `huey-worker config` prints the effective values and where each came from;
# `huey-worker config --check` validates (exit 0, or 78 on an error).
"""


def _comment(text, width=78):
    return '\n'.join('# ' + line for line in textwrap.wrap(text, width - 2))


def _setting_block(setting):
    lines = [_comment(setting.help)]
    lines.append('# type: %s; env: %s' % (setting.type.name,
                                          ', '.join(setting.env_names)))
    if setting.sample is not None:
        lines.append('%s = %s' % (setting.key, setting.sample))
    else:
        default = setting.type.format(setting.default)
        lines.append(('#%s = %s' % (setting.key, default)).rstrip())
    return '\n'.join(lines)


def render_ini():
    out = [HEADER]
    for section in registry.SECTIONS:
        out.append('')
        out.append(_comment(registry.SECTION_HELP[section]))
        out.append('[%s]' % section)
        for setting in registry.SETTINGS:
            if setting.section == section:
                out.append(_setting_block(setting))
                out.append('')
    for family in registry.SECTION_FAMILIES:
        out.append('')
        out.append(_comment(family.help))
        out.append('#[%s:%s]' % (family.prefix, family.example_name))
        for setting in family.settings:
            out.append(_comment(setting.help + ' (type: %s%s)' % (
                setting.type.name, ', required' if setting.required else '')))
            value = setting.sample if setting.sample is not None \
                else setting.type.format(setting.default)
            out.append('#%s = %s' % (setting.key, value))
    return '\n'.join(out).rstrip() + '\n'


def render_markdown():
    out = ['# Configuration reference', '',
           'Generated from `daemon/settings.py` by `huey-worker config '
           '--reference`; a test keeps this file in step with the code.', '',
           'Sources, lowest precedence first: built-in default, '
           '`/etc/huey-worker/huey-worker.ini` (or `--config PATH` / '
           '`HUEY_WORKER_CONFIG`), `conf.d/*.ini` beside it in name order, '
           'the environment, the command line.  When several environment '
           'names are listed, the first one set wins.  An empty environment '
           'variable counts as unset.  Unknown sections and keys are errors '
           '(exit code 78).', '']
    for section in registry.SECTIONS:
        out += ['## [%s]' % section, '', registry.SECTION_HELP[section], '',
                '| key | type | default | environment | meaning |',
                '| --- | --- | --- | --- | --- |']
        for s in registry.SETTINGS:
            if s.section != section:
                continue
            default = s.type.format(s.default) or '(empty)'
            out.append('| %s | %s | `%s` | %s | %s%s |' % (
                s.key, s.type.name, default,
                ', '.join('`%s`' % e for e in s.env_names), s.help,
                ' CLI: `%s`.' % s.cli if s.cli else ''))
        out.append('')
    for family in registry.SECTION_FAMILIES:
        out += ['## [%s:NAME]' % family.prefix, '', family.help, '',
                '| key | type | default | meaning |', '| --- | --- | --- | --- |']
        for s in family.settings:
            out.append('| %s | %s | `%s` | %s%s |' % (
                s.key, s.type.name, s.type.format(s.default) or '(required)',
                s.help, ' Required.' if s.required else ''))
        out.append('')
    return '\n'.join(out)
