"""The device's achievable dense bf16 matmul rate through XLA: the practical ceiling beside the datasheet peak.

    python scripts/benchmark_matmul.py [--n 8192] [--repeats 10]

Times an n x n x n bfloat16 product on random data (zeros run faster on some GPUs and would overstate the
ceiling) with float32 accumulation, after one warm-up, and prints the median TFLOP/s over `--repeats` runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp


def matmul_tflops(n: int, repeats: int) -> float:
    """Median TFLOP/s of a jitted (n, n) @ (n, n) bf16 product on the default device."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    product = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    product(a, b).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(seconds) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = jax.devices()[0]
    rate = matmul_tflops(args.n, args.repeats)
    print(f"matmul {args.n}^3 bf16 on {device.device_kind}: {rate:.1f} TFLOP/s (median of {args.repeats})")


if __name__ == "__main__":
    main()
