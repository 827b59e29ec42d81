"""Outbound: dispatcher → provider; tracker → notifier → outbox (status mails and bounces)."""
