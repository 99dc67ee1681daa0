"""Upstream backends (Azure OpenAI, OpenAI-compatible servers, the mock) and the router across them."""
