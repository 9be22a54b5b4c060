"""The per-node agent: supervises workers and relays between them and the controller."""
