"""Merges one-seed reports of a benchmark (e.g. `realworld_digits.py` shards run by `pool.py`,
one method and seed each) into tables of mean ± sample std over seeds, with the values per seed.

Every markdown table of the reports whose cells read `value ± std` is merged: cells are matched
by the text above the table, the row's first cell and the column's header; a report's seed is
read from its `--seeds S` (a shard must have run one seed). Rows keep their first appearance's
order; `--order` lists first cells to put first, in that order.

    python benchmarks/merge_seeds.py /tmp/gg/imb_*_s?.md --out benchmarks/results/imbalance.md
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import statistics
import sys

CELL = re.compile(r"^(-?[\d.]+) ± [\d.]+$")


def tables(text: str):
    """(title, header cells, rows of cells) of each markdown table; title = the line above."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|-"):
            title = next((t for t in reversed(lines[:i]) if t.strip()), "")
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            yield title, header, rows
        else:
            i += 1


def main(argv: list[str] | None = None) -> int:
    """Prints (and with --out writes) the merged tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=pathlib.Path)
    parser.add_argument("--order", nargs="*", default=[], help="first cells to list first")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    # (title, header) -> row name -> column -> {seed: value}
    merged: dict = collections.defaultdict(lambda: collections.defaultdict(dict))
    for report in args.reports:
        text = report.read_text()
        seeds = re.search(r"--seeds ((?:\d+ ?)+)", text)
        if not seeds or len(seeds[1].split()) != 1:
            parser.error(f"{report}: not a one-seed report (its command's --seeds)")
        seed = int(seeds[1])
        for title, header, rows in tables(text):
            for row in rows:
                for column, cell in zip(header[1:], row[1:], strict=False):
                    value = CELL.match(cell)
                    if value:
                        cells = merged[(title, tuple(header))][row[0]].setdefault(column, {})
                        if seed in cells:
                            parser.error(f"{report}: {row[0]} / {column}, seed {seed} twice")
                        cells[seed] = float(value[1])
    out = []
    for (title, header), rows in merged.items():
        out += [title, "", "| " + " | ".join(header) + " | per seed |"]
        out.append("|" + "---|" + "---:|" * (len(header) - 1) + "---|")
        first = [r for r in args.order if r in rows] + [r for r in rows if r not in args.order]
        for name in first:
            cells, seeds_text = [], []
            for column in header[1:]:
                values = rows[name].get(column, {})
                if not values:
                    cells.append("")
                    continue
                v = [values[s] for s in sorted(values)]
                std = statistics.stdev(v) if len(v) > 1 else 0.0
                digits = 3 if max(abs(x) for x in v) <= 1 else 1
                cells.append(f"{statistics.fmean(v):.{digits}f} ± {std:.{digits}f} (n={len(v)})")
                seeds_text.append(f"{column}: " + ", ".join(f"{x:g}" for x in v))
            out.append("| " + " | ".join([name, *cells, "; ".join(seeds_text)]) + " |")
        out.append("")
    report = "\n".join(out)
    print(report)
    if args.out:
        pathlib.Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
