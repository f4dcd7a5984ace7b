"""Policies: rule objects operators write once (routing, circuit breaking, rate limits), validated
at the edge, stored with the registry and translated into xDS resources.

The framework is kind-agnostic: ``kinds`` holds the registry of kinds (model, checks, translate
hook), ``engine`` the policies in force and their translations, ``api`` the management-API routes,
``command`` the CLI and ``plugin`` the control-plane wiring. Every other module here is a kind
(``routing``: RoutingPolicy) that registers itself on import.
"""
