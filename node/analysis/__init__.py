"""Study analysis: from a CT series to per-disc findings."""
