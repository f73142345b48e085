"""The command line (`flexgen-lite`): main.py dispatches; one module per command, the shared options
(options.py, checks.py) below every command and door, and the reports (bench, breakdown, trace, report)."""
