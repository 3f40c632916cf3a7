"""ε of client-level DP-FedAvg (the sampled Gaussian mechanism) for a few federation settings,
from opacus' RDP and PRV accountants, and the noise multiplier each target ε needs.

    python benchmarks/privacy_accounting.py [--delta 1e-5]
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    from atoll.privacy.dp.accounting import epsilon_after, noise_multiplier_for

    print(f"epsilon at delta={args.delta:g}")
    print("sample rate q  noise z  rounds   eps (RDP)  eps (PRV)")
    for q in (0.01, 0.1, 1.0):
        for z in (0.5, 1.0, 2.0):
            for rounds in (10, 100):
                rdp = epsilon_after(z, q, rounds, args.delta, "rdp")
                prv = epsilon_after(z, q, rounds, args.delta, "prv")
                print(f"{q:13g}  {z:7g}  {rounds:6d}  {rdp:9.3f}  {prv:9.3f}")
    print("\nnoise multiplier for a target epsilon (RDP), 100 rounds")
    print("sample rate q  target eps  z")
    for q in (0.1, 1.0):
        for target in (1.0, 8.0):
            print(f"{q:13g}  {target:10g}  {noise_multiplier_for(target, args.delta, q, 100):.3f}")


if __name__ == "__main__":
    main()
