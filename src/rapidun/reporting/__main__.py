"""``python -m rapidun.reporting RUN_DIR [RUN_DIR ...]``: render each run folder's report."""

from __future__ import annotations

import argparse

from rapidun.reporting import render_report


def main(argv: list[str] | None = None) -> int:
    """Render the report of each run folder given; print the written paths."""
    ap = argparse.ArgumentParser(prog="python -m rapidun.reporting", description=__doc__)
    ap.add_argument("run_dir", nargs="+", help="run folder holding report.json")
    args = ap.parse_args(argv)
    for d in args.run_dir:
        paths = render_report(d)
        print(f"{paths['html']}\n{paths['md']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
