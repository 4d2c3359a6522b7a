#!/usr/bin/env python3
"""Times OpenWISP's netjsonconfig rendering the same OpenWrt config sidenet renders.

Usage: netjsonconfig_bench.py DIR N — DIR holds etc/config/* rendered by sidenet for one node.
The files are parsed once into NetJSON; then N configs (each with its own address, like
sidenet's per-node configs) are rendered back to UCI. Prints {"configs": N, "per_s": ...}.
"""
import copy
import json
import os
import sys
import time

from netjsonconfig import OpenWrt


def main() -> None:
    src, n = sys.argv[1], int(sys.argv[2])
    parts = []
    conf_dir = os.path.join(src, "etc", "config")
    for name in sorted(os.listdir(conf_dir)):
        if name == "babeld":  # netjsonconfig has no babeld model; compare like with like
            continue
        with open(os.path.join(conf_dir, name)) as f:
            # netjsonconfig's UCI parser does not take comment lines.
            body = "".join(l for l in f if not l.lstrip().startswith("#"))
        parts.append(f"package {name}\n\n{body}")
    base = OpenWrt(native="\n".join(parts)).config
    configs = []
    for i in range(n):
        c = copy.deepcopy(base)
        c.setdefault("general", {})["hostname"] = f"node{i}"
        configs.append(c)
    start = time.perf_counter()
    for c in configs:
        OpenWrt(c).render()
    secs = time.perf_counter() - start
    print(json.dumps({"configs": n, "per_s": n / secs}))


if __name__ == "__main__":
    main()
