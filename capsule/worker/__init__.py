"""Workers: processes on any number of machines that take submitted runs
from a shared journal (``capsule submit``), run them, and keep their leases;
a run whose worker died is taken by another once its lease expires."""
