"""The Quick-Proof's proofs as runnable demos; each module is a short example a user can copy."""
