"""Access control: API keys with scopes, the scope each route needs, who did what, abuse limits."""
