"""Receiving: the DICOM listener, the spool it writes to, and when a series is complete."""
