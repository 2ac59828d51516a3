"""`python -m gpufleet.agent`: same as `gpufleet agent`."""

from gpufleet.agent.main import main

raise SystemExit(main())
