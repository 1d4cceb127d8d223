"""`python -m easyref ...` (what `accelerate launch -m easyref train ...` runs on every process)."""

from .cli import main

raise SystemExit(main())
