"""Coverage-guided fuzzing of the parsers (atheris): subjects, targets, the runner and the corpus capture."""
