"""manatee-grpc: a gRPC front for the ManaTEE memory service (mms).

The public surface is what ``__all__`` lists; everything in ``_``-prefixed modules is internal.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
