"""Features, detectors, recommendations, policy write-back and the control-plane API."""
