"""Sending results to destinations over DICOM."""
