"""Where the node's shared state lives: Redis (every node of a fleet) or local files (one box). `backends`
builds the implementations the configuration asks for."""
