"""The worker hook: the agent's in-process half, running inside each training process."""
