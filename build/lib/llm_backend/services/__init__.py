"""The domain: forwarding, access control, conversations and usage; no web framework here."""
