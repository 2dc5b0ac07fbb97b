"""Pipeline stages, one module each: a pure function over typed manifests and its `Stage`."""
