"""Run the benchmarks: `python benchmarks/run.py [--ks 1 3 5 10] [--skip training retrieval]`.

Results go to benchmarks/results/<device>/bench.json and latency_memory.png.
"""
import sys

from bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
