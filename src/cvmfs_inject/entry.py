"""The `cvmfs-inject` console script.

The CLI and its libraries take a few tenths of a second to import. They are imported here,
inside the interrupt handling, so a Ctrl-C during start-up ends like one later on: one
line and exit code 130, not a traceback.
"""

import sys


def main() -> int:
    try:
        from cvmfs_inject.cli import main as cli_main
    except KeyboardInterrupt:
        print("cvmfs-inject: error: interrupted", file=sys.stderr)
        return 130
    return cli_main()
