"""The data plane: routes, enforces policies, forwards, and emits one event per request."""
