"""Synthetic lumbar spine CT studies with known disc conditions (phantoms, not patients)."""
