"""dreamfocus: a crisp subject on a soft, painterly background, for whole photo libraries."""

import os

# torch's OpenMP threads otherwise spin after each operation, on the cores that NNPACK's own
# threads (the nnpack runtime) want next: IS-Net took 3.07 s a photo that way on 2 cores, 2.75 s
# with sleeping threads, and the oneDNN runtime lost nothing. Read once, when torch is first
# imported; the processes Ray starts inherit it. A value set outside is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Before any thread of the job starts: see heap.py.
from .heap import keep_freed_memory  # noqa: E402

keep_freed_memory()

__version__ = "0.1.0"
