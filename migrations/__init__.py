"""Alembic schema history of faultfleet (a package so `faultfleet migrate` finds it from any cwd)."""
