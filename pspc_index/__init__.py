"""pspc-index: exact and retrieval-based Patch Set Posterior Composite (PSPC) denoisers."""
import os

# OpenMP threads that busy-wait between parallel regions fight any other process on the cores: the exact
# kernel on 2 shared cores took 13.2 s with the default policy and 1.2 s with PASSIVE (one thread: 2.3 s).
# Set before torch loads OpenMP; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
