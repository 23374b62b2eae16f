"""The `diekae-rag` command line."""
import sys


def main(argv=None) -> int:
    print("diekae-rag: subcommands coming", file=sys.stderr)
    return 0
