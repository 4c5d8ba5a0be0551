"""What trials leave behind: result files (results.py), copied to MLflow / TensorBoard (track.py)
and exported as one table (export.py)."""
