"""Cost of secure aggregation (Bonawitz et al., CCS 2017) against a plain float32 upload, on a
vector the size of the quickstart's MiniLM adapter (LoRA r=8 on query/value of 6 layers plus the
3-class head: 74,883 values), for several federation sizes, with and without dropouts.

Prints, per case: wall time of the four rounds (all clients simulated in this one process), bytes
per client up and down against the plain upload, and the error of the decoded sum.

    python benchmarks/privacy_secagg.py [--clients 5 10 20] [--length 74883] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--length", type=int, default=74883)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from atoll.privacy.secagg.float_sum import secure_float_sum
    from atoll.privacy.secagg.protocol import Dropouts
    from atoll.privacy.secagg.quantize import Quantizer

    quantizer = Quantizer(clip_range=8.0, levels=2**22, modulus_bits=32)
    plain = 4 * args.length
    print(f"vector {args.length} values; plain float32 upload {plain / 1e6:.3f} MB; ring 2^32, {quantizer.levels} levels over [-8, 8]")
    print("clients  dropouts  threshold  seconds(median)  up MB/client  up/plain  down MB/client  max |error|")
    for count in args.clients:
        threshold = count // 2 + 1
        for late in (0, max(1, count // 10)):
            dropped = frozenset(range(late))
            generator = torch.Generator().manual_seed(count)
            updates = {u: torch.randn(args.length, generator=generator) * 0.01 for u in range(count)}
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = secure_float_sum(updates, quantizer, threshold, Dropouts(before_masked_input=dropped))
                seconds.append(time.perf_counter() - start)
            exact = sum(updates[u].double() for u in result.protocol.included)
            error = float((result.total - exact).abs().max())
            up = sum(p.bytes_up for p in result.protocol.traffic) / count
            down = sum(p.bytes_down for p in result.protocol.traffic) / count
            print(
                f"{count:7d}  {late:8d}  {threshold:9d}  {statistics.median(seconds):15.3f}  {up / 1e6:12.3f}  {up / plain:8.3f}"
                f"  {down / 1e6:14.3f}  {error:.2e}"
            )


if __name__ == "__main__":
    main()
