"""Real execution with torch: pinned host experts, a device slot pool, copies on their own streams; and calibration."""
