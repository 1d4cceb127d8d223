"""`python -m easyref ...` (what `accelerate launch -m easyref train ...` runs on every process)."""

from .cli import main

if __name__ == "__main__":  # importing easyref.__main__ (tools that scan a package) must not run the CLI
    raise SystemExit(main())
