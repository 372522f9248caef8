"""Run the ca-service benchmarks: ``python bench/run.py [--quick] [--only NAME ...]``.

Prints a table per benchmark and writes ``bench/results/<date>-<name>.json`` plus
``bench/results/latest.json``.  Exit status is non-zero only when a benchmark itself breaks, never
because a figure misses its target (benchmarks are not tests).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, cores, issuance, istio_ca, renewal, replicas, sds_fanout, startup

RESULTS = Path(__file__).resolve().parent / "results"
BENCHES: dict[str, Callable[[bool], common.Result]] = {
    "issuance": issuance.run,
    "cores": cores.run,
    "renewal": renewal.run,
    "startup": startup.run,
    "sds_fanout": sds_fanout.run,
    "replicas": replicas.run,
    "istio_ca": istio_ca.run,
}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def print_result(result: common.Result) -> None:
    print(f"\n== {result.name}")
    width = max((len(k) for k in result.metrics), default=10)
    for key, value in result.metrics.items():
        print(f"  {key:<{width}}  {_fmt(value):>12}")
    for target in result.targets:
        verdict = {True: "met", False: "NOT MET", None: "n/a"}[target["met"]]
        print(f"  target: {target['target']}: {_fmt(target['value'])} -> {verdict}")
    for note in result.notes:
        print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one round (CI)")
    parser.add_argument("--only", action="append", choices=sorted(BENCHES), help="run only this benchmark")
    parser.add_argument("--name", default=None, help="result file name (default: quick or full)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--context", default="", help="free text recorded with the results (e.g. what tree ran)")
    parser.add_argument("--sds-target", choices=("stub", "daemon"), default="daemon",
                        help="SDS fan-out server: the daemon (default; the stub is measured too, as the floor) or "
                             "only the bench's stub")
    parser.add_argument("--sds-streams", type=int, nargs="+", help="stream counts (default 1000 5000 10000)")
    args = parser.parse_args(argv)
    benches = dict(BENCHES)
    benches["sds_fanout"] = functools.partial(
        sds_fanout.run, stream_counts=tuple(args.sds_streams) if args.sds_streams else None,
        target_kind=args.sds_target)
    command = ["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]
    doc = {**common.environment(command), "context": args.context, "quick": args.quick, "results": {}, "errors": {}}
    for name in args.only or list(BENCHES):
        print(f"running {name} ...", flush=True)
        try:
            result = benches[name](args.quick)
        except Exception:
            doc["errors"][name] = traceback.format_exc()
            print(doc["errors"][name], file=sys.stderr)
            continue
        doc["results"][name] = result.as_dict()
        print_result(result)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or ("quick" if args.quick else "full")
    now = dt.datetime.now(dt.UTC)
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    path = args.results_dir / f"{now:%Y-%m-%d}-{name}.json"
    if path.exists():  # a second run of the day keeps the first (results are committed)
        path = args.results_dir / f"{now:%Y-%m-%d-%H%M}-{name}.json"
    path.write_text(text)
    (args.results_dir / "latest.json").write_text(text)
    print(f"\nwrote {args.results_dir / 'latest.json'}")
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
