"""Documents: attachments to fax-ready PDF pages (PDF, images, office files) and the cover page."""
