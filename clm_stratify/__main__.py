"""``python -m clm_stratify`` runs the command-line interface."""

from clm_stratify.cli import main

raise SystemExit(main())
