"""IMAP around mailfax: intake from a watched mailbox, and delivery of received faxes by APPEND."""
