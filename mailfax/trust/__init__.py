"""Trust: who may send (policy, SMTP users, login throttling) and where to (the dial policy)."""
