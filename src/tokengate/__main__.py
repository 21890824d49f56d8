"""The ``tokengate`` command: ``info``, ``demo``, ``bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the harness owns its options (argparse REMAINDER drops "-x")
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tokengate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="topology, affinity policy, workers and storage tiers")
    demo = sub.add_parser("demo", help="run one of the seed's proofs")
    demo.add_argument("name", choices=["mixed", "io"])
    demo.add_argument("--duration", type=float, default=20.0)
    demo.add_argument("--verbose", action="store_true")
    sub.add_parser("bench", help="benchmarks side by side with the peers (see bench --help)")
    args = parser.parse_args(argv)

    if args.command == "info":
        from ._affinity import AffinityPolicy, mapping_banner
        from ._config import CoordinatorConfig
        from ._throttle import StorageThrottle
        from ._topology import detect_topology

        topology = detect_topology()
        config = CoordinatorConfig()
        print(topology.banner())
        print(AffinityPolicy(topology.core_count).banner())
        print(mapping_banner(topology.core_count, config.workers_per_core))
        print(StorageThrottle(config.storage_limits).banner())
        gil = getattr(sys, "_is_gil_enabled", lambda: True)()
        print(f"GIL enabled: {gil}")
        return 0
    if args.command == "demo":
        from .demos import io_proof, mixed

        try:
            if args.name == "io":  # the seed's Proof 2 (issue 4)
                failures = io_proof.run(verbose=args.verbose)
            else:
                failures = mixed.run(args.duration, verbose=args.verbose)
        except KeyboardInterrupt:
            print("\nInterrupted: pending tokens discarded, running ones finished.")
            return 130
        return 1 if failures else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
