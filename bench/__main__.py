"""`uv run python -m bench [--smoke] [--output FILE]`: the generated service vs bare FastAPI."""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from . import report
from .plan import FULL, SMOKE
from .project import Tuning
from .runner import run

STARTED = time.monotonic()


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a tiny run, for the test suite")
    parser.add_argument("--label", help="names the results file (default: full or smoke)")
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/…)")
    parser.add_argument("--seconds", type=int, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, help="runs per point (medians reported)")
    parser.add_argument("--workers", type=_ints, help="comma-separated, e.g. 1,2")
    parser.add_argument("--connections", type=_ints, help="comma-separated, e.g. 1,16,64,256")
    parser.add_argument("--growth-sizes", type=_ints, help="rows of other principals")
    parser.add_argument("--rate-limit", default=Tuning.rate_limit, help="RATE_LIMIT_DEFAULT")
    args = parser.parse_args(argv)

    plan = SMOKE if args.smoke else FULL
    overrides = {
        "label": args.label,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "workers": args.workers,
        "connections": args.connections,
        "growth_sizes": args.growth_sizes,
    }
    plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    result = run(plan, Tuning(rate_limit=args.rate_limit), log=_progress)
    sys.stdout.write(report.table(result) + "\n")
    saved = report.save(result, args.output or report.default_output(result))
    sys.stdout.write(f"saved {saved}\n")
    return 0


def _progress(message: str) -> None:
    sys.stderr.write(f"[bench {time.monotonic() - STARTED:6.1f} s] {message}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
