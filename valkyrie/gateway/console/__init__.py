"""The web console: server-rendered pages over the gateway's own auth, plus a little script.

``/console`` serves one page shell; its script (``static/console.js``) loads each view as an HTML
fragment from ``/console/fragments/...`` with the caller's bearer token, follows the live event
stream (``/api/v2/events``) to refresh what is on screen, and calls the API for cancel and drain.
See docs/http-api.md ("Web console").
"""

from valkyrie.gateway.console._routes import ROUTES

__all__ = ["ROUTES"]
