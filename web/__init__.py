"""Templates and static assets of the admin UI, shipped in the wheel as ``relay.web``."""
