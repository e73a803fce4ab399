"""GPU-readiness checks of every recipe (make gpu-check); see run.py."""
