#!/usr/bin/env python3
"""sessionlb custom balancer example: the node with the lowest load per CPU.

Reads the placement request (JSON, see plugins/README.md) on stdin and
prints the id of the candidate with the lowest 5-minute load average
divided by its CPU count. Ties go to fewer sessions, then the lowest id.
A node without a usable load report (null, negative) counts as the most
loaded. Needs only python3 (standard library).

Install: copy to /usr/lib/rstudio-server/bin/rserver-balancer (mode 755), or
point `custom-balancer-command` at it, and set `balancer = custom`.
"""

import json
import math
import sys


def load_per_cpu(node):
    """5-minute load average / max(cpus, 1); infinity when not reported."""
    load = node.get("load") or []
    five = load[1] if len(load) > 1 else None
    if isinstance(five, bool) or not isinstance(five, (int, float)):
        return math.inf
    if not math.isfinite(five) or five < 0:
        return math.inf
    cpus = node.get("cpus")
    cpus = cpus if isinstance(cpus, int) and cpus > 0 else 1
    return five / cpus


def main():
    try:
        request = json.load(sys.stdin)
        nodes = request["nodes"]
    except (ValueError, KeyError, TypeError) as error:
        print(f"least-loaded: bad input: {error}", file=sys.stderr)
        return 1
    if not nodes:
        print("least-loaded: no candidate nodes", file=sys.stderr)
        return 1
    best = min(nodes, key=lambda n: (load_per_cpu(n), n.get("sessions", 0), n["id"]))
    print(best["id"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
