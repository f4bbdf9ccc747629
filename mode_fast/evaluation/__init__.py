"""Zero-shot evaluation: tasks, scoring of single models, MoDE's task-adaptive ensemble, results."""
