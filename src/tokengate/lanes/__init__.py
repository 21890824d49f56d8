"""Lanes: where tokens run. Each lane owns workers with bounded mailboxes; all of them hand
finished work back through the coordinator's one completion path."""
