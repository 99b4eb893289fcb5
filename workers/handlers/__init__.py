"""Fleet retraining jobs, one module per subject: base model registration (`models`),
resilience maps (`maps`), planning (`plans`), execution and group retraining
(`execution`), chips that arrive after a plan ran (`late_chips`).

Each handler is a job kind (see `workers.jobs`): ids in, JSON out, idempotent and
resumable. The planning and training logic lives in `planner` and `workers.pipeline`,
the rows are read and written through `workers.store`, and the files that leave the
service are built by `workers.export`; a handler only loads, calls them, and stores.

Fan-out: a resilience map is one child job per cell and a plan round is one child job
per group, published together as a Celery `group` (`workers.jobs.gather_children`).

Importing this package registers every handler (the Celery app includes it).
"""

from workers.handlers import execution, late_chips, maps, models, plans

__all__ = ["execution", "late_chips", "maps", "models", "plans"]
