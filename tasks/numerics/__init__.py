"""Pure numerics over tensors and arrays: no Prefect, no workspace, no store."""
