"""`python -m cvmfs_inject` runs the same CLI as the `cvmfs-inject` script."""

import sys

from cvmfs_inject.entry import main

sys.exit(main())
