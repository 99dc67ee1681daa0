"""Deployment checks: manifests, Dockerfile, Tiltfile, and the scale-out simulation."""
