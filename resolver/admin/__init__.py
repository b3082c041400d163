"""The admin side of a node: HTTP API, why, the admin process."""
