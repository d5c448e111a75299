"""The sweeps: the plan of a patching sweep (forms, FLOPs, memory), its cost model and
timing, the plain and reuse forms, attribution patching, maps of results, and the
split over processes. Imports ``steerops.model`` and ``steerops.ops``; never the
application."""
