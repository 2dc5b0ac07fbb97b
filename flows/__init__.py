"""Prefect flows and the command line: composition of the stages in `tasks`, no numerics."""
