"""The offline digits demo, end to end: robustify the bundled digit classifier from its class names
only, then certify real test digits against honest baselines (see docs/demo.md).

    python examples/demo.py                 # defaults: within 10 minutes on 2 CPU cores (measured: docs/demo.md)
    python examples/demo.py --help          # scale it up: --n-test, --n, --n0, --sigmas, --steps, ...

Same as the command ``nodata-defense demo``.
"""

import sys

from nodata_defense.demo import main

if __name__ == "__main__":
    sys.exit(main())
