"""The library job: Ray Data over a whole photo library, resumable through the manifest.

plan.py     configuration, output naming, the plan from listing and manifest (driver side)
stages.py   what runs on Ray's workers: read, models, finish (pipeline.photo's steps per group)
driver.py   Ray start-up, the dataset's wiring, manifest commits, the run's summary
"""

from .driver import JobSummary, run_job
from .plan import JobConfig

__all__ = ["JobConfig", "JobSummary", "run_job"]
