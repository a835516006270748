"""Research harness for robust losses under label noise (uses the drainage_fast library)."""
