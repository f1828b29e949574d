"""`python benchmarks/bench.py ...` from a checkout: the same as `dynpose-bench` (code in `dynpose/bench/`)."""

from dynpose.cli.bench import main

if __name__ == "__main__":
    main()
