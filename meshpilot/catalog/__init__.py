"""The API catalog: each service's operations, imported from OpenAPI 3 documents, versioned with diffs,
named by the API-level routing, breaking and limiting selectors."""
