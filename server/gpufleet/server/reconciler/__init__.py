"""The reconciler: keeps every deployment at its desired instances.

Pure decisions, each unit-tested on its own: liveness.py (which nodes are lost),
scaling.py (desired count), rollout.py (what to start and stop), summary.py (status),
planner.py (a whole pass -> one store batch). loop.py (`Reconciler`) is the thin async
shell around them; import it from there (this package imports nothing, so the pure modules
can be used without the loop's dependencies).
"""
