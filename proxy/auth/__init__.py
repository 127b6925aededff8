"""Authentication: JWT bearer tokens (PyJWT), JWKS key sets, API keys, and the authn step."""
