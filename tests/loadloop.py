"""A client loop for the routing-mesh tests: GET `url` with a new connection every `interval`
seconds until the file `stop` exists, then write {"ok": N, "failed": N, "errors": [...]} to `out`.

    ip netns exec NS python3 tests/loadloop.py URL STOPFILE OUTFILE [INTERVAL]
"""
import json
import os
import sys
import time
import urllib.request

url, stop, out = sys.argv[1:4]
interval = float(sys.argv[4]) if len(sys.argv) > 4 else 0.02
ok, failed, errors, hosts = 0, 0, [], set()
while not os.path.exists(stop):
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            hosts.add(reply.read().decode().split()[0])
        ok += 1
    except Exception as exc:            # every failure counts, with what it was
        failed += 1
        errors.append(f"{time.time():.3f} {type(exc).__name__}: {exc}")
    time.sleep(interval)
with open(out, "w") as f:
    json.dump({"ok": ok, "failed": failed, "errors": errors[:20], "hosts": sorted(hosts)}, f)
