"""mailfax: an e-mail to fax and fax to e-mail bridge."""

__version__ = "0.1.0"
