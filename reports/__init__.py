"""Reports read result JSON files only: no torch, no methods."""
