"""The printed table and the saved JSON."""

import json
from pathlib import Path

RESULTS = Path(__file__).with_name("results")


def default_output(result: dict) -> Path:
    stamp = result["date"].replace(":", "").removesuffix("Z")  # 2026-12-01T193000
    return RESULTS / f"{stamp}Z-{result['label']}.json"


def save(result: dict, output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    return output


def _point(row: dict) -> str:
    g, b, r = row["generated"], row["bare"], row["ratio"]
    errors = sum(row[app][k] for app in ("generated", "bare") for k in ERROR_KEYS)
    return (
        f"{g['rps']:>9.0f} {b['rps']:>9.0f} {_x(r['rps']):>6}"
        f" {g['p50_ms']:>8.2f} {b['p50_ms']:>8.2f}"
        f" {g['p99_ms']:>8.2f} {b['p99_ms']:>8.2f} {_x(r['p99_ms']):>6} {errors:>6}"
    )


ERROR_KEYS = ("errors", "timeouts", "non_2xx")
HEADER = (
    f"{'gen r/s':>9} {'bare r/s':>9} {'ratio':>6} {'gen p50':>8} {'bare p50':>8}"
    f" {'gen p99':>8} {'bare p99':>8} {'p99 x':>6} {'errors':>6}"
)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"prodready benchmark '{result['label']}', {result['date']}, {m['cpus']} CPUs "
        f"({m['cpu_model']}), load average before {m['load_average_before'][0]}, "
        f"after {m['load_average_after'][0]}; latencies in ms; ratio = generated / bare",
    ]
    for run in result["workers"]:
        boot, rss = run["boot_s"], run["idle_rss_mb"]
        lines += [
            "",
            f"workers={run['workers']}: boot to first 200 {boot['generated']:.2f} s vs "
            f"{boot['bare']:.2f} s ({boot['difference']:+.2f} s); idle RSS "
            f"{rss['generated']:.1f} MB vs {rss['bare']:.1f} MB ({rss['difference']:+.1f} MB)",
            f"{'endpoint':<16} {'conns':>5} {HEADER}",
        ]
        for row in [*run["endpoints"], run["concurrent_reads"]]:
            lines.append(f"{row['endpoint']:<16} {row['connections']:>5} {_point(row)}")
    lines += ["", f"data growth (notes list, 1 worker): {'other rows':>10} {HEADER} plan"]
    for row in result["growth"]:
        query = row["query"]
        lines.append(
            f"{'':<36}{row['other_rows']:>10} {_point(row)}"
            f" {query['index']}, {query['rows_examined']} rows, {query['execution_ms']:.2f} ms"
        )
    lines += ["", f"wall time {result['wall_seconds']} s"]
    return "\n".join(lines)
