"""Ember's control plane: Firecracker's REST API over a Unix socket, and its CLI.

Follows Firecracker's swagger description (``firecracker.yaml``): the same
paths, bodies, status codes and fault messages, so Firecracker clients (the Go
SDK, Python clients, curl scripts) drive Ember unchanged.
"""
