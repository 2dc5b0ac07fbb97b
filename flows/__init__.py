"""Prefect flows and the command line: composition of the stages in `tasks`, no numerics."""

import os

# Prefect reads its settings when first imported, so they are set before any flow module
# imports it: offline-safe start-up on a fresh machine (the temporary API server's
# database set-up can exceed Prefect's default start-up limit), no analytics, quiet logs.
for _key, _value in {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}.items():
    os.environ.setdefault(_key, _value)
