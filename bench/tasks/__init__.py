"""Tasks: what a trial trains on and is scored by.

registry.py holds the one registry every task joins (text.py: the packaged text tasks;
user.py: the user's own files, named file:<path>; bench/vision.py: the image tasks), and the
lm-eval task templates (*.yaml, _multiple_choice_yaml) sit beside them. bench/data.py is the
way in: it looks tasks up here and turns their rows into training batches.
"""
