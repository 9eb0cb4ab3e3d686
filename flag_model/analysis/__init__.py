"""Pure analysis functions, one module per concern; results are DataFrames or frozen dataclasses."""
