"""``python -m clm_stratify.cli`` runs the command-line interface (as ``python -m clm_stratify`` does)."""

from clm_stratify.cli import main

raise SystemExit(main())
