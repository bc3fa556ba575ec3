"""Deployment: the Flower app bundle, Dockerfiles, compose files and runbooks."""
