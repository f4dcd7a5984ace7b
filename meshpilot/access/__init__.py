"""Who may use the HTTP front doors: access tokens with scopes (read, write, admin), kept hashed in
the store, honoured by the management API and (as Consul ACL tokens) by the Consul-compatible API."""

from meshpilot.access.tokens import BOOTSTRAP_ID, AccessToken, AccessTokens, Issued, Scope

__all__ = ["BOOTSTRAP_ID", "AccessToken", "AccessTokens", "Issued", "Scope"]
