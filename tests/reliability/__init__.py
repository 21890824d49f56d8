"""Reliability suite: faults, load, bad input and random schedules; see README.md."""
