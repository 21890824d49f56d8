"""Reliability suite (issue 8): faults, load, bad input and random schedules; see README.md."""
