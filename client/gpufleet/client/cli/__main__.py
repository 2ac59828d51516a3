"""`python -m gpufleet.client.cli` runs the gpufleet CLI."""

from gpufleet.client.cli.main import main

raise SystemExit(main())
