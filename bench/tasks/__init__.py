"""Tasks: what a trial trains on and is scored by.

registry.py holds the one registry every task joins (text.py: the packaged text tasks;
user.py: the user's own files, named file:<path>; vision.py: the image tasks and their
pretrained source models), tokens.py turns text rows into batches, and the lm-eval task
templates (*.yaml, _multiple_choice_yaml) sit beside them. data.py is the way in: it looks
tasks up and prepares a trial's rows.
"""
