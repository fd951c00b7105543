"""The thin Flask shell: HTTP in, a decision out. All logic lives in the pure modules."""

from geo_route.web.app import create_app

__all__ = ["create_app"]
