"""Example training scripts and the small models and data sets they use."""
