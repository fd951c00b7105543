"""geo-route: serve container-image pulls from a registry's secondary site."""

__version__ = "0.1.0"
