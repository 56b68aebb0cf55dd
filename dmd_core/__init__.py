"""dmd_core."""
