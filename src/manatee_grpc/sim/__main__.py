"""``python -m manatee_grpc.sim``: the same as ``manatee-grpc sim``."""

from __future__ import annotations

from manatee_grpc.sim._cli import main

raise SystemExit(main())
