"""The web console: audit review, privacy budgets, models and a monitoring glance.

Served by the gateway under ``/console`` (see :func:`server.console.routes.create_console_router`),
so every page view goes through the gateway's audit middleware and key store
like an API call does.
"""

from server.console.routes import create_console_router

__all__ = ["create_console_router"]
