"""What pipelines/ and model/ both use and neither owns: the counter-based random draws (rng.py)."""
