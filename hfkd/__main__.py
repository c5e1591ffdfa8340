"""`python -m hfkd` and `accelerate launch -m hfkd distill ...`."""

from .cli import main

raise SystemExit(main())
