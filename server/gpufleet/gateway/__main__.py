"""`python -m gpufleet.gateway`: the same as `gpufleet gateway`."""

from __future__ import annotations

import sys

from gpufleet.gateway.main import main

if __name__ == "__main__":
    sys.exit(main())
