"""`python -m flexgen_lite.cli ...`: the same as the `flexgen-lite` command."""

from .main import main

main()
