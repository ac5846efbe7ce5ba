#!/usr/bin/env python3
"""Markdown summary of one or more bench/wire.sh raw.tsv files.

WebSocket tests: per target, the median over rounds of the p50 and p99 round
trip, and the latency the proxy adds: the median over rounds of (target −
direct) measured in the same round. Bulk tests: median MiB/s, the ratio to
nginx's median, and the proxy's CPU-seconds per GiB.

    python3 bench/wire_summary.py bench/results/wire-*/raw.tsv
"""

import csv
import statistics
import sys
from collections import defaultdict

ORDER = ["direct", "nginx", "haproxy", "bare", "sessionlb"]


def rows(paths):
    for path in paths:
        with open(path) as f:
            lines = [l for l in f if not l.startswith("#")]
        for r in csv.DictReader(lines, delimiter="\t"):
            r["source"] = path
            yield r


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0, unit=""):
    return "–" if v is None else f"{v:.{digits}f}{unit}"


def main(paths):
    data = list(rows(paths))
    if not data:
        sys.exit("no data")
    by = defaultdict(list)  # (test, target) -> rows
    rounds = defaultdict(dict)  # (source, round, test) -> target -> row
    for r in data:
        by[(r["test"], r["target"])].append(r)
        rounds[(r["source"], r["round"], r["test"])][r["target"]] = r
    tests = sorted({r["test"] for r in data}, key=lambda t: (not t.startswith("ws-"), int(t[3:]) if t.startswith("ws-") else t))
    targets = [t for t in ORDER if any(r["target"] == t for r in data)]
    noisy = sum(r["noisy"] == "yes" for r in data)
    print(f"{len(data)} runs from {len(paths)} file(s), {noisy} flagged noisy.\n")

    ws = [t for t in tests if t.startswith("ws-")]
    if ws:
        print("#### WebSocket echo round trip (µs; medians over rounds; added = target − direct in the same round)\n")
        print("| sockets | target | p50 | p99 | added p50 | added p99 | vs nginx p50 | late turns | proxy CPU per message | proxy RSS |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for test in ws:
            added = {}
            for target in targets:
                diffs50, diffs99 = [], []
                for (src, rnd, t), per in rounds.items():
                    if t == test and target in per and "direct" in per:
                        diffs50.append(float(per[target]["p50_us"]) - float(per["direct"]["p50_us"]))
                        diffs99.append(float(per[target]["p99_us"]) - float(per["direct"]["p99_us"]))
                added[target] = (med(diffs50), med(diffs99))
            for target in targets:
                rs = by[(test, target)]
                if not rs:
                    continue
                p50 = med(float(r["p50_us"]) for r in rs)
                p99 = med(float(r["p99_us"]) for r in rs)
                late = sum(int(r["late"]) for r in rs)
                cpu = med(float(r["proxy_cpu_per_unit"]) for r in rs) if target != "direct" else None
                rss = med(float(r["proxy_rss_mb"]) for r in rs if r.get("proxy_rss_mb", "-") not in ("-", None))
                a50, a99 = added[target]
                vs = None
                if target not in ("direct", "nginx") and a50 is not None and added.get("nginx", (None,))[0] is not None:
                    vs = a50 - added["nginx"][0]
                print(
                    f"| {test[3:]} | {target} | {fmt(p50)} | {fmt(p99)} | "
                    f"{fmt(a50) if target != 'direct' else '–'} | {fmt(a99) if target != 'direct' else '–'} | "
                    f"{'–' if vs is None else f'{vs:+.0f}'} | {late} | {fmt(cpu, 1, ' µs')} | {fmt(rss, 1, ' MB')} |"
                )
        print()

    bulk = [t for t in tests if t in ("up", "down")]
    if bulk:
        print("#### Bulk transfer (medians over rounds)\n")
        print("| transfer | target | MiB/s | spread | vs nginx | proxy CPU-s per GiB | proxy CPU |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for test in bulk:
            nginx = med(float(r["mib_per_s"]) for r in by[(test, "nginx")])
            for target in targets:
                rs = by[(test, target)]
                if not rs:
                    continue
                v = [float(r["mib_per_s"]) for r in rs]
                m = med(v)
                cpu = med(float(r["proxy_cpu_per_unit"]) for r in rs) if target != "direct" else None
                pct = med(float(r["proxy_cpu_pct"]) for r in rs) if target != "direct" else None
                ratio = f"{m / nginx:.2f}×" if nginx else "–"
                label = "upload" if test == "up" else "download"
                print(
                    f"| {label} | {target} | {m:.0f} | {min(v):.0f}–{max(v):.0f} | {ratio} | "
                    f"{fmt(cpu, 2)} | {fmt(pct, 0, '%')} |"
                )
        print()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
