"""Deployment: the Flower App, images, compose files, keys and signing, entrypoints, runbooks.

See ``deploy/README.md``. Modules: :mod:`~radfed.deploy.pki` (study CA, certificates,
SuperNode keys, signing key), :mod:`~radfed.deploy.signing` and
:mod:`~radfed.deploy.registry` (signed app bundles), :mod:`~radfed.deploy.site`,
:mod:`~radfed.deploy.coordinator` and :mod:`~radfed.deploy.health` (the images'
entrypoints), :mod:`~radfed.deploy.settings` and :mod:`~radfed.deploy.checks`
(configuration and start-up checks), :mod:`~radfed.deploy.demo` (the one-machine demo).
"""
