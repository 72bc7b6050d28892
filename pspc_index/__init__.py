"""pspc-index: exact and retrieval-based Patch Set Posterior Composite (PSPC) denoisers."""

__version__ = "0.1.0"
