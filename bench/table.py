"""The benchmark's one table: sections of aligned rows, printed as text
and optionally written as Markdown (docs/benchmarks.md takes it)."""


def cell(figure, fmt='%.0f', unit=''):
    """'median [min-max]' of a Figure (just the value for one run); '-'
    when there is nothing."""
    if figure is None or not figure:
        return '-'
    if len(figure.values) == 1:
        return (fmt % figure.median) + unit
    return '%s%s [%s-%s]' % (fmt % figure.median, unit, fmt % figure.low,
                             fmt % figure.high)


def ratio_cell(numerator, denominator, fmt='%.2fx'):
    """Median of the run-by-run ratios, with their min and max."""
    from harness import Figure
    if not numerator or not denominator:
        return '-'
    pairs = list(zip(numerator.values, denominator.values))
    return cell(Figure(a / b for a, b in pairs if b), fmt)


class Table:
    def __init__(self, title):
        self.title = list(title)
        self.sections = []

    def section(self, title, header, note=None):
        self.sections.append({'title': title, 'header': list(header),
                              'rows': [], 'note': note})

    def row(self, *cells):
        self.sections[-1]['rows'].append([str(c) for c in cells])

    def text(self):
        lines = list(self.title)
        for section in self.sections:
            rows = [section['header']] + section['rows']
            widths = [max(len(r[i]) if i < len(r) else 0 for r in rows)
                      for i in range(len(section['header']))]
            lines += ['', section['title']]
            for index, row in enumerate(rows):
                lines.append('  ' + '  '.join(
                    value.ljust(width) if i == 0 else value.rjust(width)
                    for i, (value, width) in enumerate(zip(row, widths))
                ).rstrip())
                if index == 0:
                    lines.append('  ' + '  '.join('-' * w for w in widths))
            if section['note']:
                lines.append('  ' + section['note'])
        return '\n'.join(lines) + '\n'

    def markdown(self):
        lines = [line + '  ' for line in self.title]   # hard line breaks
        for section in self.sections:
            header = section['header']
            lines += ['', '**%s**' % _md(section['title']), '',
                      '| ' + ' | '.join(map(_md, header)) + ' |',
                      '|' + '|'.join(['---'] + ['--:'] * (len(header) - 1))
                      + '|']
            for row in section['rows']:
                lines.append('| ' + ' | '.join(map(_md, row)) + ' |')
            if section['note']:
                lines += ['', section['note']]
        return '\n'.join(lines) + '\n'


def _md(text):
    return text.replace('<', '&lt;').replace('|', '\\|')
