"""Tasks: one file each, holding a task's records, prompt template and metrics (e.g. ``tasks.querygen``)."""
