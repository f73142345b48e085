"""Measuring this machine (above the engine it times): probes.py times kernels, copies and the disk;
measure.py runs them and the engine-level ones, and loads, measures or re-measures the stored profile."""
