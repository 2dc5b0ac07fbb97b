"""The pipeline's work, in rooms by role.

- `stages/`   one module per pipeline stage: its pure function, its artifact format, its Stage
- `methods/`  the quantization method registry (fp, rtn, gptq, hawq, ...)
- `models/`   model families: building, converting, loading and training models
- `decoding/` auto-regressive decoding and the masked-diffusion sampler
- `numerics/` pure functions over tensors and arrays: curvature, bit allocation, statistics
- `storage/`  the DuckDB store, its statistics views and the report
- `runtime/`  the stage cache, workspace, locks, library environment and measurement
- `config.py` typed, frozen grid configuration; `benchmarks.py` the benchmark registry

Importing any of these has no side effects; heavy libraries load inside the functions that use them.
"""
