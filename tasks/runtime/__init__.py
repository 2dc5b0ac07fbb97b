"""Infrastructure the stages run on: the stage cache, the workspace, locks and measurement."""
