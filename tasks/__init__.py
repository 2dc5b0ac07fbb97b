"""qrobust's pipeline stages. Each module holds one stage's pure logic and its Prefect task."""

from tasks.models.loading import set_library_environment as _set_library_environment

# gptqmodel and transformers read these at import time, so they are set before any stage runs.
_set_library_environment()
