"""numpy's in-place add, `acc += u` on float32, measured as `fedretail-sim bench aggregate`
measures the aggregator: K updates of d values cycled from a pool of distinct buffers of at
least 256 MiB (so they come from memory), best of three, update bytes consumed per second.

    python3 sim/scripts/numpy_aggregate.py
"""
import time

import numpy as np

print("| K | d | numpy acc += u GB/s | numpy float64 acc += u GB/s | numpy uint32 acc += u GB/s |")
print("| --- | --- | --- | --- | --- |")
for d in (100_000, 1_000_000):
    pool_len = max((256 << 20) // (d * 4), 2)
    rng = np.random.default_rng(1)
    pool = [rng.standard_normal(d, dtype=np.float32) * 1e-3 for _ in range(pool_len)]
    masked = [(u.view(np.uint32) & 0xFFFF) for u in pool]
    for k in (10, 100, 1000):
        best = [float("inf")] * 3
        for _ in range(3):
            for mode, (dtype, src) in enumerate(
                ((np.float32, pool), (np.float64, pool), (np.uint32, masked))
            ):
                acc = np.zeros(d, dtype=dtype)
                t = time.perf_counter()
                for j in range(k):
                    acc += src[j % pool_len]  # uint32 wraps mod 2**32, as the masked sum
                best[mode] = min(best[mode], time.perf_counter() - t)
        gb = k * d * 4 / 1e9
        print(f"| {k} | {d} | {gb / best[0]:.2f} | {gb / best[1]:.2f} | {gb / best[2]:.2f} |")
