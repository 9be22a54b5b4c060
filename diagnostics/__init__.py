"""Diagnostics: readable timelines and reports of what happened to a job."""
