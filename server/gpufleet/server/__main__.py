"""`python -m gpufleet.server`: same as `gpufleet server`."""

from gpufleet.server.main import main

raise SystemExit(main())
