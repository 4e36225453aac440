"""Cost of the `sparse_ffn.pth` start-up hook for unrelated Python processes (target: under 5 ms).

Starts `python -c pass` N times with the hook and N times with SPARSE_FFN_NO_PLUGIN=1, interleaved,
and prints the median difference per process.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time


def main(n: int = 40) -> None:
    times: dict[bool, list[float]] = {True: [], False: []}
    env_off = {**os.environ, "SPARSE_FFN_NO_PLUGIN": "1"}
    for _ in range(n):
        for hooked in (True, False):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], env=None if hooked else env_off, check=True)
            times[hooked].append(time.perf_counter() - start)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"python -c pass: {on * 1e3:.1f} ms with the hook, {off * 1e3:.1f} ms without "
          f"(median of {n}); hook cost {(on - off) * 1e3:.2f} ms per process (target < 5 ms)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
