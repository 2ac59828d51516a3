"""The `gpufleet` command line: one module per subcommand under cli/commands/."""
