"""Client libraries driven against a running llm-backend, each from the virtualenv its users would have."""
