"""``python -m hookscope demo``."""

from .cli import main

raise SystemExit(main())
