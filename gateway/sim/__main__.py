from __future__ import annotations

from gateway.sim.cli import main

raise SystemExit(main())
