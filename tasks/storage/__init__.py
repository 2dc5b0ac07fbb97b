"""The results store (DuckDB), its statistics views and the report built from it."""
