"""Benchmarks: each runs a gpufleet component and its baseline side by side, alternating,
in one run on one machine, prints a table and ends with a ratio line.

Run all with `python -m bench` (or `make bench`), one with `python -m bench NAME [FLAGS]`;
`python -m bench --list` names them. Figures measured so far are in bench/RESULTS.md.
"""
