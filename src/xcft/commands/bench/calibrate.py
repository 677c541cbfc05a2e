"""Machine calibration: float32 1024×1024 matmul throughput, reported beside every benchmark figure.

Benchmark numbers from different machines (or from one machine under different load) only compare
after dividing by what the machine can do; this is the yardstick the baseline figures quote.
"""

from __future__ import annotations

import statistics
import time

import torch


def calibration_gflops(seconds: float = 0.3, repeats: int = 5, size: int = 1024) -> float:
    """Median GFLOP/s of a float32 ``size``×``size`` CPU matmul loop with torch's current thread count."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    out = torch.empty(size, size)
    for _ in range(3):
        torch.mm(a, b, out=out)
    flop = 2.0 * size**3
    rates = []
    for _ in range(repeats):
        n = 0
        start = time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        rates.append(flop * n / elapsed / 1e9)
    return float(statistics.median(rates))


__all__ = ["calibration_gflops"]
