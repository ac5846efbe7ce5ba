#!/usr/bin/env python3
"""Per-request CPU breakdown of a proxy from `perf script` output.

Usage: perf script -i DATA --no-inline | bench/perf_breakdown.py FREQ REQUESTS

Every sample (one every 1/FREQ s of CPU) goes to one category, by its stack:
sessionlb's own code if any frame is a `sessionlb::` function (inclusive:
whatever it calls, user or kernel), else by the leaf frame: kernel, the
allocator (mimalloc), memcpy/memset, other libc, or the rest of user space
(Pingora, tokio, http, ... or nginx/HAProxy themselves). Dividing by the
requests served while sampling gives microseconds of CPU per request.
"""
import re
import sys
from collections import Counter

FRAME = re.compile(r"\s*[0-9a-f]+ (.*) \((.*)\)$")


def samples(lines):
    stack = None
    for line in lines:
        if not line.strip():
            if stack is not None:
                yield stack
            stack = None
        elif not line.startswith(("\t", " ")):
            stack = []  # a sample's header line
        elif stack is not None:
            m = FRAME.match(line.rstrip())
            if m:
                stack.append((re.sub(r"\+0x[0-9a-f]+$", "", m.group(1)), m.group(2)))
    if stack is not None:
        yield stack


def category(stack):
    if not stack:
        return "unknown"
    if any(sym.startswith(("<sessionlb::", "sessionlb::")) for sym, _ in stack):
        return "sessionlb's code (inclusive)"
    leaf, dso = stack[0]
    if "kernel" in dso:
        return "kernel"
    if leaf.startswith(("mi_", "_mi_")):
        return "allocator (mimalloc)"
    if any(s in leaf for s in ("memmove", "memcpy", "memset")):
        return "memcpy/memset"
    if "libc" in dso:
        return "libc, other"
    return "user space, other (Pingora/tokio/http or the proxy itself)"


def main():
    freq, requests = float(sys.argv[1]), float(sys.argv[2])
    counts = Counter(category(s) for s in samples(sys.stdin))
    total = sum(counts.values())
    us = 1e6 / freq / requests
    print(f"{total} samples, {requests:.0f} requests: {total * us:.1f} µs of CPU per request")
    for name, n in counts.most_common():
        print(f"  {name:60s} {100 * n / total:5.1f}%  {n * us:6.2f} µs/req")


if __name__ == "__main__":
    main()
