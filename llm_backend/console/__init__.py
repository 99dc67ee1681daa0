"""The operator console: templates, static assets, server-drawn charts and the data of its pages."""
