"""
QEMU-to-QEMU baseline: what QEMU 7.2 itself achieves with the boot-sector
test guest (TCG), for comparison with the twisted-postcopy figures.

Runs, for each RAM size:
  1. A postcopy migration between two QEMUs over loopback TCP, switching to
     postcopy right after C{migrate} (every page then travels after the
     package, as in the twisted-postcopy postcopy bench). Reports the time
     from C{migrate} to the destination's C{RESUME}, total time, downtime,
     postcopy page requests and the destination's blocktime.
  2. A precopy save to a file (C{exec:cat}) and its restore into a fresh
     QEMU (C{-incoming exec:cat FILE}), timed to C{RESUME}.

Every migrated or restored guest's counters are checked for consistency.

Usage: C{python bench/qemu_baseline.py [--mib 64 256] [--json]}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted_postcopy.testing.qemu import qemuMissing  # noqa: E402
from twisted_postcopy.testing.qemubaseline import (  # noqa: E402
    qemuPrecopyLoad,
    UNLIMITED,
    qemuToQemuPostcopy,
    recordPrecopy,
)


def measure(mib: int, scratch: str) -> dict[str, Any]:
    """
    Run both baselines for one RAM size.

    @param mib: guest RAM in MiB.
    @param scratch: an empty scratch directory.
    @return: the figures, unit-suffixed.
    """
    postcopy = qemuToQemuPostcopy(
        mib, os.path.join(scratch, "post"), startAfterBytes=0, precopyBandwidth=UNLIMITED
    )
    stream = os.path.join(scratch, "precopy.bin")
    recordPrecopy(os.path.join(scratch, "save"), stream, mib)
    load = qemuPrecopyLoad(stream, os.path.join(scratch, "load"), mib)
    return {
        f"postcopy_{mib}mib_resume_ms": round(postcopy["resume_ms"], 2),
        f"postcopy_{mib}mib_total_ms": postcopy["total_ms"],
        f"postcopy_{mib}mib_downtime_ms": postcopy["downtime_ms"],
        f"postcopy_{mib}mib_requests_count": postcopy["postcopy_requests"],
        f"postcopy_{mib}mib_blocktime_ms": postcopy["blocktime_ms"],
        f"postcopy_{mib}mib_mbps": round(postcopy["mbps"], 1),
        f"precopy_{mib}mib_load_ms": round(load["load_ms"], 2),
        f"precopy_{mib}mib_stream_bytes": load["stream_bytes"],
    }


def main() -> int:
    """
    Parse options, run the baselines, print a table or one JSON object.

    @return: the exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args()
    reason = qemuMissing()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 1
    results: dict[str, Any] = {}
    for mib in options.mib:
        scratch = tempfile.mkdtemp(prefix="qemu-baseline-")
        try:
            for name in ("post", "save", "load"):
                os.makedirs(os.path.join(scratch, name))
            results.update(measure(mib, scratch))
        finally:
            shutil.rmtree(scratch, True)
    if options.json:
        print(json.dumps(results))
    else:
        width = max(len(key) for key in results)
        for key, value in results.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
